using EpA2A.Numerics;
using EpA2A.Reference;

namespace EpA2A.Tests.LowLatency;

/// <summary>The backends' FP8 e4m3 quantizer (fp32 bits) against the reference's (a table and exact midpoints).</summary>
public sealed class Fp8QuantizerTests
{
    public static TheoryData<float, byte> KnownCodes => new()
    {
        { 0f, 0x00 },
        { -0f, 0x80 },
        { 1f, 0x38 },
        { -1f, 0xB8 },
        { 448f, 0x7E },
        { -448f, 0xFE },
        { 464f, 0x7E },            // halfway to where 480 would be: saturates
        { 1e9f, 0x7E },
        { float.PositiveInfinity, 0x7E },
        { float.NegativeInfinity, 0xFE },
        { float.NaN, 0x7F },
        { 0.001953125f, 0x01 },    // 2^-9, the smallest subnormal
        { 0.0009765625f, 0x00 },   // 2^-10: a tie between 0 and 2^-9, to the even code 0
        { 0.0029296875f, 0x02 },   // 3 * 2^-10: a tie between codes 1 and 2, to 2
        { 0.015625f, 0x08 },       // 2^-6, the smallest normal
        { 1.0625f, 0x38 },         // a tie between 1 and 1.125, to the even code 0x38
        { 1.1875f, 0x3A },         // a tie between 1.125 (0x39) and 1.25 (0x3A), to 0x3A
        { 240f, 0x77 },
        { 1e-30f, 0x00 },
        { -1e-30f, 0x80 },
    };

    [Theory]
    [MemberData(nameof(KnownCodes))]
    public void Both_quantizers_give_the_codes_CUDA_gives_for_the_edge_values(float value, byte code)
    {
        Assert.Equal(code, Fp8E4M3.FromSingle(value));
        Assert.Equal(code, ReferenceFp8.Encode(value));
    }

    [Fact]
    public void Every_code_decodes_to_the_same_value_and_every_finite_code_round_trips()
    {
        for (int c = 0; c < 256; c++)
        {
            byte code = (byte)c;
            double reference = ReferenceFp8.Decode(code);
            float value = Fp8E4M3.ToSingle(code);
            if ((c & 0x7F) == 0x7F)
            {
                Assert.True(float.IsNaN(value) && double.IsNaN(reference), $"code 0x{c:X2}");
                continue;
            }

            Assert.Equal(reference, value);
            Assert.Equal(code, Fp8E4M3.FromSingle(value));
        }
    }

    [Fact]
    public void The_quantizers_agree_on_every_midpoint_and_its_neighbours_and_on_millions_of_random_floats()
    {
        int seed = Environment.TickCount;
        Random rng = new(seed);
        List<float> values = [];
        for (int c = 0; c < 0x7E; c++)
        {
            float lo = Fp8E4M3.ToSingle((byte)c);
            float hi = Fp8E4M3.ToSingle((byte)(c + 1));
            float mid = (float)((lo + (double)hi) / 2);
            foreach (float v in new[] { lo, hi, mid, MathF.BitDecrement(mid), MathF.BitIncrement(mid), MathF.BitIncrement(lo), MathF.BitDecrement(hi) })
            {
                values.Add(v);
                values.Add(-v);
            }
        }

        values.AddRange([448f, 464f, MathF.BitDecrement(464f), MathF.BitIncrement(464f), 480f, float.MaxValue, float.Epsilon, -float.Epsilon, 1e-40f, float.MinValue]);
        for (int i = 0; i < 2_000_000; i++)
        {
            // Random bit patterns cover every exponent; scaled uniforms cover the e4m3 range densely.
            values.Add(i % 2 == 0 ? BitConverter.Int32BitsToSingle(rng.Next() | (rng.Next(2) << 31)) : (float)((rng.NextDouble() * 1000) - 500) * MathF.ScaleB(1f, rng.Next(-12, 2)));
        }

        foreach (float v in values)
        {
            byte want = ReferenceFp8.Encode(v);
            byte got = Fp8E4M3.FromSingle(v);
            if (want != got)
            {
                Assert.Fail($"seed {seed}: {v:R} (bits 0x{BitConverter.SingleToUInt32Bits(v):X8}) -> 0x{got:X2}, reference 0x{want:X2}");
            }
        }
    }

    [Fact]
    public void The_quantizers_agree_on_every_bf16_value()
    {
        for (int b = 0; b < 65536; b++)
        {
            float v = BFloat16.FromBits((ushort)b).ToSingle();
            Assert.True(ReferenceFp8.Encode(v) == Fp8E4M3.FromSingle(v), $"bf16 bits 0x{b:X4} = {v:R}");
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void The_scales_agree_on_every_amax_a_bf16_group_can_have(bool powerOfTwo)
    {
        // amax is the magnitude of a bf16 element: every finite non-negative bf16 value (subnormals included, whose
        // quotients by 448 are fp32 subnormals), plus a few fp32 edges.
        List<float> amax = [448f, MathF.BitIncrement(448f), MathF.BitDecrement(448f), 1e-38f, float.MaxValue];
        for (int b = 0; b < 0x7F80; b++)
        {
            amax.Add(BFloat16.FromBits((ushort)b).ToSingle());
        }

        foreach (float a in amax)
        {
            float want = ReferenceFp8.Scale(a, powerOfTwo);
            float got = Fp8E4M3.Scale(a, powerOfTwo);
            Assert.True(BitConverter.SingleToUInt32Bits(want) == BitConverter.SingleToUInt32Bits(got), $"amax {a:R} -> scale {got:R}, reference {want:R}");
            if (powerOfTwo && a != 0)
            {
                Assert.True((BitConverter.SingleToUInt32Bits(got) & 0x7F_FFFF) == 0 && got >= a / 448f, $"amax {a:R}: scale {got:R} is not a power of two at least amax/448");
            }
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Rows_quantize_alike_with_zero_groups_nan_elements_and_wide_ranges(bool powerOfTwo)
    {
        int seed = Environment.TickCount;
        Random rng = new(seed);
        for (int trial = 0; trial < 300; trial++)
        {
            int hidden = 128 * rng.Next(1, 5);
            BFloat16[] row = new BFloat16[hidden];
            for (int g = 0; g < hidden / 128; g++)
            {
                int kind = rng.Next(4);
                float magnitude = MathF.ScaleB(1f, rng.Next(-130, 120));
                for (int i = g * 128; i < (g + 1) * 128; i++)
                {
                    row[i] = kind == 0 ? default : BFloat16.FromSingle((float)((rng.NextDouble() * 2) - 1) * magnitude);
                }

                if (kind == 3)
                {
                    row[(g * 128) + rng.Next(128)] = BFloat16.FromSingle(float.NaN);
                }
            }

            byte[] codes = new byte[hidden];
            float[] scales = new float[hidden / 128];
            Fp8E4M3.QuantizeRow(row, codes, scales, powerOfTwo);
            (byte[] wantCodes, float[] wantScales) = ReferenceFp8.QuantizeRow(row, powerOfTwo);
            Assert.True(wantScales.AsSpan().SequenceEqual(scales), $"seed {seed}, trial {trial}: scales differ");
            for (int i = 0; i < hidden; i++)
            {
                Assert.True(wantCodes[i] == codes[i], $"seed {seed}, trial {trial}: element {i} = {row[i]} -> 0x{codes[i]:X2}, reference 0x{wantCodes[i]:X2} (scale {scales[i / 128]:R})");
            }
        }
    }
}

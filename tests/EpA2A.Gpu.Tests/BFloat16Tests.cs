using EpA2A.Numerics;

namespace EpA2A.Tests;

/// <summary>
/// <see cref="BFloat16"/>: fp32 narrows to nearest, ties to even; widening is exact; NaN stays NaN; infinities,
/// signed zeros and subnormals behave as the upper half of an IEEE binary32.
/// </summary>
public sealed class BFloat16Tests
{
    [Theory]
    [InlineData(0x3F80_8000u, 0x3F80, "tie between 1 and its successor: down to the even 1")]
    [InlineData(0x3F81_8000u, 0x3F82, "tie above an odd value: up to the even one")]
    [InlineData(0x3F80_8001u, 0x3F81, "just above a tie: up")]
    [InlineData(0x3F80_7FFFu, 0x3F80, "just below a tie: down")]
    [InlineData(0x3F80_FFFFu, 0x3F81, "far above a tie: up")]
    [InlineData(0xBF80_8000u, 0xBF80, "negative tie: to the even magnitude")]
    [InlineData(0xBF81_8000u, 0xBF82, "negative tie above an odd magnitude")]
    [InlineData(0x3FFF_8000u, 0x4000, "tie whose rounding carries into the exponent")]
    [InlineData(0x0000_8000u, 0x0000, "subnormal tie: down to zero")]
    [InlineData(0x0001_8000u, 0x0002, "subnormal tie above an odd value")]
    [InlineData(0x807F_8000u, 0x8080, "tie between the largest negative subnormal and the smallest normal")]
    [InlineData(0x8000_0001u, 0x8000, "the smallest negative subnormal: to negative zero")]
    [InlineData(0x7F7F_7FFFu, 0x7F7F, "just below the tie above the largest finite value: stays finite")]
    [InlineData(0x7F7F_8000u, 0x7F80, "tie above the largest finite value: to infinity")]
    [InlineData(0xFF7F_8000u, 0xFF80, "negative tie above the largest finite magnitude: to negative infinity")]
    public void Narrowing_rounds_to_nearest_with_ties_to_even(uint floatBits, int expected, string what)
    {
        BFloat16 b = BFloat16.FromSingle(BitConverter.UInt32BitsToSingle(floatBits));

        Assert.True(b.RawBits == expected, $"{what}: 0x{floatBits:X8} became 0x{b.RawBits:X4}, expected 0x{expected:X4}");
    }

    [Fact]
    public void Narrowing_agrees_with_an_exact_nearest_even_rounding_on_random_floats()
    {
        int seed = Random.Shared.Next();
        Random rng = new(seed);
        for (int i = 0; i < 200_000; i++)
        {
            uint bits = (uint)rng.NextInt64(0, 1L << 32);
            float x = BitConverter.UInt32BitsToSingle(bits);
            if (float.IsNaN(x))
            {
                continue;
            }

            ushort want = NearestEven(bits);
            ushort got = BFloat16.FromSingle(x).RawBits;
            Assert.True(got == want, $"seed {seed}: 0x{bits:X8} ({x:R}) became 0x{got:X4}, expected 0x{want:X4}");
        }
    }

    [Theory]
    [InlineData(0x7FC0_0000u)]
    [InlineData(0xFFC0_0000u)]
    [InlineData(0x7F80_0001u)]
    [InlineData(0xFF80_0001u)]
    [InlineData(0x7F80_8000u)]
    [InlineData(0x7F80_FFFFu)]
    [InlineData(0x7FFF_FFFFu)]
    [InlineData(0xFFFF_FFFFu)]
    [InlineData(0x7FBF_FFFFu)]
    public void A_NaN_stays_NaN_with_its_sign_however_small_its_payload(uint floatBits)
    {
        BFloat16 b = BFloat16.FromSingle(BitConverter.UInt32BitsToSingle(floatBits));

        Assert.True(float.IsNaN(b.ToSingle()), $"0x{floatBits:X8} became 0x{b.RawBits:X4}, which is not NaN");
        Assert.Equal(floatBits >> 31, (uint)b.RawBits >> 15);
    }

    [Fact]
    public void Every_NaN_bit_pattern_widens_to_NaN_and_narrows_back_to_NaN()
    {
        for (int bits = 0; bits <= ushort.MaxValue; bits++)
        {
            BFloat16 b = BFloat16.FromBits((ushort)bits);
            if ((bits & 0x7F80) != 0x7F80 || (bits & 0x007F) == 0)
            {
                continue;
            }

            float wide = b.ToSingle();
            Assert.True(float.IsNaN(wide), $"0x{bits:X4} widened to {wide}");
            BFloat16 back = BFloat16.FromSingle(wide);
            Assert.True(float.IsNaN(back.ToSingle()) && (back.RawBits >> 15) == (bits >> 15), $"0x{bits:X4} came back as 0x{back.RawBits:X4}");
        }
    }

    [Fact]
    public void Infinities_map_to_infinities_and_the_largest_float_overflows_to_infinity()
    {
        Assert.Equal(0x7F80, BFloat16.FromSingle(float.PositiveInfinity).RawBits);
        Assert.Equal(0xFF80, BFloat16.FromSingle(float.NegativeInfinity).RawBits);
        Assert.Equal(float.PositiveInfinity, BFloat16.FromBits(0x7F80).ToSingle());
        Assert.Equal(float.NegativeInfinity, BFloat16.FromBits(0xFF80).ToSingle());
        Assert.Equal(0x7F80, BFloat16.FromSingle(float.MaxValue).RawBits);
        Assert.Equal(0xFF80, BFloat16.FromSingle(float.MinValue).RawBits);
        Assert.Equal(0x7F7F, BFloat16.FromSingle(BitConverter.UInt32BitsToSingle(0x7F7F_0000)).RawBits);
    }

    [Fact]
    public void Negative_zero_keeps_its_sign_compares_equal_to_zero_by_value_but_not_bitwise()
    {
        BFloat16 negative = BFloat16.FromSingle(-0f);
        BFloat16 positive = BFloat16.FromSingle(0f);

        Assert.Equal(0x8000, negative.RawBits);
        Assert.Equal(0x0000, positive.RawBits);
        Assert.Equal(0x8000_0000u, BitConverter.SingleToUInt32Bits(negative.ToSingle()));
        Assert.Equal(0, negative.CompareTo(positive));
        Assert.True(negative <= positive && negative >= positive);
        Assert.True(negative != positive, "== is bitwise, so -0 and +0 differ");
        Assert.Equal(0x8000, BFloat16.FromSingle(-1e-45f).RawBits);
    }

    [Fact]
    public void Every_bit_pattern_that_is_not_NaN_round_trips_exactly_through_float()
    {
        for (int bits = 0; bits <= ushort.MaxValue; bits++)
        {
            BFloat16 b = BFloat16.FromBits((ushort)bits);
            float wide = b.ToSingle();
            if (float.IsNaN(wide))
            {
                continue;
            }

            Assert.True(BitConverter.SingleToUInt32Bits(wide) == (uint)bits << 16, $"0x{bits:X4} widened to 0x{BitConverter.SingleToUInt32Bits(wide):X8}");
            Assert.True(BFloat16.FromSingle(wide).RawBits == bits, $"0x{bits:X4} came back as 0x{BFloat16.FromSingle(wide).RawBits:X4}");
            Assert.True((BFloat16)(float)b == b, $"0x{bits:X4}: the conversion operators do not round-trip");
        }
    }

    [Fact]
    public void Comparison_operators_order_by_value_across_signs_and_magnitudes()
    {
        int seed = Random.Shared.Next();
        Random rng = new(seed);
        for (int i = 0; i < 20_000; i++)
        {
            BFloat16 a = BFloat16.FromBits((ushort)rng.Next(0, 0x10000));
            BFloat16 b = BFloat16.FromBits((ushort)rng.Next(0, 0x10000));
            float x = a.ToSingle();
            float y = b.ToSingle();
            if (float.IsNaN(x) || float.IsNaN(y))
            {
                continue;
            }

            Assert.True((a < b) == (x < y) && (a > b) == (x > y) && (a <= b) == (x <= y) && (a >= b) == (x >= y), $"seed {seed}: 0x{a.RawBits:X4} vs 0x{b.RawBits:X4}");
            Assert.True(Math.Sign(a.CompareTo(b)) == Math.Sign(x.CompareTo(y)), $"seed {seed}: CompareTo(0x{a.RawBits:X4}, 0x{b.RawBits:X4})");
        }
    }

    [Fact]
    public void Formatting_is_the_value_in_the_invariant_culture() =>
        Assert.Equal("-1.5", BFloat16.FromSingle(-1.5f).ToString());

    /// <summary>
    /// Nearest-even rounding worked out in double arithmetic, which holds every float and every bfloat16 (and
    /// 2^128, the step past the largest one) exactly: compare the distances to the two neighbours.
    /// </summary>
    private static ushort NearestEven(uint bits)
    {
        ushort down = (ushort)(bits >> 16); // truncation: the neighbour towards zero
        int exponent = (down >> 7) & 0xFF;
        double step = Math.ScaleB(1.0, Math.Max(exponent, 1) - 127 - 7);
        double x = Math.Abs((double)BitConverter.UInt32BitsToSingle(bits));
        double low = Math.Abs((double)BitConverter.UInt32BitsToSingle((uint)down << 16));
        double below = x - low;
        double above = low + step - x;
        bool up = above < below || (above == below && (down & 1) == 1);
        return up ? (ushort)(down + 1) : down;
    }
}

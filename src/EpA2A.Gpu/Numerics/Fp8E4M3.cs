using System.Runtime.CompilerServices;

namespace EpA2A.Numerics;

/// <summary>
/// FP8 e4m3 (the "fn" variant: no infinities, 0x7F/0xFF are NaN, largest finite ±448) and the per-token, per-128-channel
/// quantization of the low-latency dispatch. Conversion matches CUDA's <c>__nv_cvt_float_to_fp8(v, __NV_SATFINITE,
/// __NV_E4M3)</c>: round to nearest even, magnitudes above 448 (and infinities) saturate to ±448, NaN gives 0x7F, the
/// sign of zero is kept. Implemented on the fp32 bit pattern; the reference has its own, table-based quantizer.
/// </summary>
public static class Fp8E4M3
{
    /// <summary>The largest finite e4m3 magnitude.</summary>
    public const float MaxFinite = 448f;

    /// <summary>The code every NaN converts to.</summary>
    public const byte NaN = 0x7F;

    /// <summary>Channels that share one scale.</summary>
    public const int GroupSize = 128;

    /// <summary>The e4m3 code nearest to <paramref name="value"/> (ties to even), saturating to ±448.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static byte FromSingle(float value)
    {
        uint bits = BitConverter.SingleToUInt32Bits(value);
        uint sign = (bits >> 24) & 0x80u;
        uint magnitude = bits & 0x7FFF_FFFFu;
        if (magnitude > 0x7F80_0000u)
        {
            return NaN;
        }

        if (magnitude > 0x43E0_0000u)
        {
            return (byte)(sign | 0x7Eu); // above 448 (infinity included): saturate
        }

        if (magnitude < 0x3C80_0000u)
        {
            // Below 2^-6, e4m3 is subnormal: steps of 2^-9. Scaling by 2^9 is exact; the integer part rounds to even.
            float steps = BitConverter.UInt32BitsToSingle(magnitude) * 512f;
            return (byte)(sign | (uint)MathF.Round(steps, MidpointRounding.ToEven));
        }

        // Normal: rebias the exponent (127 -> 7) and round the 23-bit mantissa to 3 bits; a carry moves into the exponent.
        uint exponent = (magnitude >> 23) - 120u;
        uint mantissa = magnitude & 0x7F_FFFFu;
        uint code = (exponent << 3) | (mantissa >> 20);
        uint rest = mantissa & 0xF_FFFFu;
        if (rest > 0x8_0000u || (rest == 0x8_0000u && (code & 1u) != 0))
        {
            code++;
        }

        return (byte)(sign | code);
    }

    /// <summary>The exact value of an e4m3 code (NaN for 0x7F and 0xFF).</summary>
    public static float ToSingle(byte code)
    {
        int exponent = (code >> 3) & 0xF;
        int mantissa = code & 0x7;
        float sign = (code & 0x80) != 0 ? -1f : 1f;
        if (exponent == 0xF && mantissa == 0x7)
        {
            return float.NaN;
        }

        float magnitude = exponent == 0
            ? mantissa * (1f / 512f)
            : (1f + (mantissa / 8f)) * MathF.ScaleB(1f, exponent - 7);
        return sign * magnitude;
    }

    /// <summary>
    /// The scale of one group from its largest magnitude: amax / 448 (fp32 division), or, with
    /// <paramref name="powerOfTwo"/>, the smallest power of two at least that (and at least 2^-126); 1 when amax is 0.
    /// </summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Scale(float amax, bool powerOfTwo)
    {
        if (amax == 0f)
        {
            return 1f;
        }

        float scale = amax / MaxFinite;
        if (!powerOfTwo)
        {
            return scale;
        }

        // UE8M0: a mantissa above zero rounds the exponent up (a subnormal quotient becomes 2^-126).
        uint bits = BitConverter.SingleToUInt32Bits(scale);
        if ((bits & 0x7F_FFFFu) != 0)
        {
            bits = (bits & 0xFF80_0000u) + 0x80_0000u;
            bits &= 0xFF80_0000u;
        }

        return BitConverter.UInt32BitsToSingle(bits);
    }

    /// <summary>
    /// Quantizes one token row: per group of 128 channels, amax (NaN ignored, as CUDA's fmaxf), the scale, and each
    /// element as e4m3(x / scale) with a correctly rounded fp32 division.
    /// </summary>
    /// <param name="row">[Hidden] bf16, Hidden a multiple of 128.</param>
    /// <param name="codes">[Hidden] e4m3 codes.</param>
    /// <param name="scales">[Hidden / 128] fp32 scales.</param>
    /// <param name="powerOfTwo">UE8M0 scales.</param>
    public static void QuantizeRow(ReadOnlySpan<BFloat16> row, Span<byte> codes, Span<float> scales, bool powerOfTwo)
    {
        if (row.Length % GroupSize != 0 || codes.Length != row.Length || scales.Length != row.Length / GroupSize)
        {
            throw new ArgumentException($"a row of {row.Length} needs {row.Length} codes and {row.Length / GroupSize} scales (and a multiple of {GroupSize} channels); got {codes.Length} and {scales.Length}", nameof(row));
        }

        for (int g = 0; g < scales.Length; g++)
        {
            ReadOnlySpan<BFloat16> group = row.Slice(g * GroupSize, GroupSize);
            float amax = 0f;
            foreach (BFloat16 x in group)
            {
                float a = MathF.Abs(x.ToSingle());
                if (a > amax)
                {
                    amax = a;
                }
            }

            float scale = Scale(amax, powerOfTwo);
            scales[g] = scale;
            Span<byte> out8 = codes.Slice(g * GroupSize, GroupSize);
            for (int i = 0; i < GroupSize; i++)
            {
                out8[i] = FromSingle(group[i].ToSingle() / scale);
            }
        }
    }
}

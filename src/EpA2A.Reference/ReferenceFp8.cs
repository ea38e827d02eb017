using EpA2A.Numerics;

namespace EpA2A.Reference;

/// <summary>
/// An FP8 e4m3 quantizer written apart from the backends' (which works on fp32 bits): the 127 non-negative finite
/// e4m3 values in a table, the nearest one found by comparing with the exact midpoints between neighbours (ties to the
/// even code), anything beyond 448 nearest to 448, NaN to 0x7F, the sign kept (zero included). Scales and divisions are
/// computed in double and rounded once to fp32, which equals the correctly rounded fp32 operation.
/// </summary>
public static class ReferenceFp8
{
    /// <summary>Channels per scale.</summary>
    public const int GroupSize = 128;

    private static readonly double[] Magnitudes = BuildMagnitudes();

    /// <summary>The e4m3 code of the finite value nearest to <paramref name="value"/>.</summary>
    public static byte Encode(float value)
    {
        if (float.IsNaN(value))
        {
            return 0x7F;
        }

        byte sign = float.IsNegative(value) ? (byte)0x80 : (byte)0;
        double a = Math.Abs((double)value);
        int last = Magnitudes.Length - 1;
        if (a >= Magnitudes[last])
        {
            return (byte)(sign | last);
        }

        // The largest code whose magnitude is at most a (codes are ordered by magnitude).
        int lo = 0;
        int hi = last;
        while (hi - lo > 1)
        {
            int mid = (lo + hi) / 2;
            if (Magnitudes[mid] <= a)
            {
                lo = mid;
            }
            else
            {
                hi = mid;
            }
        }

        double midpoint = (Magnitudes[lo] + Magnitudes[hi]) / 2; // exact: both have a few significant bits
        int code = a < midpoint ? lo : a > midpoint ? hi : (lo % 2 == 0 ? lo : hi);
        return (byte)(sign | code);
    }

    /// <summary>The value of a code (NaN for 0x7F and 0xFF).</summary>
    public static double Decode(byte code)
    {
        int magnitude = code & 0x7F;
        if (magnitude == 0x7F)
        {
            return double.NaN;
        }

        return (code & 0x80) != 0 ? -Magnitudes[magnitude] : Magnitudes[magnitude];
    }

    /// <summary>The scale of a group with largest magnitude <paramref name="amax"/>: amax / 448, or the smallest power of two at least that and at least 2^-126; 1 for amax 0.</summary>
    public static float Scale(float amax, bool powerOfTwo)
    {
        if (amax == 0f)
        {
            return 1f;
        }

        float scale = (float)(amax / 448.0);
        if (!powerOfTwo || float.IsInfinity(scale))
        {
            return scale;
        }

        double p = Math.Pow(2, -126);
        while (p < scale)
        {
            p *= 2;
        }

        return (float)p;
    }

    /// <summary>Quantizes a [Hidden] bf16 row (Hidden a multiple of 128) into codes and one scale per 128 channels; NaN is ignored by amax.</summary>
    public static (byte[] Codes, float[] Scales) QuantizeRow(ReadOnlySpan<BFloat16> row, bool powerOfTwo)
    {
        if (row.Length % GroupSize != 0)
        {
            throw new ArgumentException($"a row of {row.Length} channels is not a multiple of {GroupSize}", nameof(row));
        }

        byte[] codes = new byte[row.Length];
        float[] scales = new float[row.Length / GroupSize];
        for (int g = 0; g < scales.Length; g++)
        {
            double amax = 0;
            for (int i = g * GroupSize; i < (g + 1) * GroupSize; i++)
            {
                double x = row[i].ToSingle();
                if (!double.IsNaN(x))
                {
                    amax = Math.Max(amax, Math.Abs(x));
                }
            }

            scales[g] = Scale((float)amax, powerOfTwo);
            for (int i = g * GroupSize; i < (g + 1) * GroupSize; i++)
            {
                codes[i] = Encode((float)(row[i].ToSingle() / (double)scales[g]));
            }
        }

        return (codes, scales);
    }

    /// <summary>Codes 0..126 in order: subnormals m * 2^-9, then (8 + m) * 2^(e - 10) for exponent fields e = 1..15 (0x7F is NaN).</summary>
    private static double[] BuildMagnitudes()
    {
        List<double> values = [];
        for (int e = 0; e < 16; e++)
        {
            for (int m = 0; m < 8; m++)
            {
                if (e == 15 && m == 7)
                {
                    continue;
                }

                values.Add(e == 0 ? m * Math.Pow(2, -9) : (8 + m) * Math.Pow(2, e - 10));
            }
        }

        return [.. values];
    }
}

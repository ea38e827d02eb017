using EpA2A.Experts.SwiGlu;
using EpA2A.Numerics;

namespace EpA2A.Reference;

/// <summary>
/// The obvious SwiGLU expert, written independently of the experts under test: plain loops, double accumulation,
/// nothing rounded but the input (bf16 weights widened exactly). Besides y = down( silu(gate x) * (up x) ) it gives,
/// per output element, the bound <see cref="Tolerance"/> that an expert keeping EpA2A's SwiGLU numerics (see
/// <c>SwiGluExpertCompute</c>: fp32 accumulation, h rounded to bf16, the output rounded once) must stay within.
/// </summary>
/// <remarks>
/// Why the bound (first-order error analysis; u = 2^-8 is bf16's unit roundoff, 2^-24 fp32's):
/// <list type="bullet">
/// <item>The output rounded once to the token type: at most uOut |y| (2^-8 |y| for bf16).</item>
/// <item>h = silu(g) u rounded to bf16: each |dh_j| ≤ 2^-8 |h_j|, so |dy_i| ≤ 2^-8 M_i with M_i = Σ_j |D_ij| |h_j|.
/// Measured against |y| this can be much more than 2^-8: y is a sum of terms of both signs, so the bound uses M.</item>
/// <item>fp32 accumulation of the down projection (any order, e.g. SIMD or a GEMM's tiles): at most F 2^-24 M_i.</item>
/// <item>fp32 accumulation of gate and up: |dg_j| ≤ H 2^-24 Σ_k |G_jk x_k| (likewise u), carried into y through
/// |d silu / dg| ≤ 1.1 and the product: at most 1.1 H 2^-24 A_i, A_i = Σ_j |D_ij| (|u_j| Sg_j + |silu(g_j)| Su_j).</item>
/// <item>fp32 sigmoid and products (a few fp32 ulps of h): 2^-20 M_i covers them.</item>
/// </list>
/// For H, F ≤ 4096 the fp32 terms are at most 2^-12 of the absolute sums: the bf16 roundings dominate.
/// </remarks>
public static class ReferenceSwiGlu
{
    /// <summary>Applies local expert <paramref name="local"/> to <paramref name="x"/> ([Hidden]); writes y and its tolerance for an output of unit roundoff <paramref name="outputRoundoff"/>.</summary>
    public static void Apply(SwiGluWeights weights, int local, ReadOnlySpan<double> x, Span<double> y, Span<double> tolerance, double outputRoundoff)
    {
        ArgumentNullException.ThrowIfNull(weights);
        int hidden = weights.Hidden;
        int ffn = weights.Ffn;
        ReadOnlySpan<BFloat16> gate = weights.Gate(local);
        ReadOnlySpan<BFloat16> up = weights.Up(local);
        ReadOnlySpan<BFloat16> down = weights.Down(local);
        double[] h = new double[ffn];
        double[] gateSensitivity = new double[ffn];
        for (int j = 0; j < ffn; j++)
        {
            double g = 0, u = 0, gAbs = 0, uAbs = 0;
            for (int k = 0; k < hidden; k++)
            {
                double gk = gate[(j * hidden) + k].ToSingle() * x[k];
                double uk = up[(j * hidden) + k].ToSingle() * x[k];
                g += gk;
                u += uk;
                gAbs += Math.Abs(gk);
                uAbs += Math.Abs(uk);
            }

            double silu = g / (1.0 + Math.Exp(-g));
            h[j] = silu * u;
            gateSensitivity[j] = (Math.Abs(u) * gAbs) + (Math.Abs(silu) * uAbs);
        }

        for (int i = 0; i < hidden; i++)
        {
            double sum = 0, m = 0, a = 0;
            for (int j = 0; j < ffn; j++)
            {
                double d = down[(i * ffn) + j].ToSingle();
                sum += d * h[j];
                m += Math.Abs(d * h[j]);
                a += Math.Abs(d) * gateSensitivity[j];
            }

            y[i] = sum;
            tolerance[i] = Tolerance(sum, m, a, hidden, ffn, outputRoundoff);
        }
    }

    /// <summary>The bound of the remarks for one output element y with sums M and A.</summary>
    public static double Tolerance(double y, double m, double a, int hidden, int ffn, double outputRoundoff) =>
        (outputRoundoff * Math.Abs(y)) + ((Math.Pow(2, -8) + (ffn * Math.Pow(2, -24)) + Math.Pow(2, -20)) * m) + (1.1 * hidden * Math.Pow(2, -24) * a) + 1e-30;

    /// <summary>The unit roundoff of a token type: 2^-8 (bf16), 2^-11 (fp16), 2^-24 (fp32).</summary>
    public static double UnitRoundoff<T>()
        where T : unmanaged =>
        typeof(T) == typeof(BFloat16) ? Math.Pow(2, -8) : typeof(T) == typeof(Half) ? Math.Pow(2, -11) : Math.Pow(2, -24);

    /// <summary>
    /// Applies each local expert to its block of rows ([rows, Hidden], blocks given by starts and unpadded counts);
    /// returns y (exact, in double) and its tolerance for an output of type <typeparamref name="T"/>. Padding rows are zero, with a tolerance of 1e-30.
    /// </summary>
    public static (double[] Output, double[] Tolerance) ApplyToBlocks<T>(SwiGluWeights weights, ReadOnlySpan<T> rows, ReadOnlySpan<int> starts, ReadOnlySpan<int> counts)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(weights);
        int hidden = weights.Hidden;
        if (starts.Length != weights.ExpertCount || counts.Length != weights.ExpertCount)
        {
            throw new ArgumentException($"{starts.Length} block starts and {counts.Length} counts given for {weights.ExpertCount} experts", nameof(starts));
        }

        double[] output = new double[rows.Length];
        double[] tolerance = new double[rows.Length];
        Array.Fill(tolerance, 1e-30); // padding rows: zero, and nothing else
        double[] x = new double[hidden];
        double roundoff = UnitRoundoff<T>();
        for (int j = 0; j < starts.Length; j++)
        {
            for (int row = starts[j]; row < starts[j] + counts[j]; row++)
            {
                for (int k = 0; k < hidden; k++)
                {
                    x[k] = TokenConvert.ToSingle(rows[(row * hidden) + k]);
                }

                Apply(weights, j, x, output.AsSpan(row * hidden, hidden), tolerance.AsSpan(row * hidden, hidden), roundoff);
            }
        }

        return (output, tolerance);
    }
}

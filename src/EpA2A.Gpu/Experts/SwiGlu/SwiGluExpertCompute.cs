using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Layer;
using EpA2A.LowLatency;
using EpA2A.Numerics;

namespace EpA2A.Experts.SwiGlu;

/// <summary>
/// The built-in real expert on the CPU: each local expert a SwiGLU FFN, out = down( silu(gate x) * (up x) ), with
/// bf16 weights. The numerics every SwiGLU expert of EpA2A keeps (the GPU one too): gate x and up x accumulated in
/// fp32 and kept in fp32; h = silu(g) * u in fp32, rounded to bf16 (the down projection's input, as its weights);
/// down h accumulated in fp32 and rounded once to the token type. The weights are widened to fp32 once, here
/// (exact), so a step converts no weight; the scratch rows are allocated once per call, never per row.
/// </summary>
public sealed class SwiGluExpertCompute : IExpertCompute
{
    private readonly float[][] gate;
    private readonly float[][] up;
    private readonly float[][] down;

    /// <summary>Serves the experts of <paramref name="weights"/>.</summary>
    public SwiGluExpertCompute(SwiGluWeights weights)
    {
        ArgumentNullException.ThrowIfNull(weights);
        Weights = weights;
        gate = new float[weights.ExpertCount][];
        up = new float[weights.ExpertCount][];
        down = new float[weights.ExpertCount][];
        for (int j = 0; j < weights.ExpertCount; j++)
        {
            gate[j] = Widen(weights.Gate(j));
            up[j] = Widen(weights.Up(j));
            down[j] = Widen(weights.Down(j));
        }
    }

    /// <summary>The weights served.</summary>
    public SwiGluWeights Weights { get; }

    /// <inheritdoc />
    public void ValidateLayer(string layer, EpConfig config) => Weights.RequireServes(config);

    /// <inheritdoc />
    public ValueTask<Tensor<T>> ComputeAsync<T>(string layer, EpConfig config, DispatchResult<T> dispatched, CancellationToken cancellationToken)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(dispatched);
        Weights.RequireServes(config);
        ReadOnlySpan<T> rows = Dense(dispatched.Output);
        EpAllToAllLayout layout = dispatched.Layout;
        int h = Weights.Hidden;
        T[] output = new T[layout.RecvRows * h];
        Scratch scratch = new(h, Weights.Ffn);
        for (int j = 0; j < Weights.ExpertCount; j++)
        {
            cancellationToken.ThrowIfCancellationRequested();
            for (int row = layout.ExpertRowStarts[j]; row < layout.ExpertRowStarts[j] + layout.RowsPerLocalExpert[j]; row++)
            {
                TokenRows.Widen(rows.Slice(row * h, h), scratch.X);
                Apply(j, scratch);
                TokenRows.Narrow<T>(scratch.Y, output.AsSpan(row * h, h));
            }
        }

        return ValueTask.FromResult(Tensor.Create(output, [layout.RecvRows, h]));
    }

    /// <inheritdoc />
    public ValueTask<Tensor<BFloat16>> ComputeLowLatencyAsync(string layer, EpConfig config, LowLatencyDispatchResult dispatched, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(dispatched);
        Weights.RequireServes(config);
        int h = Weights.Hidden;
        int block = config.WorldSize * config.MaxTokens;
        int groups = h / Fp8E4M3.GroupSize;
        int[] counts = new int[config.ExpertsPerRank];
        dispatched.RowsPerExpert.FlattenTo(counts);
        ReadOnlySpan<BFloat16> bf16 = dispatched.Tokens is { } t ? Dense(t) : default;
        ReadOnlySpan<byte> codes = dispatched.Fp8Tokens is { } f ? Dense(f) : default;
        ReadOnlySpan<float> scales = dispatched.Scales is { } s ? Dense(s) : default;
        BFloat16[] output = new BFloat16[config.ExpertsPerRank * block * h];
        Scratch scratch = new(h, Weights.Ffn);
        for (int j = 0; j < counts.Length; j++)
        {
            cancellationToken.ThrowIfCancellationRequested();
            for (int row = j * block; row < (j * block) + counts[j]; row++)
            {
                if (bf16.IsEmpty)
                {
                    for (int x = 0; x < h; x++)
                    {
                        scratch.X[x] = Fp8E4M3.ToSingle(codes[(row * h) + x]) * scales[(row * groups) + (x / Fp8E4M3.GroupSize)];
                    }
                }
                else
                {
                    TokenRows.Widen(bf16.Slice(row * h, h), scratch.X);
                }

                Apply(j, scratch);
                TokenRows.Narrow<BFloat16>(scratch.Y, output.AsSpan(row * h, h));
            }
        }

        return ValueTask.FromResult(Tensor.Create(output, [config.ExpertsPerRank, block, h]));
    }

    /// <summary>Local expert <paramref name="local"/> on scratch.X, into scratch.Y (fp32, not yet rounded).</summary>
    private void Apply(int local, Scratch scratch)
    {
        int h = Weights.Hidden;
        int f = Weights.Ffn;
        float[] g = gate[local];
        float[] u = up[local];
        float[] d = down[local];
        ReadOnlySpan<float> x = scratch.X;
        Span<float> gx = scratch.G;
        Span<float> ux = scratch.U;
        for (int i = 0; i < f; i++)
        {
            gx[i] = TensorPrimitives.Dot(g.AsSpan(i * h, h), x);
            ux[i] = TensorPrimitives.Dot(u.AsSpan(i * h, h), x);
        }

        // h = silu(g) * u = g * sigmoid(g) * u, then rounded to bf16: the down projection's input is bf16.
        Span<float> hidden = scratch.H;
        TensorPrimitives.Sigmoid(gx, hidden);
        TensorPrimitives.Multiply(hidden, gx, hidden);
        TensorPrimitives.Multiply(hidden, ux, hidden);
        for (int i = 0; i < f; i++)
        {
            hidden[i] = BFloat16.FromSingle(hidden[i]).ToSingle();
        }

        Span<float> y = scratch.Y;
        for (int i = 0; i < h; i++)
        {
            y[i] = TensorPrimitives.Dot(d.AsSpan(i * f, f), hidden);
        }
    }

    private static float[] Widen(ReadOnlySpan<BFloat16> values)
    {
        float[] wide = new float[values.Length];
        TokenRows.Widen(values, wide);
        return wide;
    }

    /// <summary>The tensor's elements in row-major order: where they lie when it is dense, else a copy (a strided view).</summary>
    private static ReadOnlySpan<TElement> Dense<TElement>(Tensor<TElement> tensor) =>
        DenseTensor.TryGetRowMajorSpan(tensor, out ReadOnlySpan<TElement> dense) ? dense : DenseTensor.ToArray(tensor);

    /// <summary>One call's rows of fp32 scratch: the input row, gate x, up x, h and the output row.</summary>
    private sealed class Scratch(int hidden, int ffn)
    {
        public float[] X { get; } = new float[hidden];

        public float[] G { get; } = new float[ffn];

        public float[] U { get; } = new float[ffn];

        public float[] H { get; } = new float[ffn];

        public float[] Y { get; } = new float[hidden];
    }
}

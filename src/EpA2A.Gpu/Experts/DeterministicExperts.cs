using System.Numerics.Tensors;
using System.Runtime.InteropServices;
using EpA2A.Config;
using EpA2A.LowLatency;
using EpA2A.Numerics;

namespace EpA2A.Experts;

/// <summary>
/// A deterministic stand-in for real experts, used by tests, demos and `epa2a local`: expert e maps each
/// element x to x * (1 + (e mod 7) / 8) - (e mod 5) / 16, in fp32, rounded once to the token type. Every
/// expert differs, so a combine that sums the wrong rows (or copies one row for several experts) is caught.
/// </summary>
public static class DeterministicExperts
{
    /// <summary>Expert <paramref name="expert"/> applied to one value.</summary>
    public static float Apply(int expert, float x) => (x * (1f + ((expert % 7) / 8f))) - ((expert % 5) / 16f);

    /// <summary>
    /// Applies each local expert to its block of rows of a dispatch output ([rows, hidden], blocks given by
    /// starts and unpadded row counts). Padding rows are left zero.
    /// </summary>
    public static T[] ApplyToBlocks<T>(ReadOnlySpan<T> rows, int hidden, int firstExpert, ReadOnlySpan<int> starts, ReadOnlySpan<int> counts)
        where T : unmanaged
    {
        T[] output = new T[rows.Length];
        float[] wide = new float[Math.Min(rows.Length, 16 * hidden)];
        for (int j = 0; j < starts.Length; j++)
        {
            int expert = firstExpert + j;
            float scale = 1f + ((expert % 7) / 8f);
            float shift = (expert % 5) / 16f;

            // Apply's two roundings (the product, then the difference), a block of rows at a time.
            int begin = starts[j] * hidden;
            int end = (starts[j] + counts[j]) * hidden;
            for (int at = begin; at < end; at += wide.Length)
            {
                Span<float> chunk = wide.AsSpan(0, Math.Min(wide.Length, end - at));
                TokenRows.Widen(rows.Slice(at, chunk.Length), chunk);
                TokenRows.Affine(chunk, scale, shift);
                TokenRows.Narrow<T>(chunk, output.AsSpan(at, chunk.Length));
            }
        }

        return output;
    }

    /// <summary>
    /// Applies each local expert to its rows of a low-latency dispatch (bf16, or FP8 dequantized as code * scale), in the
    /// receive layout [ExpertsPerRank, WorldSize*MaxTokens, Hidden]; rows past RowsPerExpert[j] are left zero.
    /// </summary>
    public static BFloat16[] ApplyToLowLatencyBlocks(EpConfig config, LowLatencyDispatchResult dispatched)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(dispatched);
        int[] rows = new int[config.ExpertsPerRank];
        dispatched.RowsPerExpert.FlattenTo(rows);
        return ApplyToLowLatencyBlocks(
            config,
            rows,
            dispatched.Tokens is { } t ? Dense(t) : default,
            dispatched.Fp8Tokens is { } f ? Dense(f) : default,
            dispatched.Scales is { } s ? Dense(s) : default);
    }

    /// <summary>
    /// The same on flat arrays of the receive layout of rank <see cref="EpConfig.Rank"/>: bf16 rows, or (when
    /// <paramref name="bf16"/> is empty) e4m3 codes with their per-128-channel scales.
    /// </summary>
    public static BFloat16[] ApplyToLowLatencyBlocks(EpConfig config, ReadOnlySpan<int> rowsPerExpert, ReadOnlySpan<BFloat16> bf16, ReadOnlySpan<byte> codes, ReadOnlySpan<float> scales)
    {
        ArgumentNullException.ThrowIfNull(config);
        int h = config.Hidden;
        int block = config.WorldSize * config.MaxTokens;
        int groups = h / Fp8E4M3.GroupSize;
        bool fp8 = bf16.IsEmpty;
        BFloat16[] output = new BFloat16[config.ExpertsPerRank * block * h];
        for (int j = 0; j < rowsPerExpert.Length; j++)
        {
            int expert = (config.Rank * config.ExpertsPerRank) + j;
            for (int row = j * block; row < (j * block) + rowsPerExpert[j]; row++)
            {
                for (int x = 0; x < h; x++)
                {
                    int i = (row * h) + x;
                    float v = fp8 ? Fp8E4M3.ToSingle(codes[i]) * scales[(row * groups) + (x / Fp8E4M3.GroupSize)] : bf16[i].ToSingle();
                    output[i] = BFloat16.FromSingle(Apply(expert, v));
                }
            }
        }

        return output;
    }

    private static ReadOnlySpan<T> Dense<T>(Tensor<T> tensor) =>
        MemoryMarshal.CreateReadOnlySpan(ref tensor.GetPinnableReference(), (int)tensor.FlattenedLength);
}

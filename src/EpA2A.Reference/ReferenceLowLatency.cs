using EpA2A.Config;
using EpA2A.Numerics;

namespace EpA2A.Reference;

/// <summary>One rank's low-latency dispatch output, flat: rows past RowsPerExpert[j] of block j are zero.</summary>
/// <param name="Tokens">bf16 [ExpertsPerRank * WorldSize*MaxTokens * Hidden], or null for FP8.</param>
/// <param name="Fp8Tokens">e4m3 codes, same shape, or null for bf16.</param>
/// <param name="Scales">[ExpertsPerRank * WorldSize*MaxTokens * Hidden/128], or null for bf16.</param>
/// <param name="RowsPerExpert">[ExpertsPerRank].</param>
public sealed record ReferenceLowLatencyRank(BFloat16[]? Tokens, byte[]? Fp8Tokens, float[]? Scales, int[] RowsPerExpert);

/// <summary>A whole group's low-latency dispatch: every rank's output, and where each source's (token, k) landed.</summary>
/// <param name="PerRank">Each destination's output.</param>
/// <param name="Placement">Per source, per (t*TopK + k): the destination rank and its row j*WorldSize*MaxTokens + position, or (-1, -1) when dropped.</param>
public sealed record ReferenceLowLatencyStep(ReferenceLowLatencyRank[] PerRank, (int Rank, int Row)[][] Placement);

/// <summary>
/// The low-latency exchange written the obvious way, with every rank's inputs in hand: for each destination, each
/// local expert, each source in rank order, each token, each k, a matching id appends the token's row to the expert's
/// block. Combine sums each token's rows in k order in fp32 and rounds once. Independent of the backends.
/// </summary>
public static class ReferenceLowLatency
{
    /// <summary>Dispatches every rank's tokens (bf16, or FP8 through <see cref="ReferenceFp8"/>).</summary>
    public static ReferenceLowLatencyStep Dispatch(EpConfig config, IReadOnlyList<RankInput<BFloat16>> inputs, bool fp8, bool powerOfTwoScales)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(inputs);
        int w = config.WorldSize;
        int epr = config.ExpertsPerRank;
        int h = config.Hidden;
        int k = config.TopK;
        int block = w * config.MaxTokens;
        int groups = h / ReferenceFp8.GroupSize;
        if (inputs.Count != w)
        {
            throw new ArgumentException($"{inputs.Count} inputs for {w} ranks", nameof(inputs));
        }

        (int, int)[][] placement = [.. inputs.Select(i => Enumerable.Repeat((-1, -1), i.Count * k).ToArray())];
        ReferenceLowLatencyRank[] perRank = new ReferenceLowLatencyRank[w];
        for (int d = 0; d < w; d++)
        {
            BFloat16[]? tokens = fp8 ? null : new BFloat16[epr * block * h];
            byte[]? codes = fp8 ? new byte[epr * block * h] : null;
            float[]? scales = fp8 ? new float[epr * block * groups] : null;
            int[] rows = new int[epr];
            for (int j = 0; j < epr; j++)
            {
                int expert = (d * epr) + j;
                for (int s = 0; s < w; s++)
                {
                    RankInput<BFloat16> input = inputs[s];
                    for (int t = 0; t < input.Count; t++)
                    {
                        for (int kk = 0; kk < k; kk++)
                        {
                            if (input.ExpertIds[(t * k) + kk] != expert)
                            {
                                continue;
                            }

                            int row = (j * block) + rows[j]++;
                            placement[s][(t * k) + kk] = (d, row);
                            ReadOnlySpan<BFloat16> x = input.Tokens.AsSpan(t * h, h);
                            if (fp8)
                            {
                                (byte[] c, float[] sc) = ReferenceFp8.QuantizeRow(x, powerOfTwoScales);
                                c.CopyTo(codes!, row * h);
                                sc.CopyTo(scales!, row * groups);
                            }
                            else
                            {
                                x.CopyTo(tokens.AsSpan(row * h, h));
                            }
                        }
                    }
                }
            }

            perRank[d] = new ReferenceLowLatencyRank(tokens, codes, scales, rows);
        }

        return new ReferenceLowLatencyStep(perRank, placement);
    }

    /// <summary>
    /// Combines: for each source token, the sum over its non-dropped k (in k order, fp32) of weight * expert output row
    /// (weight 1 when unweighted), rounded once to bf16. <paramref name="expertOutputs"/> are per destination, flat, in
    /// the dispatch layout.
    /// </summary>
    public static BFloat16[][] Combine(EpConfig config, IReadOnlyList<RankInput<BFloat16>> inputs, ReferenceLowLatencyStep step, IReadOnlyList<BFloat16[]> expertOutputs, bool weighted)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(inputs);
        ArgumentNullException.ThrowIfNull(step);
        ArgumentNullException.ThrowIfNull(expertOutputs);
        int h = config.Hidden;
        int k = config.TopK;
        BFloat16[][] result = new BFloat16[inputs.Count][];
        for (int s = 0; s < inputs.Count; s++)
        {
            RankInput<BFloat16> input = inputs[s];
            result[s] = new BFloat16[input.Count * h];
            float[] sum = new float[h];
            for (int t = 0; t < input.Count; t++)
            {
                Array.Clear(sum);
                for (int kk = 0; kk < k; kk++)
                {
                    (int d, int row) = step.Placement[s][(t * k) + kk];
                    if (d < 0)
                    {
                        continue;
                    }

                    float weight = weighted ? input.Weights![(t * k) + kk] : 1f;
                    for (int x = 0; x < h; x++)
                    {
                        sum[x] += weight * expertOutputs[d][(row * h) + x].ToSingle();
                    }
                }

                for (int x = 0; x < h; x++)
                {
                    result[s][(t * h) + x] = BFloat16.FromSingle(sum[x]);
                }
            }
        }

        return result;
    }
}

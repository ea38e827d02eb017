using System.Collections.Concurrent;
using EpA2A.Config;
using EpA2A.Numerics;

namespace EpA2A.Reference;

/// <summary>Where every (rank, token, k) slot of a step lands, and each destination's block layout.</summary>
/// <param name="GlobalRows">Per source rank, [Count * TopK]: the global row of each slot (-1 dropped).</param>
/// <param name="RowsPerRank">Rows each rank receives, padding included.</param>
/// <param name="BaseRows">First global row of each rank (all ranks' outputs concatenated in rank order).</param>
/// <param name="RowsPerLocalExpert">Per rank, rows per local expert without padding.</param>
/// <param name="PaddedRowsPerLocalExpert">Per rank, rows per local expert rounded up to the alignment.</param>
/// <param name="ExpertRowStarts">Per rank, the first row of each local expert.</param>
/// <param name="TokensPerRank">Tokens each rank dispatched.</param>
public sealed record ReferencePlacement(
    int[][] GlobalRows,
    int[] RowsPerRank,
    int[] BaseRows,
    int[][] RowsPerLocalExpert,
    int[][] PaddedRowsPerLocalExpert,
    int[][] ExpertRowStarts,
    int[] TokensPerRank);

/// <summary>
/// The reference seen from one rank, for steps too large to hold every rank's output in every process (8 ranks
/// of 8192 x 7168 bf16 tokens at top-8 make 7.5 GB of received rows): the placement comes from every rank's expert
/// ids alone (counts, blocks by local expert then source rank, (token, k) order inside a block, or the given
/// scatter indices); then one destination's rows are gathered, or one source's tokens are combined directly from
/// an expert function, with no other rank's rows in memory. Same rules as <see cref="ReferenceAllToAll"/>.
/// </summary>
public static class ReferenceRankView
{
    /// <summary>Expert evaluations per expert from which a 65536-entry table (and parallel tokens) pays.</summary>
    private const long TableWorth = 1L << 17;

    /// <summary>Places every slot of every rank (no token is copied).</summary>
    /// <exception cref="ArgumentException">A scatter index lands outside its destination's rows.</exception>
    public static ReferencePlacement Place<T>(EpConfig config, IReadOnlyList<RankInput<T>> inputs)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(inputs);
        int world = config.WorldSize;
        int e = config.NumExperts;
        int epr = config.ExpertsPerRank;
        bool scattered = inputs.All(i => i.ScatterIndices is not null);
        int alignment = scattered ? 1 : config.ExpertAlignment;

        // counts[s * E + expert]: non-dropped slots of source s for expert.
        int[] counts = new int[world * e];
        for (int s = 0; s < world; s++)
        {
            foreach (int id in inputs[s].ExpertIds)
            {
                if (id != e)
                {
                    counts[(s * e) + id]++;
                }
            }
        }

        int[][] rows = new int[world][];
        int[][] padded = new int[world][];
        int[][] starts = new int[world][];
        int[] total = new int[world];
        int[] bases = new int[world];
        for (int d = 0; d < world; d++)
        {
            rows[d] = new int[epr];
            padded[d] = new int[epr];
            starts[d] = new int[epr];
            int next = 0;
            for (int j = 0; j < epr; j++)
            {
                for (int s = 0; s < world; s++)
                {
                    rows[d][j] += counts[(s * e) + (d * epr) + j];
                }

                padded[d][j] = (rows[d][j] + alignment - 1) / alignment * alignment;
                starts[d][j] = next;
                next += padded[d][j];
            }

            total[d] = next;
            bases[d] = d == 0 ? 0 : bases[d - 1] + total[d - 1];
        }

        int[][] global = new int[world][];
        int[] before = new int[e]; // slots of earlier sources per expert
        for (int s = 0; s < world; s++)
        {
            RankInput<T> input = inputs[s];
            int[] g = new int[input.ExpertIds.Length];
            int[] mine = new int[e];
            for (int i = 0; i < g.Length; i++)
            {
                int id = input.ExpertIds[i];
                if (id == e)
                {
                    g[i] = -1;
                    continue;
                }

                int d = id / epr;
                if (scattered)
                {
                    int row = input.ScatterIndices![i];
                    if (row < bases[d] || row >= bases[d] + total[d])
                    {
                        throw new ArgumentException($"rank {s} scatter index {row} at slot {i} is outside rank {d}'s rows [{bases[d]}, {bases[d] + total[d]})", nameof(inputs));
                    }

                    g[i] = row;
                }
                else
                {
                    g[i] = bases[d] + starts[d][id - (d * epr)] + before[id] + mine[id]++;
                }
            }

            for (int x = 0; x < e; x++)
            {
                before[x] += counts[(s * e) + x];
            }

            global[s] = g;
        }

        return new ReferencePlacement(global, total, bases, rows, padded, starts, [.. inputs.Select(i => i.Count)]);
    }

    /// <summary>What <paramref name="rank"/> receives: its rows (padding zero) and, when every rank gave them, weights.</summary>
    public static ReferenceDispatch<T> DispatchTo<T>(EpConfig config, IReadOnlyList<RankInput<T>> inputs, ReferencePlacement placement, int rank)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(inputs);
        ArgumentNullException.ThrowIfNull(placement);
        int hidden = config.Hidden;
        int k = config.TopK;
        int rows = placement.RowsPerRank[rank];
        int first = placement.BaseRows[rank];
        bool weighted = inputs.All(i => i.Weights is not null);
        T[] output = new T[(long)rows * hidden];
        float[]? weights = weighted ? new float[rows] : null;

        // Every row has one source slot, so the sources can fill the output side by side.
        Parallel.For(0, inputs.Count, s =>
        {
            int[] g = placement.GlobalRows[s];
            for (int i = 0; i < g.Length; i++)
            {
                int row = g[i] - first;
                if (g[i] < 0 || row < 0 || row >= rows)
                {
                    continue;
                }

                inputs[s].Tokens.AsSpan(i / k * hidden, hidden).CopyTo(output.AsSpan(row * hidden, hidden));
                if (weights is not null)
                {
                    weights[row] = inputs[s].Weights![i];
                }
            }
        });

        return new ReferenceDispatch<T>(output, rows, weights, placement.RowsPerLocalExpert[rank], placement.PaddedRowsPerLocalExpert[rank], placement.ExpertRowStarts[rank]);
    }

    /// <summary>
    /// The combine result of source <paramref name="rank"/> when each destination runs its local expert j on the rows of
    /// block j (as the layout describes them) and expert e maps each element x to <paramref name="expert"/>(e, x), rounded to
    /// <typeparamref name="T"/>: for each token, the fp32 sum in k order of its non-dropped slots' outputs (each times its
    /// weight when <paramref name="weighted"/>), rounded once. Without scatter indices a slot's row lies in its own
    /// expert's block; with them, in whichever block the index put it.
    /// </summary>
    public static T[] CombineFor<T>(EpConfig config, IReadOnlyList<RankInput<T>> inputs, ReferencePlacement placement, int rank, Func<int, float, float> expert, bool weighted)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(inputs);
        ArgumentNullException.ThrowIfNull(placement);
        ArgumentNullException.ThrowIfNull(expert);
        RankInput<T> input = inputs[rank];
        if (weighted && input.Weights is null)
        {
            throw new ArgumentException("a weighted combine needs weights", nameof(inputs));
        }

        int hidden = config.Hidden;
        int k = config.TopK;
        int epr = config.ExpertsPerRank;
        T[] result = new T[(long)input.Count * hidden];

        // Large steps (billions of expert evaluations) tabulate each expert once per 16-bit input value
        // (TokenTable: the same bits as calling it) and run the tokens in parallel; the sum per token is unchanged.
        long evaluations = (long)input.Count * k * hidden;
        bool large = evaluations >= TableWorth * config.NumExperts;
        TokenTable<T>?[] tables = new TokenTable<T>?[config.NumExperts];
        bool tabulate = large && TokenTable.Supports<T>();
        if (tabulate)
        {
            Parallel.For(0, config.NumExperts, e => tables[e] = new TokenTable<T>(x => expert(e, x)));
        }

        void Tokens(int from, int to, float[] acc)
        {
            for (int t = from; t < to; t++)
            {
                Array.Clear(acc);
                ReadOnlySpan<T> token = input.Tokens.AsSpan(t * hidden, hidden);
                for (int j = 0; j < k; j++)
                {
                    int slot = (t * k) + j;
                    if (input.ExpertIds[slot] == config.NumExperts)
                    {
                        continue;
                    }

                    int e = ExpertOfRow(placement, epr, placement.GlobalRows[rank][slot]);
                    float scale = weighted ? input.Weights![slot] : 1f;
                    if (tables[e] is { } table)
                    {
                        for (int h = 0; h < hidden; h++)
                        {
                            acc[h] += TokenConvert.ToSingle(table.Apply(token[h])) * scale;
                        }

                        continue;
                    }

                    for (int h = 0; h < hidden; h++)
                    {
                        T y = TokenConvert.FromSingle<T>(expert(e, TokenConvert.ToSingle(token[h])));
                        acc[h] += TokenConvert.ToSingle(y) * scale;
                    }
                }

                TokenConvert.Round<T>(acc, result.AsSpan(t * hidden, hidden));
            }
        }

        if (!large)
        {
            Tokens(0, input.Count, new float[hidden]);
            return result;
        }

        Parallel.ForEach(
            Partitioner.Create(0, input.Count, Math.Max(4, 16384 / Math.Max(1, hidden))),
            () => new float[hidden],
            (range, _, acc) =>
            {
                Tokens(range.Item1, range.Item2, acc);
                return acc;
            },
            _ => { });
        return result;
    }

    /// <summary>The expert whose block holds global row <paramref name="global"/>.</summary>
    private static int ExpertOfRow(ReferencePlacement placement, int epr, int global)
    {
        int d = placement.BaseRows.Length - 1;
        while (placement.BaseRows[d] > global)
        {
            d--;
        }

        int row = global - placement.BaseRows[d];
        int[] starts = placement.ExpertRowStarts[d];
        int j = epr - 1;
        while (starts[j] > row)
        {
            j--;
        }

        return (d * epr) + j;
    }
}

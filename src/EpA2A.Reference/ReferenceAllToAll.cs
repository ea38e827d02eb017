using EpA2A.Config;
using EpA2A.Numerics;

namespace EpA2A.Reference;

/// <summary>
/// The obvious sort-and-exchange all-to-all, with every rank's arrays in hand: each source stable-sorts its
/// (token, k) slots by expert, the ranks exchange counts, each source sends each destination the contiguous
/// run of its sorted slots whose experts live there (an uneven all-to-all), and each destination reorders
/// what it got into (local expert, source rank, token, k) order. Combine walks the reverse path and sums
/// over top-k. Slow and plain on purpose: tests and <c>epa2a local</c> compare the real backends against it.
/// </summary>
public static class ReferenceAllToAll
{
    /// <summary>Dispatches every rank's tokens to the ranks that hold their experts.</summary>
    /// <remarks>
    /// <paramref name="config"/>'s Rank is ignored. Scatter indices are used only when every rank gives
    /// them, and then there is no padding; weights travel only when every rank gives them.
    /// </remarks>
    /// <exception cref="ArgumentException">An input's shape or an expert id is wrong, or a scatter index lands outside its rank.</exception>
    public static ReferenceStep<T> Dispatch<T>(EpConfig config, IReadOnlyList<RankInput<T>> inputs)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(config);
        CheckInputs(config, inputs);

        int world = config.WorldSize;
        int expertsPerRank = config.ExpertsPerRank;
        bool scattered = inputs.All(i => i.ScatterIndices is not null);
        bool weighted = inputs.All(i => i.Weights is not null);
        int alignment = scattered ? 1 : config.ExpertAlignment;

        // 1. Each source rank sorts its slots by expert, stably: ties stay in (token, k) order.
        SortedSlots[] sorted = [.. inputs.Select(input => SortByExpert(config, input))];

        // 2. Exchange of counts: every destination learns how many rows each source sends each local expert,
        //    which fixes its block layout and, summed over ranks, every rank's base row.
        ExpertBlocks[] layouts = new ExpertBlocks[world];
        for (int d = 0; d < world; d++)
        {
            int[] rowsPerExpert = new int[expertsPerRank];
            for (int le = 0; le < expertsPerRank; le++)
            {
                int expert = (d * expertsPerRank) + le;
                for (int s = 0; s < world; s++)
                {
                    rowsPerExpert[le] += sorted[s].CountOf(expert);
                }
            }

            layouts[d] = ExpertBlocks.Of(rowsPerExpert, alignment);
        }

        int[] baseRow = new int[world];
        for (int d = 1; d < world; d++)
        {
            baseRow[d] = baseRow[d - 1] + layouts[d - 1].TotalRows;
        }

        // 3 and 4. Uneven all-to-all, then reorder on each destination. Source s's run for destination d is its
        //    sorted slots whose expert is on d; within it, one expert's slots are contiguous, in (token, k) order.
        int hidden = config.Hidden;
        int topK = config.TopK;
        int[][] globalRows = [.. inputs.Select(i => Filled(i.Count * topK, -1))];
        ReferenceDispatch<T>[] perRank = new ReferenceDispatch<T>[world];
        for (int d = 0; d < world; d++)
        {
            ExpertBlocks blocks = layouts[d];
            T[] output = new T[blocks.TotalRows * hidden];
            float[]? weights = weighted ? new float[blocks.TotalRows] : null;
            for (int le = 0; le < expertsPerRank; le++)
            {
                int expert = (d * expertsPerRank) + le;
                int next = blocks.Starts[le];
                for (int s = 0; s < world; s++)
                {
                    RankInput<T> source = inputs[s];
                    foreach (int slot in sorted[s].SlotsOf(expert))
                    {
                        int row = scattered ? ScatteredRow(source, s, slot, baseRow[d], blocks.TotalRows) : next++;
                        int token = slot / topK;
                        source.Tokens.AsSpan(token * hidden, hidden).CopyTo(output.AsSpan(row * hidden, hidden));
                        if (weights is not null)
                        {
                            weights[row] = source.Weights![slot];
                        }

                        // The return address combine needs, reported back to the source.
                        globalRows[s][slot] = baseRow[d] + row;
                    }
                }
            }

            perRank[d] = new ReferenceDispatch<T>(output, blocks.TotalRows, weights, blocks.Rows, blocks.PaddedRows, blocks.Starts);
        }

        return new ReferenceStep<T>(perRank, globalRows, [.. inputs.Select(i => i.Count)]);
    }

    /// <summary>
    /// Brings every rank's expert outputs back to the tokens they came from: token t of rank s gets the sum,
    /// in k order and in fp32, of the rows its non-dropped slots landed on (each times its routing weight when
    /// <paramref name="weighted"/>), rounded once to <typeparamref name="T"/>. A token with every slot dropped gets zeros.
    /// </summary>
    /// <param name="config">The group's configuration (Rank is ignored).</param>
    /// <param name="inputs">The inputs <paramref name="step"/> was dispatched from.</param>
    /// <param name="step">The dispatch to reverse.</param>
    /// <param name="expertOutputs">Per rank, [Rows, Hidden]: what its experts made of its received rows.</param>
    /// <param name="weighted">Multiply each row by its routing weight (every rank must have weights).</param>
    /// <returns>Per rank, [Count, Hidden].</returns>
    /// <exception cref="ArgumentException">A shape does not match the step, or weights are missing for a weighted combine.</exception>
    public static T[][] Combine<T>(
        EpConfig config,
        IReadOnlyList<RankInput<T>> inputs,
        ReferenceStep<T> step,
        IReadOnlyList<T[]> expertOutputs,
        bool weighted)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(step);
        ArgumentNullException.ThrowIfNull(expertOutputs);
        CheckInputs(config, inputs);

        int world = config.WorldSize;
        int hidden = config.Hidden;
        int topK = config.TopK;
        if (step.PerRank.Length != world || expertOutputs.Count != world)
        {
            throw new ArgumentException($"step has {step.PerRank.Length} ranks and expertOutputs {expertOutputs.Count}; WorldSize is {world}", nameof(expertOutputs));
        }

        int[] baseRow = new int[world];
        for (int d = 0; d < world; d++)
        {
            int rows = step.PerRank[d].Rows;
            if (expertOutputs[d].Length != rows * hidden)
            {
                throw new ArgumentException($"expertOutputs[{d}] has {expertOutputs[d].Length} elements; rank {d} received {rows} rows of {hidden}", nameof(expertOutputs));
            }

            if (d > 0)
            {
                baseRow[d] = baseRow[d - 1] + step.PerRank[d - 1].Rows;
            }
        }

        T[][] results = new T[world][];
        float[] acc = new float[hidden];
        for (int s = 0; s < world; s++)
        {
            RankInput<T> input = inputs[s];
            if (weighted && input.Weights is null)
            {
                throw new ArgumentException($"a weighted combine needs weights, and rank {s} dispatched none", nameof(inputs));
            }

            if (step.GlobalScatterIndices[s].Length != input.Count * topK)
            {
                throw new ArgumentException($"step's scatter indices for rank {s} do not match its {input.Count} tokens", nameof(step));
            }

            T[] result = new T[input.Count * hidden];
            for (int t = 0; t < input.Count; t++)
            {
                Array.Clear(acc);
                for (int k = 0; k < topK; k++)
                {
                    int slot = (t * topK) + k;
                    int expert = input.ExpertIds[slot];
                    if (expert == config.NumExperts)
                    {
                        continue;
                    }

                    int d = config.RankOfExpert(expert);
                    int row = step.GlobalScatterIndices[s][slot] - baseRow[d];
                    float scale = weighted ? input.Weights![slot] : 1f;
                    TokenConvert.Accumulate<T>(expertOutputs[d].AsSpan(row * hidden, hidden), acc, scale);
                }

                TokenConvert.Round<T>(acc, result.AsSpan(t * hidden, hidden));
            }

            results[s] = result;
        }

        return results;
    }

    private static int ScatteredRow<T>(RankInput<T> source, int sourceRank, int slot, int baseRow, int rows)
        where T : unmanaged
    {
        int global = source.ScatterIndices![slot];
        int row = global - baseRow;
        if (row < 0 || row >= rows)
        {
            throw new ArgumentException($"rank {sourceRank} scatter index {global} at slot {slot} is outside its destination's rows [{baseRow}, {baseRow + rows})");
        }

        return row;
    }

    private static SortedSlots SortByExpert<T>(EpConfig config, RankInput<T> input)
        where T : unmanaged
    {
        // A counting sort: stable, so equal experts keep (token, k) order. Dropped slots are left out.
        int numExperts = config.NumExperts;
        int[] starts = new int[numExperts + 1];
        foreach (int expert in input.ExpertIds)
        {
            if (expert != numExperts)
            {
                starts[expert + 1]++;
            }
        }

        for (int e = 0; e < numExperts; e++)
        {
            starts[e + 1] += starts[e];
        }

        int[] slots = new int[starts[numExperts]];
        int[] next = (int[])starts.Clone();
        for (int slot = 0; slot < input.ExpertIds.Length; slot++)
        {
            int expert = input.ExpertIds[slot];
            if (expert != numExperts)
            {
                slots[next[expert]++] = slot;
            }
        }

        return new SortedSlots(slots, starts);
    }

    private static void CheckInputs<T>(EpConfig config, IReadOnlyList<RankInput<T>> inputs)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(inputs);
        if (inputs.Count != config.WorldSize)
        {
            throw new ArgumentException($"{inputs.Count} rank inputs given; WorldSize is {config.WorldSize}", nameof(inputs));
        }

        for (int r = 0; r < inputs.Count; r++)
        {
            RankInput<T> input = inputs[r];
            int slots = input.Count * config.TopK;
            if (input.Count < 0
                || input.Tokens.Length != input.Count * config.Hidden
                || input.ExpertIds.Length != slots
                || (input.Weights is not null && input.Weights.Length != slots)
                || (input.ScatterIndices is not null && input.ScatterIndices.Length != slots))
            {
                throw new ArgumentException($"rank {r}: {input.Count} tokens need {input.Count * config.Hidden} token elements and {slots} ids, weights and scatter indices", nameof(inputs));
            }

            foreach (int expert in input.ExpertIds)
            {
                if ((uint)expert > (uint)config.NumExperts)
                {
                    throw new ArgumentException($"rank {r}: expert id {expert} is outside [0, NumExperts={config.NumExperts}]", nameof(inputs));
                }
            }
        }
    }

    private static int[] Filled(int length, int value)
    {
        int[] a = new int[length];
        Array.Fill(a, value);
        return a;
    }

    /// <summary>One source's non-dropped slots (token * TopK + k) sorted by expert; expert e's are Slots[Starts[e]..Starts[e+1]).</summary>
    private sealed record SortedSlots(int[] Slots, int[] Starts)
    {
        public int CountOf(int expert) => Starts[expert + 1] - Starts[expert];

        public ArraySegment<int> SlotsOf(int expert) => new(Slots, Starts[expert], CountOf(expert));
    }

    /// <summary>A destination's row blocks, one per local expert, each starting at a multiple of the alignment.</summary>
    private sealed record ExpertBlocks(int[] Rows, int[] PaddedRows, int[] Starts, int TotalRows)
    {
        public static ExpertBlocks Of(int[] rows, int alignment)
        {
            int[] padded = [.. rows.Select(n => (n + alignment - 1) / alignment * alignment)];
            int[] starts = new int[rows.Length];
            for (int le = 1; le < rows.Length; le++)
            {
                starts[le] = starts[le - 1] + padded[le - 1];
            }

            return new ExpertBlocks(rows, padded, starts, padded.Sum());
        }
    }
}

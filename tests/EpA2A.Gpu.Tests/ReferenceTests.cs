using EpA2A.Config;
using EpA2A.Numerics;
using EpA2A.Reference;

using Xunit;

namespace EpA2A.Tests;

/// <summary>
/// Pins the reference down on a case small enough to work out by hand: 2 ranks, 4 experts (0-1 on rank 0,
/// 2-3 on rank 1), top-2, hidden 2, 3 tokens per rank, one dropped slot.
/// <code>
/// rank 0: t0 [ 1, 2] -> (3, 0)   t1 [ 3, 4] -> (1, dropped)   t2 [ 5, 6] -> (0, 2)
/// rank 1: t0 [-1,-2] -> (2, 1)   t1 [-3,-4] -> (0, 3)         t2 [-5,-6] -> (3, 2)
/// </code>
/// </summary>
public sealed class ReferenceTests
{
    private const int Dropped = 4;

    private static readonly float[][] Weights =
    [
        [0.5f, 0.25f, 0.75f, 0.125f, 1.0f, 0.375f],
        [0.625f, 0.875f, 0.5f, 0.25f, 0.125f, 0.75f],
    ];

    [Fact]
    public void Dispatch_orders_rows_by_local_expert_then_source_rank_then_token()
    {
        ReferenceStep<float> step = ReferenceAllToAll.Dispatch(Config(alignment: 1), Inputs(withWeights: true));

        // Rank 0: expert 0 gets s0t0k1, s0t2k0, s1t1k0; expert 1 gets s0t1k0, s1t0k1.
        ReferenceDispatch<float> r0 = step.PerRank[0];
        Assert.Equal(5, r0.Rows);
        Assert.Equal([1, 2, 5, 6, -3, -4, 3, 4, -1, -2], r0.Output);
        Assert.NotNull(r0.Weights);
        Assert.Equal([0.25f, 1.0f, 0.5f, 0.75f, 0.875f], r0.Weights);
        Assert.Equal([3, 2], r0.RowsPerLocalExpert);
        Assert.Equal([3, 2], r0.PaddedRowsPerLocalExpert);
        Assert.Equal([0, 3], r0.ExpertRowStarts);

        // Rank 1: expert 2 gets s0t2k1, s1t0k0, s1t2k1; expert 3 gets s0t0k0, s1t1k1, s1t2k0 (expert before k).
        ReferenceDispatch<float> r1 = step.PerRank[1];
        Assert.Equal(6, r1.Rows);
        Assert.Equal([5, 6, -1, -2, -5, -6, 1, 2, -3, -4, -5, -6], r1.Output);
        Assert.NotNull(r1.Weights);
        Assert.Equal([0.375f, 0.625f, 0.75f, 0.5f, 0.25f, 0.125f], r1.Weights);
        Assert.Equal([3, 3], r1.RowsPerLocalExpert);
        Assert.Equal([0, 3], r1.ExpertRowStarts);

        Assert.Equal([8, 0, 3, -1, 1, 5], step.GlobalScatterIndices[0]);
        Assert.Equal([6, 4, 2, 9, 10, 7], step.GlobalScatterIndices[1]);
        Assert.Equal([3, 3], step.TokensPerSourceRank);
    }

    [Fact]
    public void Dispatch_pads_each_expert_block_to_the_alignment_with_zero_rows()
    {
        ReferenceStep<float> step = ReferenceAllToAll.Dispatch(Config(alignment: 4), Inputs(withWeights: true));

        ReferenceDispatch<float> r0 = step.PerRank[0];
        Assert.Equal(8, r0.Rows);
        Assert.Equal([1, 2, 5, 6, -3, -4, 0, 0, 3, 4, -1, -2, 0, 0, 0, 0], r0.Output);
        Assert.NotNull(r0.Weights);
        Assert.Equal([0.25f, 1.0f, 0.5f, 0f, 0.75f, 0.875f, 0f, 0f], r0.Weights);
        Assert.Equal([3, 2], r0.RowsPerLocalExpert);
        Assert.Equal([4, 4], r0.PaddedRowsPerLocalExpert);
        Assert.Equal([0, 4], r0.ExpertRowStarts);

        ReferenceDispatch<float> r1 = step.PerRank[1];
        Assert.Equal(8, r1.Rows);
        Assert.Equal([5, 6, -1, -2, -5, -6, 0, 0, 1, 2, -3, -4, -5, -6, 0, 0], r1.Output);

        // Global rows count the padding: rank 1 starts at row 8.
        Assert.Equal([12, 0, 4, -1, 1, 8], step.GlobalScatterIndices[0]);
        Assert.Equal([9, 5, 2, 13, 14, 10], step.GlobalScatterIndices[1]);
    }

    [Fact]
    public void Dispatch_without_weights_on_every_rank_returns_no_weights()
    {
        RankInput<float>[] inputs = Inputs(withWeights: true);
        inputs[1] = inputs[1] with { Weights = null };

        ReferenceStep<float> step = ReferenceAllToAll.Dispatch(Config(alignment: 1), inputs);

        Assert.All(step.PerRank, r => Assert.Null(r.Weights));
    }

    [Fact]
    public void Dispatch_with_scatter_indices_places_each_row_where_its_index_says_and_ignores_alignment()
    {
        // Reverse each rank's rows: rank 0 holds global rows [0, 5), rank 1 [5, 11).
        int[][] reversed =
        [
            [5 + (10 - 8), 4 - 0, 4 - 3, -1, 4 - 1, 5 + (10 - 5)],
            [5 + (10 - 6), 4 - 4, 4 - 2, 5 + (10 - 9), 5 + (10 - 10), 5 + (10 - 7)],
        ];
        RankInput<float>[] inputs = WithScatter(Inputs(withWeights: true), reversed);

        ReferenceStep<float> step = ReferenceAllToAll.Dispatch(Config(alignment: 4), inputs);

        ReferenceDispatch<float> r0 = step.PerRank[0];
        Assert.Equal([-1, -2, 3, 4, -3, -4, 5, 6, 1, 2], r0.Output);
        Assert.NotNull(r0.Weights);
        Assert.Equal([0.875f, 0.75f, 0.5f, 1.0f, 0.25f], r0.Weights);
        Assert.Equal([3, 2], r0.PaddedRowsPerLocalExpert);
        Assert.Equal([-5, -6, -3, -4, 1, 2, -5, -6, -1, -2, 5, 6], step.PerRank[1].Output);
        Assert.Equal(reversed, step.GlobalScatterIndices);
    }

    [Fact]
    public void Dispatch_fed_its_own_global_scatter_indices_reproduces_itself()
    {
        EpConfig config = Config(alignment: 1);
        ReferenceStep<float> first = ReferenceAllToAll.Dispatch(config, Inputs(withWeights: true));

        ReferenceStep<float> again = ReferenceAllToAll.Dispatch(config, WithScatter(Inputs(withWeights: true), first.GlobalScatterIndices));

        for (int d = 0; d < 2; d++)
        {
            Assert.Equal(first.PerRank[d].Output, again.PerRank[d].Output);
            Assert.Equal(first.PerRank[d].Weights, again.PerRank[d].Weights);
        }

        Assert.Equal(first.GlobalScatterIndices, again.GlobalScatterIndices);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(4)]
    public void Combine_unweighted_sums_each_tokens_expert_outputs_over_k(int alignment)
    {
        EpConfig config = Config(alignment);
        RankInput<float>[] inputs = Inputs(withWeights: true);
        ReferenceStep<float> step = ReferenceAllToAll.Dispatch(config, inputs);

        float[][] combined = ReferenceAllToAll.Combine(config, inputs, step, ApplyExperts(step), weighted: false);

        // Expert e multiplies by e + 1: rank 0's t0 = 4*[1,2] + 1*[1,2]; t1 = 2*[3,4] (k1 dropped); t2 = 1*[5,6] + 3*[5,6].
        Assert.Equal([5, 10, 6, 8, 20, 24], combined[0]);
        Assert.Equal([-5, -10, -15, -20, -35, -42], combined[1]);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(4)]
    public void Combine_weighted_scales_each_row_by_its_routing_weight(int alignment)
    {
        EpConfig config = Config(alignment);
        RankInput<float>[] inputs = Inputs(withWeights: true);
        ReferenceStep<float> step = ReferenceAllToAll.Dispatch(config, inputs);

        float[][] combined = ReferenceAllToAll.Combine(config, inputs, step, ApplyExperts(step), weighted: true);

        // Rank 0: t0 = 4*0.5 + 1*0.25 = 2.25; t1 = 2*0.75 = 1.5; t2 = 1*1.0 + 3*0.375 = 2.125 (times the token).
        Assert.Equal([2.25f, 4.5f, 4.5f, 6f, 10.625f, 12.75f], combined[0]);
        Assert.Equal([-3.625f, -7.25f, -4.5f, -6f, -13.75f, -16.5f], combined[1]);
    }

    [Fact]
    public void Combine_gives_zeros_to_a_token_whose_slots_are_all_dropped()
    {
        EpConfig config = Config(alignment: 1);
        RankInput<float>[] inputs = Inputs(withWeights: false);
        inputs[0].ExpertIds[0] = Dropped;
        inputs[0].ExpertIds[1] = Dropped;
        ReferenceStep<float> step = ReferenceAllToAll.Dispatch(config, inputs);

        float[][] combined = ReferenceAllToAll.Combine(config, inputs, step, ApplyExperts(step), weighted: false);

        Assert.Equal([0, 0, 6, 8, 20, 24], combined[0]);
        Assert.Equal(-1, step.GlobalScatterIndices[0][0]);
        Assert.Equal(4, step.PerRank[0].Rows);
    }

    [Fact]
    public void Combine_accumulates_in_fp32_and_rounds_to_bfloat16_once()
    {
        // One token on three experts whose outputs are 1, 2^-8 and 2^-8: rounding after each add would stay at 1.
        EpConfig config = new(maxTokens: 1, hidden: 1, topK: 3, numExperts: 3, rank: 0, worldSize: 1, localWorldSize: 1);
        RankInput<BFloat16>[] inputs = [new([BFloat16.FromSingle(1f)], 1, [0, 1, 2], null, null)];
        ReferenceStep<BFloat16> step = ReferenceAllToAll.Dispatch(config, inputs);
        BFloat16 small = BFloat16.FromSingle(1f / 256);

        BFloat16[][] combined = ReferenceAllToAll.Combine(config, inputs, step, [[BFloat16.FromSingle(1f), small, small]], weighted: false);

        Assert.Equal(1f + (1f / 128), combined[0][0].ToSingle());
    }

    [Fact]
    public void Random_dispatch_puts_every_kept_slot_on_its_experts_block_holding_its_token()
    {
        int seed = Random.Shared.Next();
        EpConfig config = new(maxTokens: 64, hidden: 8, topK: 4, numExperts: 16, rank: 0, worldSize: 4, localWorldSize: 4, expertAlignment: 8);
        Random rng = new(seed);
        int[] counts = [.. Enumerable.Range(0, 4).Select(_ => rng.Next(0, 65))];
        RankInput<BFloat16>[] inputs = RoutingGenerator.Draw<BFloat16>(config, counts, dropRatio: 0.3, skewed: true, withWeights: true, rng);

        ReferenceStep<BFloat16> step = ReferenceAllToAll.Dispatch(config, inputs);

        int[] baseRow = [0, step.PerRank[0].Rows, step.PerRank[0].Rows + step.PerRank[1].Rows, step.PerRank[0].Rows + step.PerRank[1].Rows + step.PerRank[2].Rows];
        int landed = 0;
        for (int s = 0; s < 4; s++)
        {
            RankInput<BFloat16> input = inputs[s];
            for (int t = 0; t < input.Count; t++)
            {
                int[] experts = input.ExpertIds[(t * 4)..((t + 1) * 4)];
                Assert.True(experts.Where(e => e != 16).Distinct().Count() == experts.Count(e => e != 16), $"seed {seed}: repeated expert");
                Assert.True(input.Tokens.AsSpan(t * 8, 8).IndexOf(default(BFloat16)) < 0, $"seed {seed}: zero token element");
                for (int k = 0; k < 4; k++)
                {
                    int slot = (t * 4) + k;
                    int expert = input.ExpertIds[slot];
                    int global = step.GlobalScatterIndices[s][slot];
                    if (expert == 16)
                    {
                        Assert.True(global == -1, $"seed {seed}: dropped slot landed");
                        continue;
                    }

                    int d = expert / 4;
                    int row = global - baseRow[d];
                    ReferenceDispatch<BFloat16> r = step.PerRank[d];
                    int block = r.ExpertRowStarts[expert % 4];
                    Assert.True(row >= block && row < block + r.RowsPerLocalExpert[expert % 4], $"seed {seed}: row {row} outside expert {expert}'s block");
                    Assert.True(r.Output.AsSpan(row * 8, 8).SequenceEqual(input.Tokens.AsSpan(t * 8, 8)), $"seed {seed}: wrong token in row {row}");
                    Assert.True(r.Weights![row] == input.Weights![slot], $"seed {seed}: wrong weight in row {row}");
                    landed++;
                }
            }
        }

        int kept = inputs.Sum(i => i.ExpertIds.Count(e => e != 16));
        Assert.True(landed == kept && step.PerRank.Sum(r => r.RowsPerLocalExpert.Sum()) == kept, $"seed {seed}: {kept} kept slots, {landed} landed");
        Assert.All(step.PerRank, r => Assert.All(r.PaddedRowsPerLocalExpert, n => Assert.Equal(0, n % 8)));
    }

    private static EpConfig Config(int alignment) =>
        new(maxTokens: 3, hidden: 2, topK: 2, numExperts: 4, rank: 0, worldSize: 2, localWorldSize: 2, tokenType: TokenType.Float32, expertAlignment: alignment);

    private static RankInput<float>[] Inputs(bool withWeights) =>
    [
        new([1, 2, 3, 4, 5, 6], 3, [3, 0, 1, Dropped, 0, 2], withWeights ? Weights[0] : null, null),
        new([-1, -2, -3, -4, -5, -6], 3, [2, 1, 0, 3, 3, 2], withWeights ? Weights[1] : null, null),
    ];

    private static RankInput<float>[] WithScatter(RankInput<float>[] inputs, int[][] scatter) =>
        [.. inputs.Select((input, r) => input with { ScatterIndices = scatter[r] })];

    /// <summary>Runs every rank's experts: expert e multiplies its rows by e + 1; padding rows become 99 (combine must ignore them).</summary>
    private static float[][] ApplyExperts(ReferenceStep<float> step)
    {
        float[][] outputs = new float[step.PerRank.Length][];
        for (int d = 0; d < step.PerRank.Length; d++)
        {
            ReferenceDispatch<float> r = step.PerRank[d];
            float[] output = new float[r.Output.Length];
            Array.Fill(output, 99f);
            for (int le = 0; le < r.RowsPerLocalExpert.Length; le++)
            {
                int expert = (d * r.RowsPerLocalExpert.Length) + le;
                for (int row = r.ExpertRowStarts[le]; row < r.ExpertRowStarts[le] + r.RowsPerLocalExpert[le]; row++)
                {
                    for (int h = 0; h < 2; h++)
                    {
                        output[(row * 2) + h] = r.Output[(row * 2) + h] * (expert + 1);
                    }
                }
            }

            outputs[d] = output;
        }

        return outputs;
    }
}

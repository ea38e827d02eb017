using EpA2A.Config;
using EpA2A.Experts;
using EpA2A.Numerics;
using EpA2A.Reference;

namespace EpA2A.Tests;

/// <summary>
/// The per-rank reference (what `epa2a-tools gpu-check` checks each rank process against when every rank's output would
/// not fit in every process) must say exactly what the whole-group reference says.
/// </summary>
public sealed class ReferenceRankViewTests
{
    [Theory]
    [InlineData(4, 4, 16, 4, 1, 0.2, false, false)]
    [InlineData(4, 2, 16, 3, 8, 0.0, true, false)]
    [InlineData(8, 8, 32, 6, 1, 0.3, false, true)]
    [InlineData(3, 3, 9, 2, 4, 0.5, true, false)]
    public void Every_rank_view_equals_the_whole_group_reference(int world, int local, int experts, int topK, int alignment, double drop, bool skewed, bool scatter)
    {
        int seed = Random.Shared.Next();
        Random rng = new(seed);
        EpConfig config = new(64, 48, topK, experts, 0, world, local, expertAlignment: scatter ? 1 : alignment);
        int[] counts = [.. Enumerable.Range(0, world).Select(_ => rng.Next(0, 65))];
        RankInput<BFloat16>[] inputs = RoutingGenerator.Draw<BFloat16>(config, counts, drop, skewed, withWeights: true, rng);
        if (scatter)
        {
            inputs = StepHarness.WithShuffledScatter(config, inputs, rng);
        }

        ReferenceStep<BFloat16> whole = ReferenceAllToAll.Dispatch(config, inputs);
        ReferencePlacement place = ReferenceRankView.Place(config, inputs);
        BFloat16[][] expertOut = new BFloat16[world][];
        for (int r = 0; r < world; r++)
        {
            ReferenceDispatch<BFloat16> want = whole.PerRank[r];
            ReferenceDispatch<BFloat16> got = ReferenceRankView.DispatchTo(config, inputs, place, r);
            string where = $"rank {r}, seed {seed}";
            Assert.True(want.Output.AsSpan().SequenceEqual(got.Output), $"rows differ, {where}");
            Assert.Equal(want.Weights, got.Weights);
            Assert.Equal(want.RowsPerLocalExpert, got.RowsPerLocalExpert);
            Assert.Equal(want.PaddedRowsPerLocalExpert, got.PaddedRowsPerLocalExpert);
            Assert.Equal(want.ExpertRowStarts, got.ExpertRowStarts);
            Assert.Equal(whole.GlobalScatterIndices[r], place.GlobalRows[r]);
            expertOut[r] = DeterministicExperts.ApplyToBlocks<BFloat16>(want.Output, config.Hidden, r * config.ExpertsPerRank, want.ExpertRowStarts, want.RowsPerLocalExpert);
        }

        foreach (bool weighted in new[] { false, true })
        {
            BFloat16[][] combined = ReferenceAllToAll.Combine(config, inputs, whole, expertOut, weighted);
            for (int r = 0; r < world; r++)
            {
                BFloat16[] got = ReferenceRankView.CombineFor(config, inputs, place, r, DeterministicExperts.Apply, weighted);
                Assert.True(combined[r].AsSpan().SequenceEqual(got), $"combine (weighted {weighted}) differs on rank {r}, seed {seed}");
            }
        }
    }

    [Fact]
    public void Large_bf16_steps_take_the_tabulated_parallel_path_with_the_same_bits() => LargeStepMatchesWholeGroup<BFloat16>();

    [Fact]
    public void Large_fp16_steps_take_the_tabulated_parallel_path_with_the_same_bits() => LargeStepMatchesWholeGroup<Half>();

    /// <summary>
    /// Big enough that CombineFor tabulates each expert and runs tokens in parallel, and ApplyToBlocks does too
    /// (over 4M elements a rank): the results must stay bit for bit those of the whole-group reference and of the
    /// expert applied element by element.
    /// </summary>
    private static void LargeStepMatchesWholeGroup<T>()
        where T : unmanaged
    {
        int seed = Random.Shared.Next();
        Random rng = new(seed);
        EpConfig config = new(1300, 2048, 2, 8, 0, 2, 2, typeof(T) == typeof(Half) ? TokenType.Float16 : TokenType.BFloat16);
        RankInput<T>[] inputs = RoutingGenerator.Draw<T>(config, [1300, 1250], 0.05, skewed: false, withWeights: true, rng);
        ReferenceStep<T> whole = ReferenceAllToAll.Dispatch(config, inputs);
        ReferencePlacement place = ReferenceRankView.Place(config, inputs);
        T[][] expertOut = new T[2][];
        for (int r = 0; r < 2; r++)
        {
            ReferenceDispatch<T> want = whole.PerRank[r];
            Assert.True((long)want.Rows * config.Hidden >= 1L << 22, $"rank {r} receives too few rows for the parallel path");
            ReferenceDispatch<T> got = ReferenceRankView.DispatchTo(config, inputs, place, r);
            Assert.True(want.Output.AsSpan().SequenceEqual(got.Output), $"rows differ, rank {r}, seed {seed}");
            expertOut[r] = DeterministicExperts.ApplyToBlocks<T>(want.Output, config.Hidden, r * config.ExpertsPerRank, want.ExpertRowStarts, want.RowsPerLocalExpert);
            for (int j = 0; j < config.ExpertsPerRank; j++)
            {
                int e = (r * config.ExpertsPerRank) + j;
                int begin = want.ExpertRowStarts[j] * config.Hidden;
                int end = (want.ExpertRowStarts[j] + want.RowsPerLocalExpert[j]) * config.Hidden;
                for (int i = begin; i < end; i++)
                {
                    T direct = TokenConvert.FromSingle<T>(DeterministicExperts.Apply(e, TokenConvert.ToSingle(want.Output[i])));
                    if (!EqualityComparer<T>.Default.Equals(direct, expertOut[r][i]))
                    {
                        Assert.Fail($"expert {e} element {i}: table {expertOut[r][i]}, direct {direct}, seed {seed}");
                    }
                }
            }
        }

        T[][] combined = ReferenceAllToAll.Combine(config, inputs, whole, expertOut, weighted: true);
        for (int r = 0; r < 2; r++)
        {
            T[] got = ReferenceRankView.CombineFor(config, inputs, place, r, DeterministicExperts.Apply, weighted: true);
            Assert.True(combined[r].AsSpan().SequenceEqual(got), $"combine differs on rank {r}, seed {seed}");
        }
    }
}

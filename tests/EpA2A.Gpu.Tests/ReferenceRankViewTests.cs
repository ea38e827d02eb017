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
}

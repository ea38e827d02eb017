using EpA2A.Config;
using EpA2A.Experts;
using EpA2A.Grains;
using EpA2A.Numerics;
using EpA2A.Reference;

namespace EpA2A.Cluster.Tests;

/// <summary>Runs steps through the grains on random routing and checks them against the reference.</summary>
public static class GrainStepRunner
{
    public static async Task<StepReport> RunCheckedAsync(ExpertLayerClient client, LayerSpec spec, int seed, bool weighted = false, double drop = 0.2, bool skewed = false)
    {
        Random rng = new(seed);
        EpConfig config = spec.ToConfig(0);
        int[] counts = [.. Enumerable.Range(0, spec.WorldSize).Select(_ => rng.Next(0, spec.MaxTokens + 1))];
        RankInput<BFloat16>[] inputs = RoutingGenerator.Draw<BFloat16>(config, counts, drop, skewed, weighted, rng);
        StepOutcome<BFloat16> outcome = await client.StepAsync(
            [.. inputs.Select(i => new RankStepInput<BFloat16>(i.Tokens, i.Count, i.ExpertIds, i.Weights))],
            weighted);

        ReferenceStep<BFloat16> dispatched = ReferenceAllToAll.Dispatch(config, inputs);
        BFloat16[][] expertOutputs = [.. dispatched.PerRank.Select((d, r) =>
            DeterministicExperts.ApplyToBlocks<BFloat16>(d.Output, spec.Hidden, r * config.ExpertsPerRank, d.ExpertRowStarts, d.RowsPerLocalExpert))];
        BFloat16[][] expected = ReferenceAllToAll.Combine(config, inputs, dispatched, expertOutputs, weighted);
        for (int r = 0; r < spec.WorldSize; r++)
        {
            Assert.Equal(expected[r].Length, outcome.Outputs[r].Length);
            Assert.Equal(dispatched.PerRank[r].Rows, outcome.Report.Ranks.Single(x => x.Rank == r).ReceivedRows);
            for (int i = 0; i < expected[r].Length; i++)
            {
                float want = expected[r][i].ToSingle();
                float got = outcome.Outputs[r][i].ToSingle();
                float tolerance = (Math.Abs(want) / 128f) + 1e-3f;
                Assert.True(Math.Abs(want - got) <= tolerance, $"seed {seed}: rank {r} element {i} is {got}, expected {want}");
            }
        }

        return outcome.Report;
    }
}

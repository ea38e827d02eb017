using EpA2A.Config;
using EpA2A.Experts;
using EpA2A.Grains;
using EpA2A.Numerics;
using EpA2A.Reference;

namespace EpA2A.Cluster.Tests;

/// <summary>Runs steps through the grains on random routing and checks them against the reference.</summary>
public static class GrainStepRunner
{
    public static async Task<StepReport> RunCheckedAsync(ExpertLayerClient client, LayerSpec spec, int seed, bool weighted = false, double drop = 0.2, bool skewed = false, int minTokens = 0)
    {
        RankInput<BFloat16>[] inputs = Draw(spec, seed, drop, skewed, weighted, minTokens);
        StepOutcome<BFloat16> outcome = await client.StepAsync(
            [.. inputs.Select(i => new RankStepInput<BFloat16>(i.Tokens, i.Count, i.ExpertIds, i.Weights))],
            weighted);

        EpConfig config = spec.ToConfig(0);

        // A masking layer may have served without some ranks: check against the reference of exactly that.
        int[] masked = [.. outcome.Report.MaskedRanks ?? []];
        inputs = MaskedRanks.Apply(config, inputs, masked, out int maskedSlots);
        Assert.True(maskedSlots == outcome.Report.MaskedSlots, $"seed {seed}: the step reports {outcome.Report.MaskedSlots} masked slots, masking ranks [{string.Join(", ", masked)}] drops {maskedSlots}");
        ReferenceStep<BFloat16> dispatched = ReferenceAllToAll.Dispatch(config, inputs);
        for (int r = 0; r < spec.WorldSize; r++)
        {
            if (!masked.Contains(r))
            {
                Assert.Equal(dispatched.PerRank[r].Rows, outcome.Report.Ranks.Single(x => x.Rank == r).ReceivedRows);
            }
        }

        AssertMatches(spec, seed, Expected(spec, inputs, weighted), outcome.Outputs);
        return outcome.Report;
    }

    /// <summary>A step's random inputs for every rank (token counts in [0, MaxTokens]), from <paramref name="seed"/>.</summary>
    public static RankInput<BFloat16>[] Draw(LayerSpec spec, int seed, double drop = 0.2, bool skewed = false, bool weighted = false, int minTokens = 0)
    {
        Random rng = new(seed);
        int[] counts = [.. Enumerable.Range(0, spec.WorldSize).Select(_ => rng.Next(minTokens, spec.MaxTokens + 1))];
        return RoutingGenerator.Draw<BFloat16>(spec.ToConfig(0), counts, drop, skewed, weighted, rng);
    }

    /// <summary>What every rank's combined output must be: the reference dispatch, the built-in experts, the reference combine.</summary>
    public static BFloat16[][] Expected(LayerSpec spec, RankInput<BFloat16>[] inputs, bool weighted)
    {
        EpConfig config = spec.ToConfig(0);
        ReferenceStep<BFloat16> dispatched = ReferenceAllToAll.Dispatch(config, inputs);
        BFloat16[][] expertOutputs = [.. dispatched.PerRank.Select((d, r) =>
            DeterministicExperts.ApplyToBlocks<BFloat16>(d.Output, spec.Hidden, r * config.ExpertsPerRank, d.ExpertRowStarts, d.RowsPerLocalExpert))];
        return ReferenceAllToAll.Combine(config, inputs, dispatched, expertOutputs, weighted);
    }

    /// <summary>Every element within one bf16 rounding (plus a little for sums) of the reference.</summary>
    public static void AssertMatches(LayerSpec spec, int seed, BFloat16[][] expected, BFloat16[][] got)
    {
        Assert.Equal(spec.WorldSize, got.Length);
        for (int r = 0; r < spec.WorldSize; r++)
        {
            Assert.Equal(expected[r].Length, got[r].Length);
            for (int i = 0; i < expected[r].Length; i++)
            {
                float want = expected[r][i].ToSingle();
                float have = got[r][i].ToSingle();
                float tolerance = (Math.Abs(want) / 128f) + 1e-3f;
                Assert.True(Math.Abs(want - have) <= tolerance, $"seed {seed}: rank {r} element {i} is {have}, expected {want}");
            }
        }
    }
}

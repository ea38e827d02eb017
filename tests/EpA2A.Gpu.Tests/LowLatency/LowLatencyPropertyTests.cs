using CsCheck;

namespace EpA2A.Tests.LowLatency;

/// <summary>The CPU low-latency layer against the independent reference on random groups, routings, formats and call forms.</summary>
public sealed class LowLatencyPropertyTests
{
    private static readonly Gen<LowLatencyCase> Cases =
        from world in Gen.Int[1, 8]
        from topK in Gen.Int[1, 8]
        from expertsPerRank in Gen.Int[1, 256 / world]
        from fp8 in Gen.Bool
        from hidden in fp8 ? Gen.OneOf(Gen.Const(128), Gen.Const(256)) : Gen.OneOf(Gen.Int[1, 24], Gen.Int[25, 96])
        from maxTokens in Gen.Int[1, 16]
        from drop in Gen.Double[0, 0.5]
        from duplicates in Gen.OneOf(Gen.Const(0.0), Gen.Double[0, 0.5])
        from skewed in Gen.Bool
        from pow2 in Gen.Bool
        from weights in Gen.Bool
        from weighted in Gen.Bool
        from zeroCopy in Gen.Bool
        from split in Gen.Bool
        from seed in Gen.Int
        let experts = world * expertsPerRank
        select new LowLatencyCase(world, Math.Min(topK, experts), experts, hidden, maxTokens, drop, duplicates, skewed, fp8, fp8 && pow2, weights, weighted, zeroCopy, split, seed);

    [Fact]
    public void Random_groups_match_the_reference() =>
        Cases.Sample(c => LowLatencyHarness.RunAsync(c, steps: 2).GetAwaiter().GetResult(), iter: 120, threads: 1, print: c => c.ToString());

    [Theory]
    [InlineData(8, false, false)]
    [InlineData(8, true, false)]
    [InlineData(8, true, true)]
    [InlineData(4, true, true)]
    public Task Decode_shapes_top8_of_256_at_full_capacity_match_the_reference(int world, bool fp8, bool pow2) =>
        LowLatencyHarness.RunAsync(new LowLatencyCase(world, 8, 256, 256, 32, 0.05, 0.05, true, fp8, pow2, true, true, false, true, Environment.TickCount), steps: 3);

    [Fact]
    public Task A_single_rank_with_every_slot_dropped_or_duplicated_matches_the_reference() =>
        LowLatencyHarness.RunAsync(new LowLatencyCase(1, 4, 4, 128, 6, 0.5, 0.9, false, true, false, true, true, true, false, Environment.TickCount), steps: 4);
}

using System.Diagnostics;
using EpA2A.Config;
using EpA2A.Experts;
using EpA2A.Grains;
using EpA2A.LowLatency;
using EpA2A.Numerics;
using EpA2A.Reference;

namespace EpA2A.Cluster.Tests;

/// <summary>Low-latency steps (LayerSpec.Mode = LowLatency) through four real silos, against the reference.</summary>
public sealed class LowLatencyClusterTests(RankCluster cluster) : IClassFixture<RankCluster>
{
    private static LayerSpec Spec(LowLatencyFormat format = LowLatencyFormat.Bf16, bool pow2 = false, TimeSpan? timeout = null) => new()
    {
        MaxTokens = 16,
        Hidden = 256,
        TopK = 4,
        NumExperts = 16,
        WorldSize = RankCluster.Silos,
        Mode = LayerMode.LowLatency,
        LowLatencyFormat = format,
        PowerOfTwoScales = pow2,
        StepTimeout = timeout ?? TimeSpan.FromSeconds(10),
    };

    [Theory]
    [InlineData(LowLatencyFormat.Bf16, false, false)]
    [InlineData(LowLatencyFormat.Bf16, false, true)]
    [InlineData(LowLatencyFormat.Fp8, false, true)]
    [InlineData(LowLatencyFormat.Fp8, true, false)]
    public async Task Low_latency_steps_through_the_grains_equal_the_reference(LowLatencyFormat format, bool pow2, bool weighted)
    {
        LayerSpec spec = Spec(format, pow2);
        ExpertLayerClient client = new(cluster.Grains, RankCluster.Group, $"ll-{format}-{pow2}-{weighted}", chunkBytes: 4096);
        await client.ConfigureAsync(spec);
        int seed = Environment.TickCount;
        for (int step = 0; step < 3; step++)
        {
            StepReport report = await RunCheckedAsync(client, spec, seed + step, weighted, skewed: step == 2);
            Assert.All(report.Ranks, r => Assert.Contains("LowLatencyCombineReceive", r.PhaseMicroseconds.Keys));
        }
    }

    [Fact]
    public async Task A_normal_and_a_low_latency_layer_share_one_group()
    {
        LayerSpec normal = Spec() with { Mode = LayerMode.Normal, Hidden = 24 };
        LayerSpec lowLatency = Spec(LowLatencyFormat.Fp8);
        ExpertLayerClient a = new(cluster.Grains, RankCluster.Group, "mixed-normal");
        ExpertLayerClient b = new(cluster.Grains, RankCluster.Group, "mixed-ll");
        await a.ConfigureAsync(normal);
        await b.ConfigureAsync(lowLatency);
        int seed = Environment.TickCount;
        await GrainStepRunner.RunCheckedAsync(a, normal, seed);
        await RunCheckedAsync(b, lowLatency, seed + 1, weighted: true);
        await GrainStepRunner.RunCheckedAsync(a, normal, seed + 2);
    }

    [Theory]
    [InlineData("inter-node", "intra-node only")]
    [InlineData("fp8 hidden", "multiple of 128")]
    [InlineData("fp16", "TokenType")]
    public async Task A_low_latency_spec_the_layer_cannot_serve_is_refused_at_configure(string bad, string rule)
    {
        LayerSpec spec = bad switch
        {
            "inter-node" => Spec() with { LocalWorldSize = 2 },
            "fp8 hidden" => Spec(LowLatencyFormat.Fp8) with { Hidden = 200 },
            _ => Spec() with { TokenType = TokenType.Float16 },
        };
        ExpertLayerClient client = new(cluster.Grains, RankCluster.Group, $"ll-refused-{bad.Replace(' ', '-')}");
        ArgumentException e = await Assert.ThrowsAsync<ArgumentException>(() => client.ConfigureAsync(spec));
        Assert.Contains(rule, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_stalled_rank_fails_a_low_latency_step_within_the_deadline_naming_it_and_the_group_steps_after()
    {
        TimeSpan deadline = TimeSpan.FromSeconds(2);
        LayerSpec spec = Spec(timeout: deadline);
        ExpertLayerClient stalled = new(cluster.Grains, RankCluster.Group, "stall-ll");
        await stalled.ConfigureAsync(spec);
        Stopwatch clock = Stopwatch.StartNew();
        GroupStepFailedException e = await Assert.ThrowsAsync<GroupStepFailedException>(() => RunCheckedAsync(stalled, spec, 7, weighted: false));
        clock.Stop();
        Assert.Contains(1, e.BlamedRanks);
        Assert.Contains("rank 1 did not deliver LowLatencyCombine", e.Message, StringComparison.Ordinal);
        Assert.True(clock.Elapsed < (deadline * 2) + TimeSpan.FromSeconds(2), $"failed after {clock.Elapsed}");

        ExpertLayerClient healthy = new(cluster.Grains, RankCluster.Group, "healthy-after-ll-stall");
        await healthy.ConfigureAsync(spec);
        await RunCheckedAsync(healthy, spec, 8, weighted: true);
    }

    /// <summary>One step through the grains; rows per rank and every combined element checked against the low-latency reference.</summary>
    private static async Task<StepReport> RunCheckedAsync(ExpertLayerClient client, LayerSpec spec, int seed, bool weighted, bool skewed = false)
    {
        RankInput<BFloat16>[] inputs = GrainStepRunner.Draw(spec, seed, drop: 0.2, skewed, weighted: true);
        StepOutcome<BFloat16> outcome = await client.StepAsync(
            [.. inputs.Select(i => new RankStepInput<BFloat16>(i.Tokens, i.Count, i.ExpertIds, i.Weights))],
            weighted);

        EpConfig config = spec.ToConfig(0);
        bool fp8 = spec.LowLatencyFormat == LowLatencyFormat.Fp8;
        ReferenceLowLatencyStep dispatched = ReferenceLowLatency.Dispatch(config, inputs, fp8, spec.LowLatencyDispatch.PowerOfTwoScales);
        BFloat16[][] expertOutputs = new BFloat16[spec.WorldSize][];
        for (int r = 0; r < spec.WorldSize; r++)
        {
            ReferenceLowLatencyRank rank = dispatched.PerRank[r];
            Assert.Equal(rank.RowsPerExpert.Sum(), outcome.Report.Ranks.Single(x => x.Rank == r).ReceivedRows);
            expertOutputs[r] = DeterministicExperts.ApplyToLowLatencyBlocks(spec.ToConfig(r), rank.RowsPerExpert, rank.Tokens ?? [], rank.Fp8Tokens ?? [], rank.Scales ?? []);
        }

        BFloat16[][] expected = ReferenceLowLatency.Combine(config, inputs, dispatched, expertOutputs, weighted);
        for (int r = 0; r < spec.WorldSize; r++)
        {
            Assert.Equal(expected[r].Length, outcome.Outputs[r].Length);
            for (int i = 0; i < expected[r].Length; i++)
            {
                int want = Ordered(expected[r][i]);
                int got = Ordered(outcome.Outputs[r][i]);
                Assert.True(Math.Abs(want - got) <= 1 && !float.IsNaN(outcome.Outputs[r][i].ToSingle()), $"seed {seed}: rank {r} element {i} is {outcome.Outputs[r][i]}, expected {expected[r][i]}");
            }
        }

        return outcome.Report;
    }

    private static int Ordered(BFloat16 v) => (v.RawBits & 0x8000) != 0 ? -(v.RawBits & 0x7FFF) : v.RawBits;
}

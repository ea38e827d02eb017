using EpA2A.Config;
using EpA2A.Grains;

namespace EpA2A.Cluster.Tests;

/// <summary>Steps through real Orleans silos, one per rank, against the reference.</summary>
public sealed class ClusterStepTests(RankCluster cluster) : IClassFixture<RankCluster>
{
    private static LayerSpec Spec(int local, int hidden = 48, bool localCombine = false) => new()
    {
        MaxTokens = 64,
        Hidden = hidden,
        TopK = 4,
        NumExperts = 16,
        WorldSize = RankCluster.Silos,
        LocalWorldSize = local,
        EnableLocalCombine = localCombine,
        StepTimeout = TimeSpan.FromSeconds(10),
    };

    [Fact]
    public async Task Every_rank_grain_lands_on_the_silo_that_serves_its_rank()
    {
        RankInfo[] infos = await Task.WhenAll(Enumerable.Range(0, RankCluster.Silos).Select(r =>
            cluster.Grains.GetGrain<IRankControl>(GrainKeys.Rank(RankCluster.Group, r)).DescribeAsync()));
        for (int r = 0; r < infos.Length; r++)
        {
            Assert.Equal(r, infos[r].Rank);
            Assert.Equal(RankCluster.Group, infos[r].Group);
        }

        Assert.Equal(RankCluster.Silos, infos.Select(i => i.Silo).Distinct().Count());
    }

    [Fact]
    public async Task A_rank_with_no_silo_fails_placement_with_an_error_naming_it()
    {
        NoSiloForRankException e = await Assert.ThrowsAsync<NoSiloForRankException>(() =>
            cluster.Grains.GetGrain<IRankControl>(GrainKeys.Rank(RankCluster.Group, 9)).DescribeAsync());
        Assert.Contains("rank 9", e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(4, false, false)]
    [InlineData(4, true, true)]
    [InlineData(2, false, true)]
    [InlineData(1, false, false)]
    public async Task A_step_through_the_grains_equals_the_reference(int localWorldSize, bool localCombine, bool weighted)
    {
        string layer = $"step-{localWorldSize}-{localCombine}-{weighted}";
        LayerSpec spec = Spec(localWorldSize, localCombine: localCombine);
        ExpertLayerClient client = new(cluster.Grains, RankCluster.Group, layer, chunkBytes: 4096);
        await client.ConfigureAsync(spec);
        int seed = Environment.TickCount;
        for (int step = 0; step < 3; step++)
        {
            StepReport report = await GrainStepRunner.RunCheckedAsync(client, spec, seed + step, weighted, skewed: step == 2);
            Assert.Equal(RankCluster.Silos, report.Ranks.Count);
            Assert.All(report.Ranks, r => Assert.Contains("DispatchKernel", r.PhaseMicroseconds.Keys));
        }
    }

    [Fact]
    public async Task Two_layers_with_different_configs_share_one_group()
    {
        LayerSpec small = Spec(4, hidden: 24);
        LayerSpec wide = Spec(2, hidden: 130) with { TopK = 2, NumExperts = 8, TokenType = TokenType.BFloat16 };
        ExpertLayerClient a = new(cluster.Grains, RankCluster.Group, "two-a");
        ExpertLayerClient b = new(cluster.Grains, RankCluster.Group, "two-b");
        await a.ConfigureAsync(small);
        await b.ConfigureAsync(wide);
        int seed = Environment.TickCount;
        await GrainStepRunner.RunCheckedAsync(a, small, seed);
        await GrainStepRunner.RunCheckedAsync(b, wide, seed + 1);
        await GrainStepRunner.RunCheckedAsync(a, small, seed + 2);
    }

    [Fact]
    public async Task Bad_input_is_rejected_before_anything_is_sent_and_the_next_step_is_correct()
    {
        LayerSpec spec = Spec(4);
        ExpertLayerClient client = new(cluster.Grains, RankCluster.Group, "bad-input");
        await client.ConfigureAsync(spec);
        RankStepInput<Numerics.BFloat16>[] bad = [.. Enumerable.Range(0, RankCluster.Silos).Select(r =>
            new RankStepInput<Numerics.BFloat16>(new Numerics.BFloat16[2 * spec.Hidden], 2, r == 3 ? [0, 1, 2, 99, 0, 1, 2, 3] : [0, 1, 2, 3, 4, 5, 6, 7]))];
        ArgumentException e = await Assert.ThrowsAsync<ArgumentException>(() => client.StepAsync(bad, cancellationToken: TestContext.Current.CancellationToken));
        Assert.Contains("rank 3", e.Message, StringComparison.Ordinal);
        Assert.Contains("ExpertIds[0, 3] = 99", e.Message, StringComparison.Ordinal);
        await GrainStepRunner.RunCheckedAsync(client, spec, Environment.TickCount);
    }

    [Fact]
    public async Task A_bad_config_is_rejected_naming_the_field()
    {
        ExpertLayerClient client = new(cluster.Grains, RankCluster.Group, "bad-config");
        ArgumentException e = await Assert.ThrowsAsync<ArgumentException>(() => client.ConfigureAsync(Spec(4) with { NumExperts = 15 }));
        Assert.Contains("NumExperts", e.Message, StringComparison.Ordinal);
    }
}

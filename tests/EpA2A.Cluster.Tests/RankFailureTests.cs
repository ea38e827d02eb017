using System.Diagnostics;
using EpA2A.Grains;

namespace EpA2A.Cluster.Tests;

/// <summary>A rank's silo dies: the next step fails in bounded time naming it; a new silo for the rank heals the group.</summary>
public sealed class RankFailureTests(RankCluster cluster) : IClassFixture<RankCluster>
{
    [Fact]
    public async Task A_killed_rank_fails_the_next_step_within_its_deadline_and_a_restarted_silo_heals_the_group()
    {
        TimeSpan deadline = TimeSpan.FromSeconds(3);
        LayerSpec spec = new()
        {
            MaxTokens = 32,
            Hidden = 40,
            TopK = 3,
            NumExperts = 8,
            WorldSize = RankCluster.Silos,
            StepTimeout = deadline,
        };
        ExpertLayerClient client = new(cluster.Grains, RankCluster.Group, "failure");
        await client.ConfigureAsync(spec);
        int seed = Environment.TickCount;
        await GrainStepRunner.RunCheckedAsync(client, spec, seed);

        Stopwatch sinceKill = Stopwatch.StartNew();
        await cluster.KillRankAsync(2);
        Stopwatch clock = Stopwatch.StartNew();
        Exception failure = await Assert.ThrowsAnyAsync<Exception>(() => GrainStepRunner.RunCheckedAsync(client, spec, seed + 1));
        clock.Stop();
        Assert.Contains("rank 2", failure.Message, StringComparison.Ordinal);
        Assert.True(clock.Elapsed < (deadline * 2) + TimeSpan.FromSeconds(3), $"failed after {clock.Elapsed}, bound {(deadline * 2) + TimeSpan.FromSeconds(3)}");

        await cluster.StartRankAsync(2);
        await GrainStepRunner.RunCheckedAsync(client, spec, seed + 2);
        MultiProcess.DrillLog.Outage(LostRankPolicy.FailAndReform, "kill-in-process", sinceKill.Elapsed); // every step fails until the rank is back: the outage includes the restart
        await GrainStepRunner.RunCheckedAsync(client, spec, seed + 3);
    }
}

/// <summary>A rank that stalls inside a step (a straggler past the deadline), on a cluster of its own.</summary>
public sealed class StragglerTests(RankCluster cluster) : IClassFixture<RankCluster>
{
    [Fact]
    public async Task A_rank_stalled_past_the_deadline_fails_the_step_on_every_rank_naming_it_and_the_layer_recovers()
    {
        TimeSpan deadline = TimeSpan.FromSeconds(2);
        LayerSpec spec = new()
        {
            MaxTokens = 16,
            Hidden = 24,
            TopK = 2,
            NumExperts = 8,
            WorldSize = RankCluster.Silos,
            StepTimeout = deadline,
        };
        ExpertLayerClient stalled = new(cluster.Grains, RankCluster.Group, "stall-a");
        await stalled.ConfigureAsync(spec);
        Stopwatch clock = Stopwatch.StartNew();
        GroupStepFailedException e = await Assert.ThrowsAsync<GroupStepFailedException>(() => GrainStepRunner.RunCheckedAsync(stalled, spec, 7, drop: 0));
        clock.Stop();
        Assert.Contains(1, e.BlamedRanks);
        Assert.Contains("rank 1 did not deliver CombineRows", e.Message, StringComparison.Ordinal);
        Assert.True(clock.Elapsed < (deadline * 2) + TimeSpan.FromSeconds(2), $"failed after {clock.Elapsed}");

        ExpertLayerClient healthy = new(cluster.Grains, RankCluster.Group, "healthy-after-stall");
        await healthy.ConfigureAsync(spec);
        await GrainStepRunner.RunCheckedAsync(healthy, spec, 8);
    }
}

/// <summary>
/// Masking (issue 18) on in-process silos: a rank whose silo dies is masked, the survivors serve (each step checked
/// against the reference with that rank's experts dropped), and a new silo for the rank is re-admitted by itself.
/// </summary>
public sealed class MaskingTests(RankCluster cluster) : IClassFixture<RankCluster>
{
    [Fact]
    public async Task With_masking_a_killed_rank_is_masked_the_survivors_serve_and_a_restarted_silo_is_readmitted()
    {
        TimeSpan deadline = TimeSpan.FromSeconds(2);
        LayerSpec spec = new()
        {
            MaxTokens = 32,
            Hidden = 40,
            TopK = 3,
            NumExperts = 8,
            WorldSize = RankCluster.Silos,
            StepTimeout = deadline,
            OnLostRank = LostRankPolicy.Mask,
        };
        ExpertLayerClient client = new(cluster.Grains, RankCluster.Group, "masking");
        await client.ConfigureAsync(spec);
        int seed = Environment.TickCount;
        StepReport whole = await GrainStepRunner.RunCheckedAsync(client, spec, seed);
        Assert.Null(whole.MaskedRanks);

        Stopwatch clock = Stopwatch.StartNew();
        await cluster.KillRankAsync(2);
        List<string> failures = [];
        StepReport? served = null;
        for (int i = 1; served is null && clock.Elapsed < TimeSpan.FromSeconds(30); i++)
        {
            try
            {
                served = await GrainStepRunner.RunCheckedAsync(client, spec, seed + i, drop: 0);
            }
            catch (GroupStepFailedException e)
            {
                failures.Add(e.Message);
                Assert.Contains(2, e.BlamedRanks);
            }
        }

        TimeSpan outage = clock.Elapsed;
        Assert.NotNull(served);
        Assert.Equal([2], served.MaskedRanks);
        Assert.True(served.MaskedSlots > 0, $"seed {seed}: no slot picked rank 2's experts");
        Assert.DoesNotContain(served.Ranks, r => r.Rank == 2);
        Assert.True(failures.Count <= 2, $"seed {seed}: {failures.Count} failed steps before the survivors served: {string.Join(" | ", failures)}");
        // Issue 18's bound, re-formed on the survivors within 2T of the loss, holds with room: the first good masked step,
        // which comes after the re-form, is within it.
        Assert.True(outage < deadline * 2, $"seed {seed}: the survivors served {outage.TotalSeconds:0.0} s after the kill (bound 2T = {(deadline * 2).TotalSeconds:0} s): {string.Join(" | ", failures)}");
        MultiProcess.DrillLog.Outage(LostRankPolicy.Mask, "kill-in-process", outage);
        for (int i = 0; i < 3; i++)
        {
            Assert.Equal([2], (await GrainStepRunner.RunCheckedAsync(client, spec, seed + 100 + i)).MaskedRanks);
        }

        await cluster.StartRankAsync(2);
        Stopwatch back = Stopwatch.StartNew();
        StepReport report;
        do
        {
            report = await GrainStepRunner.RunCheckedAsync(client, spec, seed + 200 + (int)back.ElapsedMilliseconds);
        }
        while (report.MaskedRanks is not null && back.Elapsed < TimeSpan.FromSeconds(20));

        Assert.Null(report.MaskedRanks);
        Assert.Contains(report.Ranks, r => r.Rank == 2);
        MultiProcess.DrillLog.Write($"mask, in-process silos: rank 2's silo stopped; outage (kill to first good step) {outage.TotalMilliseconds:0} ms with {failures.Count} failed step(s); restart to first step with every rank {back.Elapsed.TotalMilliseconds:0} ms");
    }
}

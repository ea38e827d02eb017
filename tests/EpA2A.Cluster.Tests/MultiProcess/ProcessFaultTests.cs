using System.Diagnostics;
using EpA2A.Grains;
using EpA2A.Silo.Hosting;
using Microsoft.Extensions.Hosting;

namespace EpA2A.Cluster.Tests.MultiProcess;

/// <summary>
/// Faults with real processes (issue 5): four `epa2a silo` processes on Redis, rank 1 a straggler whose experts
/// take 1.5 s every step. A rank slowed within the deadline completes the step; past it, the step aborts on every
/// rank naming it; a silo SIGKILLed in the middle of a step fails that step within twice the deadline plus 2 s
/// naming its rank, leaves no step waiting on any surviving rank, and a restarted process heals the group; the
/// coordinator's silo dying mid-step leaves no rank stuck, and the client re-configures a new coordinator.
/// </summary>
[Collection(ProcessCluster.Collection)]
public sealed class ProcessFaultTests(ProcessCluster cluster) : IClassFixture<ProcessCluster>
{
    private static readonly int[] VictimOrder = [2, 3, 0];

    private static LayerSpec Spec(TimeSpan deadline) => new()
    {
        MaxTokens = 32,
        Hidden = 64,
        TopK = 3,
        NumExperts = 8,
        WorldSize = ProcessCluster.Ranks,
        StepTimeout = deadline,
    };

    [Fact]
    public async Task A_silo_paused_past_the_probe_limit_is_blamed_alone_and_restarts_its_host_in_process_when_resumed()
    {
        Assert.SkipUnless(cluster.Available, "redis-server is not installed (.ci/run installs it)");
        await cluster.EnsureHealthyAsync();
        int seed = Environment.TickCount;
        const int Victim = 2;
        LayerSpec spec = Spec(TimeSpan.FromSeconds(3));
        ExpertLayerClient client = new(cluster.Client, ProcessCluster.Group, "paused");
        await client.ConfigureAsync(spec).WaitAsync(TimeSpan.FromSeconds(30), TestContext.Current.CancellationToken);
        await GrainStepRunner.RunCheckedAsync(client, spec, seed);

        ChildProcess victim = cluster.Silo(Victim);
        int lines = victim.Lines.Count;
        Stopwatch stopped = Stopwatch.StartNew();
        Signal(victim.Id, "STOP");
        try
        {
            GroupStepFailedException e = await Assert.ThrowsAsync<GroupStepFailedException>(() => GrainStepRunner.RunCheckedAsync(client, spec, seed + 1));
            Assert.True(e.BlamedRanks.SequenceEqual([Victim]), $"seed {seed}: blamed [{string.Join(", ", e.BlamedRanks)}]: {e.Message}");
            await Task.Delay(TimeSpan.FromSeconds(6), TestContext.Current.CancellationToken); // past the probe limit: declared dead
        }
        finally
        {
            Signal(victim.Id, "CONT");
        }

        await victim.WaitForLineAsync(l => l.Contains("was declared dead by the cluster", StringComparison.Ordinal), TimeSpan.FromSeconds(30), skip: lines);
        await victim.WaitForLineAsync(l => l.Contains("restarted in process", StringComparison.Ordinal), TimeSpan.FromSeconds(60), skip: lines);
        Assert.False(victim.HasExited);
        List<string> tries = await ProcessCluster.StepUntilOkAsync(client, spec, seed + 2, TimeSpan.FromSeconds(60));
        DrillLog.Outage(LostRankPolicy.FailAndReform, "sigstop", stopped.Elapsed); // every step fails until the silo is resumed and back: the outage includes 6 s stopped
        TestContext.Current.TestOutputHelper?.WriteLine($"healed after {tries.Count} failed tries:\n{string.Join('\n', tries)}");
        await cluster.EnsureHealthyAsync();
    }

    private static void Signal(int pid, string signal)
    {
        using Process kill = Process.Start("kill", ["-" + signal, pid.ToString(System.Globalization.CultureInfo.InvariantCulture)]);
        kill.WaitForExit(5000);
    }

    [Fact]
    public async Task A_rank_slowed_within_the_deadline_completes_the_step_and_one_slowed_past_it_aborts_the_step_on_every_rank_naming_it()
    {
        Assert.SkipUnless(cluster.Available, "redis-server is not installed (.ci/run installs it)");
        await cluster.EnsureHealthyAsync();
        int seed = Environment.TickCount;
        LayerSpec within = Spec(TimeSpan.FromSeconds(4));
        ExpertLayerClient patient = new(cluster.Client, ProcessCluster.Group, "within-deadline");
        await patient.ConfigureAsync(within).WaitAsync(TimeSpan.FromSeconds(30), TestContext.Current.CancellationToken);
        Stopwatch clock = Stopwatch.StartNew();
        await GrainStepRunner.RunCheckedAsync(patient, within, seed);
        TimeSpan slowStep = clock.Elapsed;
        Assert.True(slowStep >= ProcessCluster.ExpertDelay, $"seed {seed}: the step took {slowStep}, less than rank 1's {ProcessCluster.ExpertDelay} delay");

        TimeSpan tight = TimeSpan.FromSeconds(1);
        LayerSpec beyond = Spec(tight);
        ExpertLayerClient impatient = new(cluster.Client, ProcessCluster.Group, "past-deadline");
        await impatient.ConfigureAsync(beyond).WaitAsync(TimeSpan.FromSeconds(30), TestContext.Current.CancellationToken);
        clock.Restart();
        GroupStepFailedException e = await Assert.ThrowsAsync<GroupStepFailedException>(() => GrainStepRunner.RunCheckedAsync(impatient, beyond, seed + 1));
        TimeSpan aborted = clock.Elapsed;
        Assert.Equal([ProcessCluster.SlowRank], e.BlamedRanks);
        Assert.Contains("rank 1 did not deliver", e.Message, StringComparison.Ordinal);
        for (int r = 0; r < ProcessCluster.Ranks; r++)
        {
            Assert.Contains($"rank {r}:", e.Message, StringComparison.Ordinal); // every rank's step ended in an error
        }

        TimeSpan bound = (tight * 2) + TimeSpan.FromSeconds(2);
        Assert.True(aborted < bound, $"seed {seed}: the step failed {aborted} after it began, bound {bound}: {e.Message}");
        TimeSpan idle = await cluster.WaitIdleAsync(Enumerable.Range(0, ProcessCluster.Ranks), TimeSpan.FromSeconds(1));

        // The straggler's aborted step left nothing behind: both layers step again, the slow one still in time.
        await GrainStepRunner.RunCheckedAsync(patient, within, seed + 2);
        TestContext.Current.TestOutputHelper?.WriteLine(
            $"slowed within: step completed in {slowStep.TotalMilliseconds:0} ms (deadline {within.StepTimeout.TotalSeconds} s); slowed past a {tight.TotalSeconds} s deadline: failed after {aborted.TotalMilliseconds:0} ms, every rank idle {idle.TotalMilliseconds:0} ms later; {e.Message}");
    }

    [Theory]
    [InlineData(LostRankPolicy.FailAndReform)]
    [InlineData(LostRankPolicy.Mask)]
    public async Task A_silo_sigkilled_mid_step_fails_the_step_within_twice_the_deadline_naming_its_rank_leaves_no_step_waiting_and_a_restart_heals(LostRankPolicy policy)
    {
        Assert.SkipUnless(cluster.Available, "redis-server is not installed (.ci/run installs it)");
        await cluster.EnsureHealthyAsync();
        int seed = Environment.TickCount;
        TimeSpan deadline = TimeSpan.FromSeconds(4);
        LayerSpec spec = Spec(deadline) with { OnLostRank = policy };
        ExpertLayerClient client = new(cluster.Client, ProcessCluster.Group, $"sigkill-mid-step-{policy}");
        await client.ConfigureAsync(spec).WaitAsync(TimeSpan.FromSeconds(30), TestContext.Current.CancellationToken);
        await GrainStepRunner.RunCheckedAsync(client, spec, seed);

        // The victim serves a rank, but neither the coordinator nor the client's gateway (rank 1's silo).
        CoordinatorInfo coordinator = await client.Coordinator.DescribeAsync();
        int victim = VictimOrder.First(r => cluster.Silo(r).Id != coordinator.ProcessId);
        int[] survivors = [.. Enumerable.Range(0, ProcessCluster.Ranks).Where(r => r != victim)];

        Task<StepReport> step = GrainStepRunner.RunCheckedAsync(client, spec, seed + 1);
        await cluster.WaitAllInFlightAsync(TimeSpan.FromSeconds(5)); // rank 1 computes for 1.5 s; the others wait in combine
        Stopwatch clock = Stopwatch.StartNew();
        Stopwatch sinceKill = Stopwatch.StartNew();
        long killed = Stopwatch.GetTimestamp();
        cluster.Kill(victim);
        GroupStepFailedException e = await Assert.ThrowsAsync<GroupStepFailedException>(() => step);
        TimeSpan failed = clock.Elapsed;
        TimeSpan idle = await cluster.WaitIdleAsync(survivors, TimeSpan.FromSeconds(2));
        TimeSpan bound = (deadline * 2) + TimeSpan.FromSeconds(2);
        Assert.True(failed < bound, $"seed {seed}: the step failed {failed} after the kill, bound {bound}: {e.Message}");
        Assert.True(e.BlamedRanks.SequenceEqual([victim]), $"seed {seed}: blamed [{string.Join(", ", e.BlamedRanks)}], expected [{victim}]: {e.Message}\nrank 1's silo:\n{string.Join('\n', cluster.Silo(ProcessCluster.SlowRank).Lines.TakeLast(30))}");
        Assert.Contains($"rank {victim}", e.Message, StringComparison.Ordinal);

        // Masking: the survivors serve before the rank is back (each step checked against the masked reference).
        string masked = string.Empty;
        if (policy == LostRankPolicy.Mask)
        {
            long triesFrom = Stopwatch.GetTimestamp();
            List<string> tries = await ProcessCluster.StepUntilOkAsync(client, spec, seed + 50, TimeSpan.FromSeconds(20));
            TimeSpan outage = sinceKill.Elapsed;
            DrillLog.Write(
                $"timeline: mask sigkill-mid-step, rank {victim} SIGKILLed at +0 ms; the client's step failed at +{failed.TotalMilliseconds:0} ms, its tries began at +{Stopwatch.GetElapsedTime(killed, triesFrom).TotalMilliseconds:0} ms, first good masked step at +{outage.TotalMilliseconds:0} ms",
                [.. DrillLog.Timeline(killed, Enumerable.Range(0, ProcessCluster.Ranks).Select(cluster.Silo)), .. tries.Select(t => "client try: " + t)]);
            StepReport served = await GrainStepRunner.RunCheckedAsync(client, spec, seed + 60);
            Assert.Equal([victim], served.MaskedRanks);
            Assert.True(outage < bound, $"seed {seed}: kill to the first good masked step took {outage}, bound {bound}: {string.Join('\n', tries)}");

            // Issue 18's bound: the coordinator re-formed on the survivors within 2T of the kill, the straggler among them.
            TimeSpan? reform = DrillLog.ReformedAfter(Enumerable.Range(0, ProcessCluster.Ranks).Select(cluster.Silo), killed);
            Assert.True(reform < deadline * 2, $"seed {seed}: the coordinator re-formed on the survivors {reform?.TotalMilliseconds:0} ms after the kill (bound 2T = {(deadline * 2).TotalSeconds:0} s): {e.Message}");
            DrillLog.Outage(policy, "sigkill-mid-step", outage);
            DrillLog.Reform("sigkill-mid-step", reform!.Value);
            masked = $"re-formed on the survivors {reform.Value.TotalMilliseconds:0} ms after the kill; kill to the first good masked step {outage.TotalMilliseconds:0} ms ({tries.Count} failed tries); ";
        }

        clock.Restart();
        await cluster.RestartAsync(victim);
        List<string> retries = await ProcessCluster.StepUntilOkAsync(client, spec, seed + 2, TimeSpan.FromSeconds(60));
        if (policy == LostRankPolicy.FailAndReform)
        {
            DrillLog.Outage(policy, "sigkill-mid-step", sinceKill.Elapsed); // every step fails until the rank is back: the outage includes the restart
        }

        // Re-admitted at a step boundary with no client action: a step with every rank again.
        StepReport whole = await GrainStepRunner.RunCheckedAsync(client, spec, seed + 100);
        for (int i = 0; i < 40 && whole.MaskedRanks is not null; i++)
        {
            await Task.Delay(250, TestContext.Current.CancellationToken);
            whole = await GrainStepRunner.RunCheckedAsync(client, spec, seed + 101 + i);
        }

        Assert.Null(whole.MaskedRanks);
        TimeSpan healed = clock.Elapsed;

        // By now the victim was declared dead: no survivor's rank grain was deactivated with its grain-directory entry.
        Assert.Empty(DrillLog.RankGrainsDeactivatedByDirectoryLoss(survivors.Select(cluster.Silo), killed));
        TestContext.Current.TestOutputHelper?.WriteLine(
            $"{policy}: SIGKILL of rank {victim} mid-step: the step failed {failed.TotalMilliseconds:0} ms after the kill (bound {bound.TotalSeconds} s), survivors idle {idle.TotalMilliseconds:0} ms later; {masked}" +
            $"restart to a correct step with every rank {healed.TotalMilliseconds:0} ms ({retries.Count} failed tries); {e.Message}\n{string.Join('\n', retries)}");
    }

    [Fact]
    public async Task The_coordinators_silo_dying_mid_step_leaves_no_rank_stuck_and_the_client_re_configures_a_new_coordinator()
    {
        Assert.SkipUnless(cluster.Available, "redis-server is not installed (.ci/run installs it)");
        await cluster.EnsureHealthyAsync();
        int seed = Environment.TickCount;
        TimeSpan deadline = TimeSpan.FromSeconds(3);
        LayerSpec spec = Spec(deadline);

        // A layer whose coordinator was placed on a silo other than rank 1's (the client's gateway).
        ExpertLayerClient client = null!;
        CoordinatorInfo coordinator = null!;
        for (int i = 0; i < 40 && coordinator is null; i++)
        {
            ExpertLayerClient candidate = new(cluster.Client, ProcessCluster.Group, $"coordinator-{i}");
            CoordinatorInfo info = await candidate.Coordinator.DescribeAsync();
            if (info.ProcessId != cluster.Silo(ProcessCluster.SlowRank).Id)
            {
                (client, coordinator) = (candidate, info);
            }
        }

        Assert.NotNull(coordinator);
        int host = Enumerable.Range(0, ProcessCluster.Ranks).Single(r => cluster.Silo(r).Id == coordinator.ProcessId);
        int[] survivors = [.. Enumerable.Range(0, ProcessCluster.Ranks).Where(r => r != host)];
        await client.ConfigureAsync(spec).WaitAsync(TimeSpan.FromSeconds(30), TestContext.Current.CancellationToken);
        await GrainStepRunner.RunCheckedAsync(client, spec, seed);

        Task<StepReport> step = GrainStepRunner.RunCheckedAsync(client, spec, seed + 1);
        await cluster.WaitAllInFlightAsync(TimeSpan.FromSeconds(5));
        Stopwatch clock = Stopwatch.StartNew();
        cluster.Kill(host);

        // The client's probe of the coordinator (every 250 ms, 1 s each) fails the step well before the client's own
        // bound (2T + 5 s = 11 s), naming the coordinator: its layer, its silo's process and the rank that silo served.
        GroupStepFailedException e = await Assert.ThrowsAsync<GroupStepFailedException>(() => step);
        TimeSpan failed = clock.Elapsed;
        Assert.True(failed < TimeSpan.FromSeconds(3), $"seed {seed}: the client's step failed {failed} after the kill, expected < 3 s from its probe: {e.Message}");
        Assert.True(e.BlamedRanks.SequenceEqual([host]), $"seed {seed}: blamed [{string.Join(", ", e.BlamedRanks)}], expected the coordinator's silo's rank {host}: {e.Message}");
        Assert.Contains($"the coordinator of layer '{client.Layer}'", e.Message, StringComparison.Ordinal);
        Assert.Contains($"process {coordinator.ProcessId}", e.Message, StringComparison.Ordinal);
        Assert.Contains("probe", e.Message, StringComparison.Ordinal);

        // No coordinator is left to abort them: every surviving rank's step ends by its own deadline at the latest
        // (the straggler's combine starts after its 1.5 s of experts).
        TimeSpan idle = clock.Elapsed + await cluster.WaitIdleAsync(survivors, deadline + ProcessCluster.ExpertDelay + TimeSpan.FromSeconds(1) - clock.Elapsed);

        // The next step, with the coordinator's silo still dead: a new coordinator activates on a survivor, and the
        // group cannot form without the dead rank (fail-and-re-form), so it fails, promptly and naming that rank.
        clock.Restart();
        GroupStepFailedException next = await Assert.ThrowsAsync<GroupStepFailedException>(() => GrainStepRunner.RunCheckedAsync(client, spec, seed + 2));
        TimeSpan nextFailed = clock.Elapsed;
        Assert.True(nextFailed < deadline + TimeSpan.FromSeconds(3), $"seed {seed}: the step after the loss failed after {nextFailed}: {next.Message}");
        Assert.Contains(host, next.BlamedRanks);
        Assert.Contains($"rank {host}", next.Message, StringComparison.Ordinal);

        clock.Restart();
        await cluster.RestartAsync(host);
        List<string> retries = await ProcessCluster.StepUntilOkAsync(client, spec, seed + 3, TimeSpan.FromSeconds(60));
        TimeSpan healed = clock.Elapsed;
        CoordinatorInfo fresh = await client.Coordinator.DescribeAsync();
        Assert.NotEqual(coordinator.ProcessId, fresh.ProcessId);
        Assert.True(fresh.Formed);
        await GrainStepRunner.RunCheckedAsync(client, spec, seed + 100);
        DrillLog.Write(
            $"coordinator-lost: the coordinator's silo (rank {host}) SIGKILLed mid-step: the client's step failed after {failed.TotalMilliseconds:0} ms ({e.GetType().Name}: {e.Message.ReplaceLineEndings(" ")}); survivors idle {idle.TotalMilliseconds:0} ms after the kill (deadline {deadline.TotalSeconds} s); " +
            $"the next step, the silo still dead, failed after {nextFailed.TotalMilliseconds:0} ms ({next.Message.ReplaceLineEndings(" ")}); " +
            $"restart to a correct step through a new coordinator (epoch {fresh.Epoch}) {healed.TotalMilliseconds:0} ms ({retries.Count} failed tries)\n{string.Join('\n', retries)}");
    }

    [Fact]
    public async Task A_client_of_another_cluster_id_is_refused_by_the_gateway_and_never_admitted()
    {
        Assert.SkipUnless(cluster.Available, "redis-server is not installed (.ci/run installs it)");
        int before = cluster.Silo(ProcessCluster.SlowRank).Lines.Count;
        using IHost stranger = EpA2AHosts.BuildClient(ClusteringKind.Localhost, [cluster.GatewayPort(ProcessCluster.SlowRank)], null, clusterId: "someone-else");
        using CancellationTokenSource giveUp = new(TimeSpan.FromSeconds(8));
        await Assert.ThrowsAnyAsync<Exception>(() => stranger.StartAsync(giveUp.Token).WaitAsync(TimeSpan.FromSeconds(10), TestContext.Current.CancellationToken));
        string refusal = await cluster.Silo(ProcessCluster.SlowRank).WaitForLineAsync(l => l.Contains("cluster id", StringComparison.OrdinalIgnoreCase), TimeSpan.FromSeconds(5), skip: before);
        TestContext.Current.TestOutputHelper?.WriteLine($"the gateway logged: {refusal.Trim()}");
    }
}

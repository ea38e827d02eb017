using System.Diagnostics;
using EpA2A.Grains;

namespace EpA2A.Cluster.Tests.MultiProcess;

/// <summary>
/// A healthy coordinator must outlive the silo that holds its grain-directory registration (issue 18). Coordinators are
/// placed at random and kept single by Orleans' grain directory, whose registration for a grain lies on one silo of the
/// cluster, usually not the grain's own. Four `epa2a silo` processes on Redis (rank 1 a 1.5 s straggler, so every rank is
/// inside the step when the kill lands) and a spare `epa2a silo` that serves no rank of the group; the layer is one whose
/// coordinator runs on a rank's silo while its registration lies on the spare, as the coordinator's own silo says
/// (<see cref="CoordinatorInfo.DirectoryOwner"/>: Orleans' directory asked for the grain's primary, as its management
/// report does). The spare is SIGKILLed mid-step: nothing the step needs dies with it, so the step in flight completes,
/// correct, the coordinator is not deactivated, keeps its formation (same process, same epoch), and the next steps are
/// correct. The fixture's client reaches the cluster through rank 1's silo only, so no message of the client's is routed
/// through the spare either.
/// Explicit (run it with `-- --filter-class "*CoordinatorDirectoryLoss*" --explicit only`): with Orleans' default grain
/// directory, which the silos use, it fails in every run (the hazard of RELIABILITY.md section 6, not fixed); Orleans'
/// distributed directory passed it but broke other drills, so it is not in use.
/// </summary>
[Collection(ProcessCluster.Collection)]
public sealed class CoordinatorDirectoryLossTests(ProcessCluster cluster) : IClassFixture<ProcessCluster>
{
    private static readonly TimeSpan Deadline = TimeSpan.FromSeconds(4);

    [Theory(Explicit = true)]
    [InlineData(LostRankPolicy.FailAndReform)]
    [InlineData(LostRankPolicy.Mask)]
    public async Task A_healthy_coordinator_keeps_its_step_and_its_formation_when_the_silo_holding_its_directory_registration_is_sigkilled_mid_step(LostRankPolicy policy)
    {
        Assert.SkipUnless(cluster.Available, "redis-server is not installed (.ci/run installs it)");
        await cluster.EnsureHealthyAsync();
        int seed = Environment.TickCount;
        LayerSpec spec = new()
        {
            MaxTokens = 32,
            Hidden = 64,
            TopK = 3,
            NumExperts = 8,
            WorldSize = ProcessCluster.Ranks,
            StepTimeout = Deadline,
            OnLostRank = policy,
        };
        using ChildProcess spare = await cluster.StartSpareSiloAsync();
        string spareSilo = (await cluster.Client.GetGrain<IRankControl>(GrainKeys.Rank(ProcessCluster.Group + "-spare", 0)).DescribeAsync()).Silo;
        (string layer, CoordinatorInfo coordinator, string found) = await LayerRegisteredOnAsync(spareSilo, spare.Id);
        ExpertLayerClient client = new(cluster.Client, ProcessCluster.Group, layer);
        await client.ConfigureAsync(spec).WaitAsync(TimeSpan.FromSeconds(30), TestContext.Current.CancellationToken);
        await GrainStepRunner.RunCheckedAsync(client, spec, seed);
        CoordinatorInfo formed = await client.Coordinator.DescribeAsync();
        Assert.Equal(spareSilo, formed.DirectoryOwner); // still there once formed: the kill below takes the registration's silo

        ChildProcess[] silos = [.. Enumerable.Range(0, ProcessCluster.Ranks).Select(cluster.Silo)];
        Task<StepReport> step = GrainStepRunner.RunCheckedAsync(client, spec, seed + 1);
        await cluster.WaitAllInFlightAsync(TimeSpan.FromSeconds(5));
        Stopwatch clock = Stopwatch.StartNew();
        long killed = Stopwatch.GetTimestamp();
        spare.Kill();

        string where = $"seed {seed}: layer {layer}'s coordinator on {coordinator.Silo} (process {coordinator.ProcessId}), its directory registration on the spare {spareSilo} (process {spare.Id}), SIGKILLed mid-step";
        StepReport report;
        try
        {
            report = await step;
        }
        catch (GroupStepFailedException e)
        {
            Assert.Fail($"{where}: the step in flight failed {clock.Elapsed.TotalMilliseconds:0} ms after the kill, blaming [{string.Join(", ", e.BlamedRanks)}] (no rank died): {e.Message}\ncoordinator deactivations: {string.Join("; ", DrillLog.CoordinatorsDeactivated(silos, killed))}");
            throw;
        }

        TimeSpan finished = clock.Elapsed;
        Assert.Null(report.MaskedRanks);
        TimeSpan bound = (Deadline * 2) + TimeSpan.FromSeconds(2);
        Assert.True(finished < bound, $"{where}: the step in flight completed {finished} after the kill, bound {bound}");
        for (int i = 0; i < 3; i++)
        {
            Assert.Null((await GrainStepRunner.RunCheckedAsync(client, spec, seed + 2 + i)).MaskedRanks);
        }

        TimeSpan after = clock.Elapsed;
        CoordinatorInfo now = await client.Coordinator.DescribeAsync();
        string[] deactivated = DrillLog.CoordinatorsDeactivated(silos, killed);
        Assert.True(deactivated.Length == 0, $"{where}: the healthy coordinator was deactivated: {string.Join("; ", deactivated)}");
        Assert.Equal(formed.ProcessId, now.ProcessId);
        Assert.True(formed.Epoch == now.Epoch, $"{where}: the coordinator re-formed its group (epoch {formed.Epoch} -> {now.Epoch}) though no rank was lost");
        Assert.NotEqual(spareSilo, now.DirectoryOwner);
        DrillLog.Write(
            $"directory-lost: {policy}: the silo holding the coordinator's directory registration (no rank; {found}) SIGKILLed mid-step: the step in flight completed {finished.TotalMilliseconds:0} ms after it, correct; 3 more correct steps by {after.TotalMilliseconds:0} ms; the coordinator kept its process {now.ProcessId} and epoch {now.Epoch}; its registration now on {now.DirectoryOwner}",
            DrillLog.Timeline(killed, [.. silos, spare]));
    }

    /// <summary>
    /// A layer of a fresh name whose coordinator (activated through the fixture's client) runs on a rank's silo while its
    /// silo names <paramref name="owner"/> as holding its directory registration, asked again a second later; returns how
    /// many layers were tried and for how long. A silo that joined takes its share of the directory only once the others' views have
    /// taken it in (seconds after its start line, measured: none of the first 60 layers' registrations were on it), so
    /// layers are tried for up to 45 s.
    /// </summary>
    private async Task<(string Layer, CoordinatorInfo Coordinator, string Found)> LayerRegisteredOnAsync(string owner, int ownerProcess)
    {
        string run = Guid.NewGuid().ToString("N")[..6];
        List<string> seen = [];
        Stopwatch clock = Stopwatch.StartNew();
        for (int i = 0; clock.Elapsed < TimeSpan.FromSeconds(45); i++)
        {
            string layer = $"directory-{run}-{i}";
            IExpertLayerGrain grain = cluster.Client.GetGrain<IExpertLayerGrain>(GrainKeys.Layer(ProcessCluster.Group, layer));
            CoordinatorInfo info = await grain.DescribeAsync();
            seen.Add($"+{clock.Elapsed.TotalMilliseconds:0} ms {layer}: coordinator on {info.Silo}, registration on {info.DirectoryOwner ?? "(not said)"}");
            if (info.ProcessId == ownerProcess || info.DirectoryOwner != owner)
            {
                await Task.Delay(100);
                continue;
            }

            await Task.Delay(TimeSpan.FromSeconds(1));
            CoordinatorInfo again = await grain.DescribeAsync();
            if (again.ProcessId == info.ProcessId && again.DirectoryOwner == owner)
            {
                return (layer, again, $"found on the {i + 1}. layer tried, {clock.Elapsed.TotalSeconds:0.0} s after the spare started");
            }
        }

        throw new InvalidOperationException($"in 45 s, no layer's coordinator had its directory registration on {owner} off that silo:\n{string.Join('\n', seen.TakeLast(40))}");
    }
}

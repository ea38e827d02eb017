using System.Collections.Concurrent;
using System.Diagnostics;
using EpA2A.Grains;
using EpA2A.Silo.Hosting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;
using Orleans.Configuration;

namespace EpA2A.Cluster.Tests.MultiProcess;

/// <summary>
/// The client's own gateway silo dying mid-step is not the coordinator dying (issue 18): the client's probe of the
/// coordinator counts a refusal only when it names the coordinator's silo, so a refusal of the dead gateway's
/// connection must not fail the step blaming the coordinator. Four `epa2a silo` processes on Redis (rank 1 a 1.5 s
/// straggler, so every rank is inside the step when the kill lands) and a client of the test's own whose messages to the
/// layer's coordinator go out through the victim's gateway (checked on the client's own routing log before the kill),
/// the coordinator on another silo. A gateway silo that serves no rank of the group (an `epa2a silo` of a group of its
/// own): the step in flight and the steps after it succeed, correct, no rank masked. A gateway silo that serves a rank
/// (masking): the step fails blaming exactly that rank, not the coordinator's, and the next steps are served masked.
/// </summary>
[Collection(ProcessCluster.Collection)]
public sealed class ClientGatewayLossTests(ProcessCluster cluster) : IClassFixture<ProcessCluster>
{
    private static readonly TimeSpan Deadline = TimeSpan.FromSeconds(4);

    private static LayerSpec Spec(LostRankPolicy policy) => new()
    {
        MaxTokens = 32,
        Hidden = 64,
        TopK = 3,
        NumExperts = 8,
        WorldSize = ProcessCluster.Ranks,
        StepTimeout = Deadline,
        OnLostRank = policy,
    };

    /// <summary>
    /// SIGKILL: the client's connection to the gateway is reset at once and its next messages take the live gateway.
    /// SIGSTOP: the connection stays open and whatever goes through it is lost, probes included, until the cluster
    /// declares the silo dead and the client's gateway list (Redis membership, refreshed every second) drops it: the
    /// probe's patience with silence (three 1 s probes) is what keeps the coordinator from being blamed.
    /// </summary>
    [Theory]
    [InlineData("SIGKILL")]
    [InlineData("SIGSTOP")]
    public async Task The_clients_gateway_silo_dying_or_stalling_mid_step_when_it_serves_no_rank_fails_no_step(string fault)
    {
        Assert.SkipUnless(cluster.Available, "redis-server is not installed (.ci/run installs it)");
        await cluster.EnsureHealthyAsync();
        int seed = Environment.TickCount;
        using ChildProcess spare = await cluster.StartSpareSiloAsync();
        LayerSpec spec = Spec(LostRankPolicy.FailAndReform);
        (string layer, CoordinatorInfo coordinator) = await LayerCoordinatedAwayFromAsync([spare.Id]);
        (IHost host, RouteLog routes) = await StartClientThroughAsync(cluster.SpareGatewayPort, layer, redisMembership: fault == "SIGSTOP");
        using IHost clientHost = host;
        ExpertLayerClient client = new(host.Services.GetRequiredService<IClusterClient>(), ProcessCluster.Group, layer);
        await client.ConfigureAsync(spec).WaitAsync(TimeSpan.FromSeconds(30), TestContext.Current.CancellationToken);
        await GrainStepRunner.RunCheckedAsync(client, spec, seed);
        routes.AssertCoordinatorGoesThrough(client, cluster.SpareGatewayPort);

        Task<StepReport> step = GrainStepRunner.RunCheckedAsync(client, spec, seed + 1);
        await cluster.WaitAllInFlightAsync(TimeSpan.FromSeconds(5));
        Stopwatch clock = Stopwatch.StartNew();
        long killed = Stopwatch.GetTimestamp();
        if (fault == "SIGKILL")
        {
            spare.Kill();
        }
        else
        {
            Signal(spare.Id, "STOP"); // killed (stopped or not) when disposed
        }

        // The answer to the running step was to come back through the dead gateway: the client asks again through a live
        // one, and the coordinator answers with the step it ran. Whatever happens, the coordinator must not be blamed.
        StepReport report;
        try
        {
            report = await step;
        }
        catch (GroupStepFailedException e)
        {
            SkipIfTheCoordinatorWentWithTheDirectory(e, coordinator, killed);
            Assert.Fail($"seed {seed}: the step in flight failed {clock.Elapsed.TotalMilliseconds:0} ms after its gateway silo (which serves no rank) got {fault}, blaming [{string.Join(", ", e.BlamedRanks)}] (the coordinator's silo serves [{string.Join(", ", CoordinatorRanks(coordinator))}]): {e.Message}");
            throw;
        }

        TimeSpan finished = clock.Elapsed;
        Assert.Null(report.MaskedRanks);
        TimeSpan bound = (Deadline * 2) + TimeSpan.FromSeconds(2);
        Assert.True(finished < bound, $"seed {seed}: the step in flight completed {finished} after the {fault}, bound {bound}");
        for (int i = 0; i < 3; i++)
        {
            Assert.Null((await GrainStepRunner.RunCheckedAsync(client, spec, seed + 2 + i)).MaskedRanks);
        }

        TimeSpan after = clock.Elapsed;
        CoordinatorInfo now = await client.Coordinator.DescribeAsync();
        Assert.Equal(coordinator.ProcessId, now.ProcessId);
        DrillLog.Write(
            $"gateway-lost: the client's gateway silo (no rank) got {fault} mid-step: the step in flight completed {finished.TotalMilliseconds:0} ms after it, correct; 3 more correct steps by {after.TotalMilliseconds:0} ms; the coordinator kept its process {now.ProcessId}",
            DrillLog.Timeline(killed, [.. Enumerable.Range(0, ProcessCluster.Ranks).Select(cluster.Silo), spare]));
    }

    [Fact]
    public async Task The_clients_gateway_silo_dying_mid_step_when_it_serves_a_rank_blames_that_rank_not_the_coordinator_and_masking_serves_on()
    {
        Assert.SkipUnless(cluster.Available, "redis-server is not installed (.ci/run installs it)");
        await cluster.EnsureHealthyAsync();
        int seed = Environment.TickCount;
        LayerSpec spec = Spec(LostRankPolicy.Mask);

        // The victim serves a rank and is the client's gateway to the coordinator; the coordinator runs elsewhere and the
        // fixture's own client (through rank 1's silo) keeps watching the ranks.
        const int victim = 2;
        (string layer, CoordinatorInfo coordinator) = await LayerCoordinatedAwayFromAsync([cluster.Silo(victim).Id]);
        int[] coordinatorRanks = CoordinatorRanks(coordinator);
        (IHost host, RouteLog routes) = await StartClientThroughAsync(cluster.GatewayPort(victim), layer);
        using IHost clientHost = host;
        ExpertLayerClient client = new(host.Services.GetRequiredService<IClusterClient>(), ProcessCluster.Group, layer);
        await client.ConfigureAsync(spec).WaitAsync(TimeSpan.FromSeconds(30), TestContext.Current.CancellationToken);
        await GrainStepRunner.RunCheckedAsync(client, spec, seed);
        routes.AssertCoordinatorGoesThrough(client, cluster.GatewayPort(victim));

        Task<StepReport> step = GrainStepRunner.RunCheckedAsync(client, spec, seed + 1);
        await cluster.WaitAllInFlightAsync(TimeSpan.FromSeconds(5));
        Stopwatch clock = Stopwatch.StartNew();
        long killed = Stopwatch.GetTimestamp();
        cluster.Kill(victim);

        GroupStepFailedException e = await Assert.ThrowsAsync<GroupStepFailedException>(() => step);
        TimeSpan failed = clock.Elapsed;
        SkipIfTheCoordinatorWentWithTheDirectory(e, coordinator, killed);
        Assert.True(e.BlamedRanks.SequenceEqual([victim]), $"seed {seed}: blamed [{string.Join(", ", e.BlamedRanks)}], expected exactly the gateway silo's rank [{victim}] (the coordinator's silo serves [{string.Join(", ", coordinatorRanks)}]): {e.Message}");
        Assert.DoesNotContain("the coordinator of layer", e.Message, StringComparison.Ordinal);
        TimeSpan bound = (Deadline * 2) + TimeSpan.FromSeconds(2);
        Assert.True(failed < bound, $"seed {seed}: the step failed {failed} after the kill, bound {bound}: {e.Message}");

        List<string> tries = await ProcessCluster.StepUntilOkAsync(client, spec, seed + 50, TimeSpan.FromSeconds(20));
        TimeSpan outage = clock.Elapsed;
        Assert.All(tries, t => Assert.DoesNotContain("the coordinator of layer", t, StringComparison.Ordinal));
        for (int i = 0; i < 3; i++)
        {
            Assert.Equal([victim], (await GrainStepRunner.RunCheckedAsync(client, spec, seed + 60 + i)).MaskedRanks);
        }

        Assert.True(outage < bound, $"seed {seed}: kill to the first good masked step took {outage}, bound {bound}: {string.Join('\n', tries)}");
        DrillLog.Outage(LostRankPolicy.Mask, "gateway-rank-sigkill-mid-step", outage);
        DrillLog.Write(
            $"gateway-lost: the client's gateway silo (rank {victim}) SIGKILLed mid-step: the step failed {failed.TotalMilliseconds:0} ms after the kill blaming [{victim}] ({e.Message.ReplaceLineEndings(" ")}); first good masked step at {outage.TotalMilliseconds:0} ms ({tries.Count} failed tries)",
            [.. DrillLog.Timeline(killed, Enumerable.Range(0, ProcessCluster.Ranks).Select(cluster.Silo)), .. tries.Select(t => "client try: " + t)]);
        await cluster.RestartAsync(victim);
    }

    /// <summary>A layer of a fresh name whose coordinator (activated through the fixture's client) runs on none of <paramref name="processes"/>.</summary>
    private async Task<(string Layer, CoordinatorInfo Coordinator)> LayerCoordinatedAwayFromAsync(int[] processes)
    {
        string run = Guid.NewGuid().ToString("N")[..6];
        for (int i = 0; i < 40; i++)
        {
            string layer = $"gateway-{run}-{i}";
            CoordinatorInfo info = await cluster.Client.GetGrain<IExpertLayerGrain>(GrainKeys.Layer(ProcessCluster.Group, layer)).DescribeAsync();
            if (!processes.Contains(info.ProcessId))
            {
                return (layer, info);
            }
        }

        throw new InvalidOperationException($"40 layers' coordinators all landed on processes [{string.Join(", ", processes)}]");
    }

    /// <summary>
    /// Skips, saying so, when the step failed because Orleans deactivated the healthy coordinator: the dead silo held its
    /// grain-directory entry, so the coordinator's silo deactivated it ("LocalGrainDirectory is deactivating") and the
    /// probe found a new activation. That is a known hazard of its own (RELIABILITY.md section 6, not fixed), not the
    /// gateway guard this class tests; it hits when the coordinator's entry lies on the victim (about 1 layer in 5).
    /// </summary>
    private void SkipIfTheCoordinatorWentWithTheDirectory(GroupStepFailedException e, CoordinatorInfo coordinator, long since)
    {
        bool deactivated = CoordinatorRanks(coordinator).Select(cluster.Silo).SelectMany(p => p.StampedLines)
            .Any(l => l.At >= since && l.Line.Contains("LocalGrainDirectory is deactivating", StringComparison.Ordinal));
        if (deactivated && e.Message.Contains("its probe reached a new activation", StringComparison.Ordinal))
        {
            DrillLog.Write($"gateway-lost: skipped, the coordinator was deactivated with the dead silo's directory partition: {e.Message.ReplaceLineEndings(" ")}");
            Assert.Skip($"the healthy coordinator was deactivated with the dead silo's grain-directory partition (known, RELIABILITY.md section 6): {e.Message}");
        }
    }

    private int[] CoordinatorRanks(CoordinatorInfo coordinator) =>
        [.. Enumerable.Range(0, ProcessCluster.Ranks).Where(r => cluster.Silo(r).Id == coordinator.ProcessId)];

    /// <summary>
    /// A cluster client whose messages to the coordinator of <paramref name="layer"/> go out through
    /// <paramref name="gateway"/> (its routing log says so): its gateways are <paramref name="gateway"/> and rank 1's
    /// silo, or with <paramref name="redisMembership"/> every silo of the cluster's membership (which drops a silo
    /// declared dead). Orleans gives a grain's messages the gateway its round robin is at when the grain is first called,
    /// starting from <see cref="GatewayOptions.PreferredGatewayIndex"/>; which index that takes depends on what the
    /// client sent before and on the list's order, so each is tried, each on a fresh client.
    /// </summary>
    private async Task<(IHost Host, RouteLog Routes)> StartClientThroughAsync(int gateway, string layer, bool redisMembership = false)
    {
        string key = GrainKeys.Layer(ProcessCluster.Group, layer);
        int gateways = redisMembership ? ProcessCluster.Ranks + 1 : 2;
        for (int attempt = 0; attempt < 3 * gateways; attempt++)
        {
            RouteLog routes = new();
            int preferred = attempt % gateways;
            IHost host = EpA2AHosts.BuildClient(redisMembership ? ClusteringKind.Redis : ClusteringKind.Localhost, [gateway, cluster.GatewayPort(ProcessCluster.SlowRank)], redisMembership ? cluster.Redis : null, cluster.ClusterId, configure: b =>
            {
                b.Logging.AddProvider(routes);
                b.Logging.AddFilter<RouteLog>(RouteLog.Category, LogLevel.Trace);
                b.Services.Configure<GatewayOptions>(o => o.PreferredGatewayIndex = preferred);
            });
            await host.StartAsync().WaitAsync(TimeSpan.FromSeconds(30));
            await host.Services.GetRequiredService<IClusterClient>().GetGrain<IExpertLayerGrain>(key).DescribeAsync().WaitAsync(TimeSpan.FromSeconds(10));
            if (routes.WentThrough(key, gateway))
            {
                return (host, routes);
            }

            await host.StopAsync().WaitAsync(TimeSpan.FromSeconds(10));
            host.Dispose();
        }

        throw new InvalidOperationException($"{3 * gateways} clients' messages to the coordinator {key} did not go through the gateway on port {gateway}");
    }

    private static void Signal(int pid, string signal)
    {
        using Process kill = Process.Start("kill", ["-" + signal, pid.ToString(System.Globalization.CultureInfo.InvariantCulture)]);
        kill.WaitForExit(5000);
    }

    /// <summary>The client's own record of which gateway each message went out through (Orleans' trace line).</summary>
    private sealed class RouteLog : ILoggerProvider
    {
        public const string Category = "Orleans.Messaging.ClientMessageCenter";
        private readonly ConcurrentQueue<string> lines = new();

        public ILogger CreateLogger(string categoryName) => categoryName == Category ? new Recorder(lines) : Microsoft.Extensions.Logging.Abstractions.NullLogger.Instance;

        public void Dispose()
        {
        }

        /// <summary>Fails unless the messages to <paramref name="client"/>'s coordinator all went out through the gateway on <paramref name="port"/>.</summary>
        public void AssertCoordinatorGoesThrough(ExpertLayerClient client, int port)
        {
            string key = GrainKeys.Layer(client.Group, client.Layer);
            Assert.True(
                WentThrough(key, port),
                $"the client's messages to the coordinator {key} did not all go through the gateway on port {port}:\n{string.Join('\n', Sent(key).Take(10))}\n(of {lines.Count} routing lines)");
        }

        /// <summary>True when messages to <paramref name="key"/> were sent and every one went out through the gateway on <paramref name="port"/>.</summary>
        public bool WentThrough(string key, int port)
        {
            string[] sent = Sent(key);
            return sent.Length > 0 && sent.All(l => l.Contains($":{port}'", StringComparison.Ordinal));
        }

        private string[] Sent(string key) =>
            [.. lines.Where(l => l.Contains(key, StringComparison.Ordinal) && l.Contains("via gateway", StringComparison.Ordinal))];

        private sealed class Recorder(ConcurrentQueue<string> lines) : ILogger
        {
            public IDisposable? BeginScope<TState>(TState state)
                where TState : notnull => null;

            public bool IsEnabled(LogLevel logLevel) => true;

            public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
                lines.Enqueue(formatter(state, exception));
        }
    }
}

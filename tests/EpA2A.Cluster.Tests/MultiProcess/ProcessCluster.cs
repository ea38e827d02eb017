using System.Diagnostics;
using System.Globalization;
using EpA2A.Grains;
using EpA2A.Silo.Hosting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;

namespace EpA2A.Cluster.Tests.MultiProcess;

/// <summary>Tests that start `epa2a` processes run one at a time (CI has two cores).</summary>
[CollectionDefinition(ProcessCluster.Collection)]
public sealed class OneProcessTestAtATime;

/// <summary>
/// Four `epa2a silo` processes with Redis membership (redis-server on loopback), rank 1 a straggler whose experts
/// take <see cref="ExpertDelay"/> every step (`--expert-delay-ms`), and an Orleans cluster client in the test
/// process that reaches the cluster through rank 1's gateway only (rank 1's silo is never killed, so the
/// client's own connection survives every fault). A test that kills a silo restarts it.
/// </summary>
public sealed class ProcessCluster : IAsyncLifetime
{
    public const string Collection = "epa2a processes";
    public const string Group = "pf";
    public const int Ranks = 4;
    public const int SlowRank = 1;
    public static readonly TimeSpan ExpertDelay = TimeSpan.FromMilliseconds(1500);

    private readonly ChildProcess?[] silos = new ChildProcess?[Ranks];
    private ChildProcess? redisServer;
    private IHost? clientHost;
    private string redis = string.Empty;
    private string clusterId = string.Empty;
    private int portBase;

    /// <summary>False when redis-server is not installed (the tests skip).</summary>
    public bool Available { get; private set; }

    public IClusterClient Client => clientHost!.Services.GetRequiredService<IClusterClient>();

    /// <summary>The gateway port of the silo serving <paramref name="rank"/>.</summary>
    public int GatewayPort(int rank) => portBase + 100 + rank;

    public async ValueTask InitializeAsync()
    {
        string? server = (Environment.GetEnvironmentVariable("PATH") ?? string.Empty).Split(':')
            .Select(d => Path.Combine(d, "redis-server"))
            .FirstOrDefault(File.Exists);
        if (server is null)
        {
            return;
        }

        int redisPort = ChildProcess.FreePort();
        portBase = 12000 + (Random.Shared.Next(0, 30) * 200);
        clusterId = "pf-" + Guid.NewGuid().ToString("N")[..8];
        redis = string.Create(CultureInfo.InvariantCulture, $"127.0.0.1:{redisPort}");
        redisServer = ChildProcess.Start("redis", server, "--port", redisPort.ToString(CultureInfo.InvariantCulture), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no");
        await redisServer.WaitForLineAsync(l => l.Contains("Ready to accept connections", StringComparison.Ordinal), TimeSpan.FromSeconds(20));
        for (int r = 0; r < Ranks; r++)
        {
            silos[r] = StartSilo(r);
        }

        foreach (ChildProcess silo in silos.OfType<ChildProcess>())
        {
            await silo.WaitForLineAsync(l => l.StartsWith("epa2a silo: rank", StringComparison.Ordinal), TimeSpan.FromSeconds(60));
        }

        clientHost = EpA2AHosts.BuildClient(ClusteringKind.Localhost, [portBase + 100 + SlowRank], null, clusterId);
        await clientHost.StartAsync().WaitAsync(TimeSpan.FromSeconds(30));

        await WaitReadyAsync();
        Available = true;
    }

    public ChildProcess Silo(int rank) => silos[rank]!;

    /// <summary>Restarts any silo a test left dead, then waits until every rank is placed on its own live process.</summary>
    public async Task EnsureHealthyAsync()
    {
        for (int r = 0; r < Ranks; r++)
        {
            if (silos[r]!.HasExited)
            {
                await RestartAsync(r);
            }
        }

        await WaitReadyAsync();
    }

    /// <summary>A rank as the readiness checks see it: they only describe it.</summary>
    private IRankControl Rank(int rank) => Client.GetGrain<IRankControl>(GrainKeys.Rank(Group, rank));

    /// <summary>
    /// An `epa2a silo` of this cluster that serves no rank of <see cref="Group"/> (rank 0 of a one-rank group of its own),
    /// once it has started; its gateway is <see cref="SpareGatewayPort"/>. The caller disposes it.
    /// </summary>
    public async Task<ChildProcess> StartSpareSiloAsync()
    {
        ChildProcess spare = ChildProcess.Epa2a(
            "spare", "silo", "--rank", "0", "--world-size", "1", "--group", Group + "-spare",
            "--clustering", "redis", "--redis", redis, "--cluster-id", clusterId, "--port-base", (portBase + 10).ToString(CultureInfo.InvariantCulture));
        await spare.WaitForLineAsync(l => l.StartsWith("epa2a silo: rank", StringComparison.Ordinal), TimeSpan.FromSeconds(60));
        return spare;
    }

    /// <summary>The gateway port of the silo <see cref="StartSpareSiloAsync"/> starts.</summary>
    public int SpareGatewayPort => portBase + 10 + 100;

    /// <summary>The cluster id the silos joined (for a client of its own).</summary>
    public string ClusterId => clusterId;

    /// <summary>The Redis the silos keep their membership in (for a client of its own).</summary>
    public string Redis => redis;

    /// <summary>SIGKILL of the silo serving <paramref name="rank"/>.</summary>
    public void Kill(int rank) => silos[rank]!.Kill();

    /// <summary>A fresh `epa2a silo` process for <paramref name="rank"/>, once it has started.</summary>
    public async Task RestartAsync(int rank)
    {
        silos[rank]?.Dispose();
        silos[rank] = StartSilo(rank);
        await silos[rank]!.WaitForLineAsync(l => l.StartsWith("epa2a silo: rank", StringComparison.Ordinal), TimeSpan.FromSeconds(60));
    }

    /// <summary>
    /// Waits until every rank answers from its own process: a silo that has printed its start line may not be in
    /// every other silo's membership view yet, and a restarted one only once its predecessor is declared dead.
    /// </summary>
    private async Task WaitReadyAsync()
    {
        Stopwatch clock = Stopwatch.StartNew();
        while (true)
        {
            try
            {
                RankInfo[] infos = await Task.WhenAll(Enumerable.Range(0, Ranks).Select(r => Rank(r).DescribeAsync())).WaitAsync(TimeSpan.FromSeconds(5));
                if (infos.All(i => i.ProcessId == Silo(i.Rank).Id))
                {
                    return;
                }
            }
            catch (Exception e) when (e is NoSiloForRankException or TimeoutException or OrleansException && clock.Elapsed < TimeSpan.FromSeconds(60))
            {
            }

            await Task.Delay(200);
        }
    }

    /// <summary>Waits until every rank reports a step in flight (all are inside one step).</summary>
    public async Task WaitAllInFlightAsync(TimeSpan within)
    {
        Stopwatch clock = Stopwatch.StartNew();
        while (true)
        {
            RankInfo[] infos = await Task.WhenAll(Enumerable.Range(0, Ranks).Select(r => Rank(r).DescribeAsync())).WaitAsync(TimeSpan.FromSeconds(5));
            if (infos.All(i => i.StepsInFlight > 0))
            {
                return;
            }

            if (clock.Elapsed > within)
            {
                throw new TimeoutException($"not every rank entered the step within {within.TotalSeconds:0.#} s: {string.Join(", ", infos.Select(i => $"rank {i.Rank}: {i.StepsInFlight}"))}");
            }

            await Task.Delay(25);
        }
    }

    /// <summary>
    /// Waits until each of <paramref name="ranks"/> answers and has no step in flight; returns how long that took.
    /// A silo that does not answer within 3 s, or a step still in flight at <paramref name="within"/>, fails.
    /// </summary>
    public async Task<TimeSpan> WaitIdleAsync(IEnumerable<int> ranks, TimeSpan within)
    {
        Stopwatch clock = Stopwatch.StartNew();
        int[] which = [.. ranks];
        while (true)
        {
            RankInfo[] infos = await Task.WhenAll(which.Select(r => Rank(r).DescribeAsync())).WaitAsync(TimeSpan.FromSeconds(3));
            Assert.All(infos, i => Assert.Equal(Silo(i.Rank).Id, i.ProcessId));
            if (infos.All(i => i.StepsInFlight == 0))
            {
                return clock.Elapsed;
            }

            if (clock.Elapsed > within)
            {
                throw new TimeoutException($"steps still in flight {within.TotalSeconds:0.#} s on: {string.Join(", ", infos.Where(i => i.StepsInFlight > 0).Select(i => $"rank {i.Rank}"))}");
            }

            await Task.Delay(25);
        }
    }

    /// <summary>Checked steps until one succeeds (a group re-forming after a restart); returns how the failed tries failed.</summary>
    public static async Task<List<string>> StepUntilOkAsync(ExpertLayerClient client, LayerSpec spec, int seed, TimeSpan within)
    {
        Stopwatch clock = Stopwatch.StartNew();
        List<string> failures = [];
        while (true)
        {
            try
            {
                await GrainStepRunner.RunCheckedAsync(client, spec, seed + failures.Count);
                return failures;
            }
            catch (Exception e) when (e is not Xunit.Sdk.IAssertionException && clock.Elapsed < within)
            {
                failures.Add($"{clock.Elapsed.TotalSeconds:0.0} s: {e.GetType().Name}: {e.Message.ReplaceLineEndings(" ")}");
                await Task.Delay(250);
            }
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (clientHost is not null)
        {
            try
            {
                await clientHost.StopAsync(CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(10));
            }
            catch (TimeoutException)
            {
                // The processes are killed below anyway.
            }

            clientHost.Dispose();
        }

        foreach (ChildProcess? silo in silos)
        {
            silo?.Dispose();
        }

        redisServer?.Dispose();
    }

    private ChildProcess StartSilo(int rank) => ChildProcess.Epa2a(
        $"silo{rank}", "silo", "--rank", rank.ToString(CultureInfo.InvariantCulture), "--world-size", Ranks.ToString(CultureInfo.InvariantCulture), "--group", Group,
        "--clustering", "redis", "--redis", redis, "--cluster-id", clusterId, "--port-base", portBase.ToString(CultureInfo.InvariantCulture),
        "--expert-delay-ms", rank == SlowRank ? ExpertDelay.TotalMilliseconds.ToString(CultureInfo.InvariantCulture) : "0");
}

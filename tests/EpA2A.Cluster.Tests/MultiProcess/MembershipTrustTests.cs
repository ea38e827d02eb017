using System.Diagnostics;
using System.Globalization;

namespace EpA2A.Cluster.Tests.MultiProcess;

/// <summary>
/// Membership you can trust (issue 17, findings 3 and 8), with real processes: four `epa2a silo` processes on a real
/// redis-server and an `epa2a drive` client. When Redis loses the membership table (FLUSHALL: what a restart without
/// persistence leaves), every silo says so in one line and rejoins, the group steps again, and a silo killed afterwards
/// heals as usual. A second silo for a live rank, on other ports, is refused with exit 2 and the first keeps serving.
/// </summary>
[Collection(ProcessCluster.Collection)]
public sealed class MembershipTrustTests
{
    private const int Ranks = 4;
    private static readonly TimeSpan Deadline = TimeSpan.FromSeconds(3);

    /// <summary>From FLUSHALL to every silo's line saying the table is gone (checks run every second).</summary>
    private static readonly TimeSpan NoticeBound = TimeSpan.FromSeconds(15);

    /// <summary>From FLUSHALL to the first correct step (every silo restarts its host; the group re-forms).</summary>
    private static readonly TimeSpan RejoinBound = TimeSpan.FromSeconds(90);

    [Fact]
    public async Task A_silo_whose_membership_table_vanished_says_so_and_rejoins_and_a_silo_killed_afterwards_heals_the_group()
    {
        await using Drill drill = await Drill.StartAsync("mt");
        Assert.SkipWhen(drill.Unavailable, "redis-server or redis-cli is not installed (.ci/run installs them)");
        using ChildProcess drive = drill.StartDrive();
        await Drill.WaitForOkStepsAsync(drive, 3);

        int before = drive.Lines.Count;
        Stopwatch clock = Stopwatch.StartNew();
        await drill.RedisCliAsync("FLUSHALL");
        TimeSpan[] noticed = new TimeSpan[Ranks];
        for (int r = 0; r < Ranks; r++)
        {
            string line = await drill.Silos[r].WaitForLineAsync(l => l.Contains("membership table of cluster", StringComparison.Ordinal), NoticeBound);
            noticed[r] = clock.Elapsed;
            Assert.Contains($"rank {r}", line, StringComparison.Ordinal);
            Assert.Contains($"'{drill.ClusterId}'", line, StringComparison.Ordinal);
            Assert.Contains(drill.Redis, line, StringComparison.Ordinal);
            Assert.Contains("rejoining", line, StringComparison.Ordinal);
        }

        foreach (ChildProcess silo in drill.Silos)
        {
            await silo.WaitForLineAsync(l => l.Contains("restarted in process", StringComparison.Ordinal), RejoinBound - clock.Elapsed);
        }

        await drive.WaitForLineAsync(IsOk, RejoinBound - clock.Elapsed, skip: before);
        TimeSpan rejoined = clock.Elapsed;
        int failedWhileRejoining = drive.Lines.Skip(before).Count(l => l.Contains("FAILED", StringComparison.Ordinal));
        Assert.All(drill.Silos, s => Assert.False(s.HasExited, $"{s.Name} exited"));

        // The re-formed membership must declare a dead silo dead again, and admit its successor.
        before = drive.Lines.Count;
        Stopwatch kill = Stopwatch.StartNew();
        drill.Silos[2].Kill();
        string failed = await drive.WaitForLineAsync(l => l.Contains("FAILED", StringComparison.Ordinal), (Deadline * 2) + TimeSpan.FromSeconds(10), skip: before);
        Assert.True(failed.Contains("rank 2", StringComparison.Ordinal), $"the first failed step after rank 2's kill does not name it: {failed}");
        drill.Restart(2);
        int afterRestart = drive.Lines.Count;
        await drive.WaitForLineAsync(IsOk, TimeSpan.FromSeconds(90), skip: afterRestart);
        TimeSpan healed = kill.Elapsed;
        await drive.WaitForLineAsync(IsOk, TimeSpan.FromSeconds(30), skip: drive.Lines.Count);
        Assert.DoesNotContain(drive.Lines, l => l.Contains("MISMATCH", StringComparison.Ordinal));

        DrillLog.Write(
            string.Create(CultureInfo.InvariantCulture, $"membership table lost (FLUSHALL): every silo said so {noticed.Min().TotalSeconds:0.0}-{noticed.Max().TotalSeconds:0.0} s after; first correct step {rejoined.TotalSeconds:0.0} s after ({failedWhileRejoining} failed steps); then SIGKILL of rank 2 and a restart: correct steps {healed.TotalSeconds:0.0} s after the kill"),
            drive.Lines.Skip(Math.Max(0, before - 40)));
    }

    [Fact]
    public async Task A_second_silo_for_a_live_rank_on_other_ports_exits_2_naming_the_rank_and_the_live_silo_and_the_first_keeps_serving()
    {
        await using Drill drill = await Drill.StartAsync("dup");
        Assert.SkipWhen(drill.Unavailable, "redis-server or redis-cli is not installed (.ci/run installs them)");
        using ChildProcess drive = drill.StartDrive();
        await Drill.WaitForOkStepsAsync(drive, 3);

        int before = drive.Lines.Count;
        Stopwatch clock = Stopwatch.StartNew();
        using ChildProcess duplicate = drill.StartSilo(2, drill.PortBase + 200, "duplicate");
        int code = await duplicate.WaitForExitAsync(TimeSpan.FromSeconds(60));
        TimeSpan refused = clock.Elapsed;
        string all = string.Join('\n', duplicate.Lines);
        Assert.True(code == 2, $"exit {code}: {all}");
        string[] refusals = [.. duplicate.Lines.Where(l => l.Contains("already served by the live silo", StringComparison.Ordinal))];
        string refusal = Assert.Single(refusals);
        Assert.Contains("rank 2 of group 'dup'", refusal, StringComparison.Ordinal);
        Assert.Contains(string.Create(CultureInfo.InvariantCulture, $":{drill.PortBase + 2}:"), refusal, StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", all, StringComparison.Ordinal);
        Assert.DoesNotContain(duplicate.Lines, l => l.Contains("Ctrl-C to stop", StringComparison.Ordinal));

        int afterExit = drive.Lines.Count;
        await drive.WaitForLineAsync(IsOk, TimeSpan.FromSeconds(30), skip: afterExit);
        await drive.WaitForLineAsync(IsOk, TimeSpan.FromSeconds(30), skip: drive.Lines.Count);
        Assert.False(drill.Silos[2].HasExited, "the first silo of rank 2 exited");
        Assert.DoesNotContain(drive.Lines, l => l.Contains("MISMATCH", StringComparison.Ordinal));
        int failedMeanwhile = drive.Lines.Skip(before).Count(l => l.Contains("FAILED", StringComparison.Ordinal));
        DrillLog.Write(
            string.Create(CultureInfo.InvariantCulture, $"duplicate rank 2 on other ports: exit 2 after {refused.TotalSeconds:0.0} s; {failedMeanwhile} failed steps meanwhile; the first silo kept serving"),
            [refusal, .. drive.Lines.Skip(before).Where(l => l.Contains("FAILED", StringComparison.Ordinal)).Take(5)]);
    }

    private static bool IsOk(string line) => line.StartsWith("step ", StringComparison.Ordinal) && line.Contains(": ok", StringComparison.Ordinal);

    /// <summary>redis-server (no persistence) and four silo processes of one random cluster id and port range.</summary>
    private sealed class Drill : IAsyncDisposable
    {
        private readonly string group;
        private ChildProcess? server;
        private string cli = string.Empty;
        private int redisPort;

        private Drill(string group) => this.group = group;

        public bool Unavailable { get; private set; }

        public List<ChildProcess> Silos { get; } = [];

        public string Redis { get; private set; } = string.Empty;

        public string ClusterId { get; } = "mt-" + Guid.NewGuid().ToString("N")[..8];

        public int PortBase { get; } = 30000 + (Random.Shared.Next(0, 30) * 400);

        public static async Task<Drill> StartAsync(string group)
        {
            Drill drill = new(group);
            string? redisServer = FindOnPath("redis-server");
            string? redisCli = FindOnPath("redis-cli");
            if (redisServer is null || redisCli is null)
            {
                drill.Unavailable = true;
                return drill;
            }

            drill.cli = redisCli;
            drill.redisPort = ChildProcess.FreePort();
            drill.Redis = string.Create(CultureInfo.InvariantCulture, $"127.0.0.1:{drill.redisPort}");
            drill.server = ChildProcess.Start("redis", redisServer, "--port", drill.redisPort.ToString(CultureInfo.InvariantCulture), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no");
            await drill.server.WaitForLineAsync(l => l.Contains("Ready to accept connections", StringComparison.Ordinal), TimeSpan.FromSeconds(20));
            for (int r = 0; r < Ranks; r++)
            {
                drill.Silos.Add(drill.StartSilo(r, drill.PortBase, $"silo{r}"));
            }

            foreach (ChildProcess silo in drill.Silos)
            {
                await silo.WaitForLineAsync(l => l.StartsWith("epa2a silo: rank", StringComparison.Ordinal), TimeSpan.FromSeconds(60));
            }

            return drill;
        }

        public ChildProcess StartSilo(int rank, int portBase, string name) => ChildProcess.Epa2a(
            name, "silo", "--rank", rank.ToString(CultureInfo.InvariantCulture), "--world-size", Ranks.ToString(CultureInfo.InvariantCulture), "--group", group,
            "--clustering", "redis", "--redis", Redis, "--cluster-id", ClusterId, "--port-base", portBase.ToString(CultureInfo.InvariantCulture));

        public void Restart(int rank)
        {
            Silos[rank].Dispose();
            Silos[rank] = StartSilo(rank, PortBase, $"silo{rank}");
        }

        public ChildProcess StartDrive() => ChildProcess.Epa2a(
            "drive", "drive", "--world-size", Ranks.ToString(CultureInfo.InvariantCulture), "--group", group, "--clustering", "redis", "--redis", Redis, "--cluster-id", ClusterId,
            "--steps", "100000", "--continue-on-failure", "--interval-ms", "50", "--timeout-seconds", Deadline.TotalSeconds.ToString(CultureInfo.InvariantCulture));

        public static async Task WaitForOkStepsAsync(ChildProcess drive, int count)
        {
            for (int i = 0; i < count; i++)
            {
                int seen = i == 0 ? 0 : drive.Lines.Count;
                await drive.WaitForLineAsync(IsOk, TimeSpan.FromSeconds(i == 0 ? 90 : 30), skip: seen);
            }

            Assert.DoesNotContain(drive.Lines, l => l.Contains("MISMATCH", StringComparison.Ordinal));
        }

        public async Task RedisCliAsync(string command)
        {
            using ChildProcess redisCli = ChildProcess.Start("redis-cli", cli, "-p", redisPort.ToString(CultureInfo.InvariantCulture), command);
            int code = await redisCli.WaitForExitAsync(TimeSpan.FromSeconds(10));
            Assert.True(code == 0 && redisCli.Lines.Contains("OK"), $"redis-cli {command}: exit {code}: {string.Join('\n', redisCli.Lines)}");
        }

        public ValueTask DisposeAsync()
        {
            foreach (ChildProcess silo in Silos)
            {
                silo.Dispose();
            }

            server?.Dispose();
            return ValueTask.CompletedTask;
        }

        private static string? FindOnPath(string name) =>
            (Environment.GetEnvironmentVariable("PATH") ?? string.Empty).Split(':')
                .Select(d => Path.Combine(d, name))
                .FirstOrDefault(File.Exists);
    }
}

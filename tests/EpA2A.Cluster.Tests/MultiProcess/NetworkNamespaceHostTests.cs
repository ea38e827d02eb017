using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;

namespace EpA2A.Cluster.Tests.MultiProcess;

/// <summary>
/// Several hosts for real (BRIEF §2, issue 18): network namespaces on this machine, each with its own address on a
/// bridge: Redis in one, four `epa2a silo` processes each in its own (under a restart loop, as a supervisor would run
/// them), and an `epa2a drive` client in another. Each silo advertises its own host's address (the default; nothing
/// is on loopback), steps pass, pulling one host's cable fails the next step within its bound naming that rank, and
/// plugging it back heals the group with no client action. Skipped only where namespaces cannot be made (not
/// Linux, not root, no `ip netns`), which the skip message says.
/// </summary>
[Collection(ProcessCluster.Collection)]
public sealed partial class NetworkNamespaceHostTests
{
    private const int Ranks = 4;
    private static readonly TimeSpan Deadline = TimeSpan.FromSeconds(2);

    [Fact]
    public async Task Silos_on_four_namespace_hosts_step_a_cut_host_fails_the_step_naming_its_rank_and_the_group_heals_when_the_link_returns()
    {
        using NetnsCluster cluster = await NetnsCluster.StartAsync(masking: false);
        await cluster.StepsPassAsync(3);
        int victim = cluster.RankAwayFromTheCoordinator();

        long cut = Stopwatch.GetTimestamp();
        int before = cluster.Drive.Lines.Count;
        cluster.Hosts.SetLink(NetnsCluster.HostOf(victim), up: false);
        string failed = await cluster.Drive.WaitForLineAsync(l => l.Contains("FAILED", StringComparison.Ordinal), (Deadline * 2) + TimeSpan.FromSeconds(15), skip: before);
        TimeSpan detected = Stopwatch.GetElapsedTime(cut);
        Assert.True(failed.Contains($"rank {victim}", StringComparison.Ordinal), $"the first failed step does not name rank {victim}: {failed}\n{cluster.Timeline(cut)}");
        Assert.True(detected < (Deadline * 2) + TimeSpan.FromSeconds(6), $"the first failed step ended {detected.TotalSeconds:0.0} s after the cut: {failed}");

        cluster.Hosts.SetLink(NetnsCluster.HostOf(victim), up: true);
        TimeSpan outage = await cluster.FirstOkAfterAsync(cut, TimeSpan.FromSeconds(90));
        await cluster.StepsPassAsync(2);
        DrillLog.Outage(EpA2A.Grains.LostRankPolicy.FailAndReform, "cut-host", outage);
        cluster.Report(cut, $"fail-and-re-form: rank {victim}'s link cut; first failed step {detected.TotalMilliseconds:0} ms after the cut; outage (cut to first good step, link back after the failure) {outage.TotalSeconds:0.0} s; cluster start {cluster.StartTime.TotalSeconds:0.0} s; silo restarts {cluster.Restarts}");
    }

    [Fact]
    public async Task With_masking_a_cut_host_is_masked_within_twice_the_deadline_the_survivors_serve_and_it_is_readmitted_when_the_link_returns()
    {
        using NetnsCluster cluster = await NetnsCluster.StartAsync(masking: true);
        await cluster.StepsPassAsync(3);
        int victim = cluster.RankAwayFromTheCoordinator();

        long cut = Stopwatch.GetTimestamp();
        int before = cluster.Drive.Lines.Count;
        cluster.Hosts.SetLink(NetnsCluster.HostOf(victim), up: false);

        // Masked: a correct step (drive checks it against the reference with the masked rank's experts dropped) that
        // names the cut rank as masked, within twice the deadline of the step that found it gone (plus the step itself).
        string masked = await cluster.Drive.WaitForLineAsync(l => l.Contains(": ok", StringComparison.Ordinal) && l.Contains($"masked ranks [{victim}]", StringComparison.Ordinal), TimeSpan.FromSeconds(30), skip: before);
        TimeSpan outage = Stopwatch.GetElapsedTime(cut);
        int failedSteps = cluster.Drive.Lines.Skip(before).Count(l => l.Contains("FAILED", StringComparison.Ordinal));
        Assert.True(outage < (Deadline * 2) + TimeSpan.FromSeconds(3), $"cut to the first masked good step took {outage.TotalSeconds:0.0} s (bound {((Deadline * 2) + TimeSpan.FromSeconds(3)).TotalSeconds:0} s), {failedSteps} failed steps; timeline:\n{cluster.Timeline(cut)}");
        TimeSpan reform = cluster.AssertReformedWithinTwiceTheDeadline(cut, "cut");
        int served = cluster.Drive.Lines.Count;
        await cluster.StepsPassAsync(3);
        Assert.All(cluster.Drive.Lines.Skip(served).Where(l => l.StartsWith("step ", StringComparison.Ordinal)), l => Assert.Contains(": ok", l, StringComparison.Ordinal));

        long healed = Stopwatch.GetTimestamp();
        int back = cluster.Drive.Lines.Count;
        cluster.Hosts.SetLink(NetnsCluster.HostOf(victim), up: true);
        string whole = await cluster.Drive.WaitForLineAsync(l => l.Contains(": ok", StringComparison.Ordinal) && !l.Contains("masked", StringComparison.Ordinal), TimeSpan.FromSeconds(60), skip: back);
        TimeSpan readmitted = Stopwatch.GetElapsedTime(healed);
        await cluster.StepsPassAsync(2);
        DrillLog.Outage(EpA2A.Grains.LostRankPolicy.Mask, "cut-host", outage);
        DrillLog.Reform("cut-host", reform);
        cluster.Report(cut, $"mask: rank {victim}'s link cut; re-formed on the survivors {reform.TotalMilliseconds:0} ms after the cut; outage (cut to first good masked step) {outage.TotalMilliseconds:0} ms, {failedSteps} failed steps; link back to the first step with every rank {readmitted.TotalMilliseconds:0} ms ({whole}); silo restarts {cluster.Restarts}");
    }

    [Fact]
    public async Task With_masking_a_stalled_silo_is_masked_the_survivors_serve_and_it_is_readmitted_when_resumed()
    {
        using NetnsCluster cluster = await NetnsCluster.StartAsync(masking: true);
        await cluster.StepsPassAsync(3);
        int victim = cluster.RankAwayFromTheCoordinator();
        int pid = cluster.SiloPid(victim);

        long stop = Stopwatch.GetTimestamp();
        int before = cluster.Drive.Lines.Count;
        Signal(pid, "STOP");
        TimeSpan outage;
        TimeSpan reform;
        int failedSteps;
        try
        {
            await cluster.Drive.WaitForLineAsync(l => l.Contains(": ok", StringComparison.Ordinal) && l.Contains($"masked ranks [{victim}]", StringComparison.Ordinal), TimeSpan.FromSeconds(30), skip: before);
            outage = Stopwatch.GetElapsedTime(stop);
            failedSteps = cluster.Drive.Lines.Skip(before).Count(l => l.Contains("FAILED", StringComparison.Ordinal));
            reform = cluster.AssertReformedWithinTwiceTheDeadline(stop, "stop");
            await cluster.StepsPassAsync(3);
        }
        finally
        {
            Signal(pid, "CONT");
        }

        Assert.True(outage < (Deadline * 2) + TimeSpan.FromSeconds(3), $"stall to the first masked good step took {outage.TotalSeconds:0.0} s (bound {((Deadline * 2) + TimeSpan.FromSeconds(3)).TotalSeconds:0} s), {failedSteps} failed steps; timeline:\n{cluster.Timeline(stop)}");
        long resumed = Stopwatch.GetTimestamp();
        int back = cluster.Drive.Lines.Count;
        await cluster.Drive.WaitForLineAsync(l => l.Contains(": ok", StringComparison.Ordinal) && !l.Contains("masked", StringComparison.Ordinal), TimeSpan.FromSeconds(60), skip: back);
        TimeSpan readmitted = Stopwatch.GetElapsedTime(resumed);
        await cluster.StepsPassAsync(2);
        bool restartedInProcess = cluster.Silos[victim].Lines.Any(l => l.Contains("restarted in process", StringComparison.Ordinal));
        DrillLog.Outage(EpA2A.Grains.LostRankPolicy.Mask, "sigstop", outage);
        DrillLog.Reform("sigstop", reform);
        cluster.Report(stop, $"mask: rank {victim}'s silo SIGSTOPped; re-formed on the survivors {reform.TotalMilliseconds:0} ms after the stop; outage (stop to first good masked step) {outage.TotalMilliseconds:0} ms, {failedSteps} failed steps; SIGCONT to the first step with every rank {readmitted.TotalMilliseconds:0} ms; declared dead and restarted in process: {restartedInProcess}; supervisor restarts {cluster.Restarts}");
    }

    private static void Signal(int pid, string signal)
    {
        using Process kill = Process.Start("kill", ["-" + signal, pid.ToString(CultureInfo.InvariantCulture)]);
        kill.WaitForExit(5000);
    }
}

/// <summary>The namespace cluster of <see cref="NetworkNamespaceHostTests"/>: Redis, four supervised silos, a drive client.</summary>
internal sealed partial class NetnsCluster : IDisposable
{
    private static readonly TimeSpan Deadline = TimeSpan.FromSeconds(2);

    private NetnsCluster(NetnsHosts hosts) => Hosts = hosts;

    public NetnsHosts Hosts { get; }

    public ChildProcess Drive { get; private set; } = null!;

    public ChildProcess[] Silos { get; } = new ChildProcess[4];

    public static string HostOf(int rank) => string.Create(CultureInfo.InvariantCulture, $"h{rank}");

    /// <summary>How long starting Redis, the silos and the client's first formed layer took.</summary>
    public TimeSpan StartTime { get; private set; }

    public static async Task<NetnsCluster> StartAsync(bool masking)
    {
        long begun = Stopwatch.GetTimestamp();
        string? why = NetnsHosts.Unavailable();
        Assert.SkipWhen(why is not null, $"SKIPPED: network namespaces are not available here ({why}); this test needs root and `ip netns`");
        string? redisServer = (Environment.GetEnvironmentVariable("PATH") ?? string.Empty).Split(':').Select(d => Path.Combine(d, "redis-server")).FirstOrDefault(File.Exists);
        Assert.SkipWhen(redisServer is null, "redis-server is not installed (.ci/run installs it)");

        NetnsCluster cluster = new(NetnsHosts.Create("redis", "h0", "h1", "h2", "h3", "client"));
        try
        {
            string redisAt = cluster.Hosts.Address("redis");
            ChildProcess redis = cluster.Hosts.Start("redis", "redis", redisServer!, "--port", "6379", "--bind", redisAt, "--protected-mode", "no", "--save", "", "--appendonly", "no");
            await redis.WaitForLineAsync(l => l.Contains("Ready to accept connections", StringComparison.Ordinal), TimeSpan.FromSeconds(20));
            string connection = redisAt + ":6379";
            string clusterId = "nh-" + Guid.NewGuid().ToString("N")[..8];
            for (int r = 0; r < 4; r++)
            {
                // The same ports on every host, as on real machines; no --advertise: each silo finds its host's own address.
                cluster.Silos[r] = cluster.Hosts.StartSupervisedEpa2a(HostOf(r), $"silo{r}", "silo", "--rank", r.ToString(CultureInfo.InvariantCulture), "--world-size", "4", "--group", "nh",
                    "--clustering", "redis", "--redis", connection, "--cluster-id", clusterId, "--port-base", "11111");
            }

            for (int r = 0; r < 4; r++)
            {
                string started = await cluster.Silos[r].WaitForLineAsync(l => l.StartsWith("epa2a silo: rank", StringComparison.Ordinal), TimeSpan.FromSeconds(90));
                Assert.Contains($"advertised at {cluster.Hosts.Address(HostOf(r))},", started, StringComparison.Ordinal);
            }

            string[] drive = ["drive", "--world-size", "4", "--group", "nh", "--clustering", "redis", "--redis", connection, "--cluster-id", clusterId,
                "--steps", "100000", "--continue-on-failure", "--interval-ms", "100", "--timeout-seconds", Deadline.TotalSeconds.ToString(CultureInfo.InvariantCulture)];
            cluster.Drive = cluster.Hosts.StartEpa2a("client", "drive", masking ? [.. drive, "--masking"] : drive);
            await cluster.Drive.WaitForLineAsync(l => l.Contains("formed over", StringComparison.Ordinal), TimeSpan.FromSeconds(90));
            cluster.StartTime = Stopwatch.GetElapsedTime(begun);
            return cluster;
        }
        catch
        {
            cluster.Dispose();
            throw;
        }
    }

    /// <summary>Waits for <paramref name="count"/> more correct steps; no step ever mismatched.</summary>
    public async Task StepsPassAsync(int count)
    {
        for (int i = 0; i < count; i++)
        {
            int seen = Drive.Lines.Count;
            await Drive.WaitForLineAsync(l => l.StartsWith("step ", StringComparison.Ordinal) && l.Contains(": ok", StringComparison.Ordinal), TimeSpan.FromSeconds(60), skip: seen);
        }

        Assert.DoesNotContain(Drive.Lines, l => l.Contains("MISMATCH", StringComparison.Ordinal));
    }

    /// <summary>The first correct step that ends after <paramref name="since"/>: how long after it that was.</summary>
    public async Task<TimeSpan> FirstOkAfterAsync(long since, TimeSpan within)
    {
        int seen = Drive.Lines.Count;
        await Drive.WaitForLineAsync(l => l.StartsWith("step ", StringComparison.Ordinal) && l.Contains(": ok", StringComparison.Ordinal), within, skip: seen);
        return Stopwatch.GetElapsedTime(since);
    }

    /// <summary>The process id of rank <paramref name="rank"/>'s silo (from its start line; the supervisor loop is its parent).</summary>
    public int SiloPid(int rank) =>
        int.Parse(PidOf().Match(Silos[rank].Lines.Last(l => l.StartsWith("epa2a silo: rank", StringComparison.Ordinal))).Groups[1].Value, CultureInfo.InvariantCulture);

    /// <summary>A rank (2 if it can) whose silo does not host the layer's coordinator, so the cut tests the rank, not the coordinator.</summary>
    public int RankAwayFromTheCoordinator()
    {
        string formed = Drive.Lines.Last(l => l.Contains("formed over", StringComparison.Ordinal));
        int coordinator = int.Parse(ProcessOf().Match(formed).Groups[1].Value, CultureInfo.InvariantCulture);
        foreach (int r in new[] { 2, 3, 1, 0 })
        {
            string started = Silos[r].Lines.Last(l => l.StartsWith("epa2a silo: rank", StringComparison.Ordinal));
            if (int.Parse(PidOf().Match(started).Groups[1].Value, CultureInfo.InvariantCulture) != coordinator)
            {
                return r;
            }
        }

        throw new InvalidOperationException("every silo claims the coordinator's process");
    }

    /// <summary>
    /// The client's and the silos' lines since <paramref name="since"/>, in order, each with its time after it: what a
    /// missed bound is explained by. Only the client's lines and EpA2A's own (the coordinator's, the ranks', the
    /// supervisor's) are kept, each cut to one short line, so that a CI log that truncates long output still shows them;
    /// Orleans' and Polly's messages and stack traces are left out.
    /// </summary>
    public string Timeline(long since, int max = 60) => string.Join('\n', new[] { Drive }.Concat(Silos)
        .SelectMany(p => Readable(p.StampedLines).Where(l => l.At >= since).Select(l => (l.At, Line: $"{p.Name}: {l.Line.Trim()}")))
        .OrderBy(l => l.At)
        .Take(max)
        .Select(l => string.Create(CultureInfo.InvariantCulture, $"+{Stopwatch.GetElapsedTime(since, l.At).TotalMilliseconds:0} ms {(l.Line.Length > 220 ? l.Line[..220] + " ..." : l.Line)}")));

    private static IEnumerable<(long At, string Line)> Readable(IEnumerable<(long At, string Line)> lines)
    {
        bool foreign = false;
        foreach ((long at, string line) in lines)
        {
            if (LogHeader().Match(line) is { Success: true } header)
            {
                // The header line ("warn: Category[id]") says whose message follows; the message is the next line.
                foreign = !header.Groups[2].Value.StartsWith("EpA2A", StringComparison.Ordinal);
                continue;
            }

            if (!line.StartsWith(' '))
            {
                foreign = false;
            }

            string t = line.TrimStart();
            if (!foreign && !t.StartsWith("at ", StringComparison.Ordinal) && !t.StartsWith("---", StringComparison.Ordinal) && !t.StartsWith("Exc level", StringComparison.Ordinal) && !t.StartsWith("EpA2A.Grains.NoSiloForRankException", StringComparison.Ordinal))
            {
                yield return (at, line);
            }
        }
    }

    /// <summary>
    /// The coordinator re-formed the layer on the survivors within 2T of the fault at <paramref name="fault"/> (issue 18's
    /// bound; the first good step comes after the client's next step): how long after the fault it did.
    /// </summary>
    public TimeSpan AssertReformedWithinTwiceTheDeadline(long fault, string what)
    {
        TimeSpan? reform = DrillLog.ReformedAfter(Silos, fault);
        Assert.True(reform is { } r && r < Deadline * 2, $"the coordinator re-formed on the survivors {(reform is { } t ? $"{t.TotalMilliseconds:0} ms" : "never")} after the {what} (bound 2T = {(Deadline * 2).TotalSeconds:0} s); timeline:\n{Timeline(fault)}");
        return reform!.Value;
    }

    /// <summary>The client's last lines to the test output; the summary, those lines and the timeline since the fault to the drill log.</summary>
    public void Report(long fault, string summary)
    {
        TestContext.Current.TestOutputHelper?.WriteLine(string.Join('\n', Drive.Lines.TakeLast(40)));
        DrillLog.Write(summary, [.. Drive.Lines.TakeLast(40), "timeline since the fault:", .. Timeline(fault, 80).Split('\n')]);
    }

    /// <summary>How often a supervisor loop started a silo again (a silo declared dead while cut off ends itself).</summary>
    public int Restarts => Silos.Sum(s => s.Lines.Count(l => l.StartsWith("supervisor: exited", StringComparison.Ordinal)));

    public void Dispose() => Hosts.Dispose();

    [GeneratedRegex(@"coordinator runs in process (\d+)")]
    private static partial Regex ProcessOf();

    [GeneratedRegex(@"^(\w+): ([\w.]+)\[")]
    private static partial Regex LogHeader();

    [GeneratedRegex(@"pid (\d+);")]
    private static partial Regex PidOf();
}

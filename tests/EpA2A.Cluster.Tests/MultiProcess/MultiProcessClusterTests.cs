using System.Diagnostics;
using System.Globalization;
using EpA2A.Grains;

namespace EpA2A.Cluster.Tests.MultiProcess;

/// <summary>
/// A real cluster: four `epa2a silo` processes with Redis membership (redis-server on loopback) and an
/// `epa2a drive` client process. A silo is SIGKILLed while the client steps; the client's next step fails
/// within a bound naming the rank; a restarted silo process heals the group and steps succeed again. With masking the
/// coordinator re-forms on the survivors within twice the deadline of the kill, they serve (drive checks every step
/// against the masked reference), and the restarted rank is re-admitted with no client action.
/// </summary>
[Collection(ProcessCluster.Collection)]
public sealed class MultiProcessClusterTests
{
    private static readonly TimeSpan Deadline = TimeSpan.FromSeconds(3);
    private static readonly int[] VictimOrder = [2, 3, 1, 0];

    [Theory]
    [InlineData(LostRankPolicy.FailAndReform)]
    [InlineData(LostRankPolicy.Mask)]
    public async Task A_sigkilled_silo_fails_the_step_naming_its_rank_and_a_restarted_process_heals_the_group(LostRankPolicy policy)
    {
        string? redisServer = FindOnPath("redis-server");
        Assert.SkipWhen(redisServer is null, "redis-server is not installed (.ci/run installs it)");
        int redisPort = ChildProcess.FreePort();
        int portBase = 20000 + (Random.Shared.Next(0, 40) * 200);
        string clusterId = "mp-" + Guid.NewGuid().ToString("N")[..8];
        string redis = string.Create(CultureInfo.InvariantCulture, $"127.0.0.1:{redisPort}");

        using ChildProcess server = ChildProcess.Start("redis", redisServer!, "--port", redisPort.ToString(CultureInfo.InvariantCulture), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no");
        await server.WaitForLineAsync(l => l.Contains("Ready to accept connections", StringComparison.Ordinal), TimeSpan.FromSeconds(20));

        List<ChildProcess> silos = [];
        try
        {
            for (int r = 0; r < 4; r++)
            {
                silos.Add(StartSilo(r, portBase, redis, clusterId));
            }

            foreach (ChildProcess silo in silos)
            {
                await silo.WaitForLineAsync(l => l.StartsWith("epa2a silo: rank", StringComparison.Ordinal), TimeSpan.FromSeconds(60));
            }

            string[] arguments = ["drive", "--world-size", "4", "--group", "mp", "--clustering", "redis", "--redis", redis, "--cluster-id", clusterId,
                "--steps", "100000", "--continue-on-failure", "--interval-ms", "50", "--timeout-seconds", Deadline.TotalSeconds.ToString(CultureInfo.InvariantCulture)];
            using ChildProcess drive = ChildProcess.Epa2a("drive", policy == LostRankPolicy.Mask ? [.. arguments, "--masking"] : arguments);
            await drive.WaitForLineAsync(l => l.StartsWith("step ", StringComparison.Ordinal) && l.Contains(": ok", StringComparison.Ordinal), TimeSpan.FromSeconds(90));
            await drive.WaitForLineAsync(l => l.StartsWith("step 3:", StringComparison.Ordinal), TimeSpan.FromSeconds(30));
            Assert.DoesNotContain(drive.Lines, l => l.Contains("MISMATCH", StringComparison.Ordinal));

            // Masking: a rank whose silo does not host the coordinator (a lost coordinator is the client's to find: its
            // probe of it, ProcessFaultTests); fail-and-re-form: rank 2 wherever the coordinator is.
            int victim = policy == LostRankPolicy.Mask ? RankAwayFromTheCoordinator(drive, silos) : 2;
            int before = drive.Lines.Count;
            Stopwatch clock = Stopwatch.StartNew();
            long killed = Stopwatch.GetTimestamp();
            silos[victim].Kill();
            if (policy == LostRankPolicy.Mask)
            {
                await drive.WaitForLineAsync(l => l.Contains(": ok", StringComparison.Ordinal) && l.Contains($"masked ranks [{victim}]", StringComparison.Ordinal), (Deadline * 2) + TimeSpan.FromSeconds(10), skip: before);
                TimeSpan served = clock.Elapsed;
                TimeSpan? reform = DrillLog.ReformedAfter(silos, killed);
                DrillLog.Write($"timeline: mask sigkill-between-steps, rank {victim} SIGKILLed at +0 ms", DrillLog.Timeline(killed, [.. silos, drive]));
                Assert.True(reform < Deadline * 2, $"the coordinator re-formed on the survivors {reform?.TotalMilliseconds:0} ms after the kill (bound 2T = {(Deadline * 2).TotalSeconds:0} s); client lines:\n{string.Join('\n', drive.Lines.Skip(before))}");
                Assert.All(drive.Lines.Skip(before).Where(l => l.Contains("FAILED", StringComparison.Ordinal)), l => Assert.Contains($"rank {victim}", l, StringComparison.Ordinal));
                DrillLog.Outage(policy, "sigkill-between-steps", served);
                DrillLog.Reform("sigkill-between-steps", reform!.Value);

                silos[victim].Dispose();
                silos[victim] = StartSilo(victim, portBase, redis, clusterId);
                int back = drive.Lines.Count;
                Stopwatch restart = Stopwatch.StartNew();
                await drive.WaitForLineAsync(l => l.Contains(": ok", StringComparison.Ordinal) && !l.Contains("masked", StringComparison.Ordinal), TimeSpan.FromSeconds(90), skip: back);
                Assert.Empty(DrillLog.RankGrainsDeactivatedByDirectoryLoss(silos.Where((_, r) => r != victim), killed));
                Assert.DoesNotContain(drive.Lines, l => l.Contains("MISMATCH", StringComparison.Ordinal));
                Assert.DoesNotContain(drive.Lines, l => l.StartsWith("   at ", StringComparison.Ordinal) || l.Contains("--->", StringComparison.Ordinal) || l.Contains("Request [", StringComparison.Ordinal));
                TestContext.Current.TestOutputHelper?.WriteLine($"mask: rank {victim} SIGKILLed; re-formed on the survivors {reform.Value.TotalMilliseconds:0} ms after, first good masked step {served.TotalMilliseconds:0} ms after; restart to a step with every rank {restart.Elapsed.TotalMilliseconds:0} ms; client lines:\n{string.Join('\n', drive.Lines.Skip(before - 1))}");
                return;
            }

            string failed = await drive.WaitForLineAsync(l => l.Contains("FAILED", StringComparison.Ordinal), (Deadline * 2) + TimeSpan.FromSeconds(10), skip: before);
            TimeSpan detected = clock.Elapsed;
            Assert.True(failed.Contains("rank 2", StringComparison.Ordinal), $"the failed step does not name rank 2: {failed}");
            // When the killed silo also hosted the layer's coordinator (placement is random), Orleans does not fail the
            // client's pending call: the client gives up at its own documented bound, 2T + 5 s (README, RELIABILITY.md), and
            // the line says the coordinator did not answer. Otherwise the coordinator names the rank within 2T + 5 s.
            TimeSpan bound = failed.Contains("did not answer", StringComparison.Ordinal) ? (Deadline * 2) + TimeSpan.FromSeconds(7) : (Deadline * 2) + TimeSpan.FromSeconds(5);
            Assert.True(detected < bound, $"the first failed step ended {detected} after the kill (bound {bound}): {failed}");

            silos[2].Dispose();
            silos[2] = StartSilo(2, portBase, redis, clusterId);
            int afterRestart = drive.Lines.Count;
            await drive.WaitForLineAsync(l => l.Contains(": ok", StringComparison.Ordinal), TimeSpan.FromSeconds(90), skip: afterRestart);
            TimeSpan outage = clock.Elapsed; // every step fails until the rank is back: the outage includes the restart
            int healed = drive.Lines.Count;
            await drive.WaitForLineAsync(l => l.Contains(": ok", StringComparison.Ordinal), TimeSpan.FromSeconds(30), skip: healed);
            Assert.DoesNotContain(drive.Lines, l => l.Contains("MISMATCH", StringComparison.Ordinal));

            // Every failed step was one line of meaning on the client's stdout and stderr (issue 18): no stack frame, no
            // nested exception, no Orleans request dump.
            Assert.DoesNotContain(drive.Lines, l => l.StartsWith("   at ", StringComparison.Ordinal) || l.Contains("--->", StringComparison.Ordinal) || l.Contains("Request [", StringComparison.Ordinal));
            DrillLog.Outage(LostRankPolicy.FailAndReform, "sigkill-between-steps", outage);
            TestContext.Current.TestOutputHelper?.WriteLine($"failure seen {detected.TotalMilliseconds:0} ms after SIGKILL; client lines:\n{string.Join('\n', drive.Lines.Skip(before - 1))}");
        }
        finally
        {
            foreach (ChildProcess silo in silos)
            {
                silo.Dispose();
            }
        }
    }

    private static int RankAwayFromTheCoordinator(ChildProcess drive, List<ChildProcess> silos)
    {
        string formed = drive.Lines.Last(l => l.Contains("formed over", StringComparison.Ordinal));
        string pid = formed[(formed.IndexOf("in process ", StringComparison.Ordinal) + "in process ".Length)..].Split(' ')[0];
        return VictimOrder.First(r => silos[r].Id.ToString(CultureInfo.InvariantCulture) != pid);
    }

    private static ChildProcess StartSilo(int rank, int portBase, string redis, string clusterId) => ChildProcess.Epa2a(
        $"silo{rank}", "silo", "--rank", rank.ToString(CultureInfo.InvariantCulture), "--world-size", "4", "--group", "mp",
        "--clustering", "redis", "--redis", redis, "--cluster-id", clusterId, "--port-base", portBase.ToString(CultureInfo.InvariantCulture));

    private static string? FindOnPath(string name) =>
        (Environment.GetEnvironmentVariable("PATH") ?? string.Empty).Split(':')
            .Select(d => Path.Combine(d, name))
            .FirstOrDefault(File.Exists);
}

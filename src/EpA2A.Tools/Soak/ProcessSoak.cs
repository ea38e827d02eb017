using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using EpA2A.Grains;
using EpA2A.Numerics;
using EpA2A.Silo.Commands;
using EpA2A.Silo.Hosting;
using EpA2A.Telemetry;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;

namespace EpA2A.Tools.Soak;

/// <summary>
/// `epa2a-tools soak --path processes`: four real `epa2a silo` processes on Redis (a redis-server of its own on loopback)
/// and a masking layer (<see cref="LostRankPolicy.Mask"/>) stepped from this process. Every <c>killEvery</c> steps a
/// rank's silo is SIGKILLed (ranks in turn, never the coordinator's silo: that is another drill) and started again once
/// the survivors serve; kills fall in the middle of each period of <c>killEvery</c> steps. Every step is checked against the reference of the ranks it served; it reports each kill's
/// outage (kill to the first good masked step) and re-admission (restart to the first step with every rank), the wrong
/// results (must be 0), and the resident memory of the client and of each silo at every kill.
/// </summary>
internal sealed class ProcessSoak(int steps, int killEvery, int seed, int portBase, string? jsonPath)
{
    private const string Group = "soakp";
    private const int World = 4;

    /// <summary>RSS may grow this much (relative, or absolute, whichever is larger) from the first kill to the end and still be flat.</summary>
    private const double RssTolerance = 0.10;
    private const long RssSlackBytes = 32L << 20;

    private static readonly LayerSpec Spec = new()
    {
        MaxTokens = 16,
        Hidden = 32,
        TopK = 2,
        NumExperts = 8,
        WorldSize = World,
        StepTimeout = TimeSpan.FromSeconds(2),
        OnLostRank = LostRankPolicy.Mask,
    };

    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    private readonly Process?[] silos = new Process?[World];
    private string redis = string.Empty;
    private string clusterId = string.Empty;

    public async Task<bool> RunAsync(TextWriter output, CancellationToken cancellationToken)
    {
        string redisServer = (Environment.GetEnvironmentVariable("PATH") ?? string.Empty).Split(':').Select(d => Path.Combine(d, "redis-server")).FirstOrDefault(File.Exists)
            ?? throw new ArgumentException("--path processes needs redis-server on PATH");
        int redisPort = portBase + 190;
        redis = string.Create(CultureInfo.InvariantCulture, $"127.0.0.1:{redisPort}");
        clusterId = "soak-" + Guid.NewGuid().ToString("N")[..8];
        using Process redisProcess = StartProcess(redisServer, ["--port", redisPort.ToString(CultureInfo.InvariantCulture), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], null);
        await Task.Delay(500, cancellationToken);
        try
        {
            for (int r = 0; r < World; r++)
            {
                silos[r] = await StartSiloAsync(r, cancellationToken);
            }

            using IHost clientHost = EpA2AHosts.BuildClient(ClusteringKind.Redis, [], redis, clusterId);
            await clientHost.StartAsync(cancellationToken).WaitAsync(TimeSpan.FromSeconds(60), cancellationToken);
            ExpertLayerClient client = new(clientHost.Services.GetRequiredService<IClusterClient>(), Group, "soak");
            Stopwatch configuring = Stopwatch.StartNew();
            while (true)
            {
                try
                {
                    await client.ConfigureAsync(Spec).WaitAsync(TimeSpan.FromSeconds(30), cancellationToken);
                    break;
                }
                catch (Exception e) when (e is not OperationCanceledException && configuring.Elapsed < TimeSpan.FromSeconds(90))
                {
                    await Task.Delay(500, cancellationToken);
                }
            }

            CoordinatorInfo coordinator = await client.Coordinator.DescribeAsync().WaitAsync(TimeSpan.FromSeconds(10), cancellationToken);
            int[] victims = [.. Enumerable.Range(0, World).Where(r => silos[r]!.Id != coordinator.ProcessId)];
            output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"epa2a-tools soak: {steps} steps through 4 silo processes on Redis, masking on (T = {Spec.StepTimeout.TotalSeconds} s), a rank killed every {killEvery} steps (ranks {string.Join(", ", victims)} in turn; the coordinator runs in process {coordinator.ProcessId}), seed {seed}"));
            return await StepAsync(client, victims, output, cancellationToken);
        }
        finally
        {
            foreach (Process? p in silos)
            {
                Kill(p);
                p?.Dispose();
            }

            Kill(redisProcess);
        }
    }

    private async Task<bool> StepAsync(ExpertLayerClient client, int[] victims, TextWriter output, CancellationToken cancellationToken)
    {
        Random rng = new(seed);
        List<SoakKill> kills = [];
        List<RssSample> rss = [];
        SoakKill? open = null;
        int ok = 0, failed = 0, wrong = 0, masked = 0;
        Stopwatch clock = Stopwatch.StartNew();
        for (int s = 1; s <= steps && !cancellationToken.IsCancellationRequested; s++)
        {
            // Kills fall mid-period (steps 500, 1500, ... for a period of 1000): every kill has half a period to heal
            // before the next, and the last one is healed before the run ends.
            if (s % killEvery == killEvery / 2 && open is null)
            {
                rss.Add(SampleRss(s));
                int victim = victims[kills.Count % victims.Length];
                open = new SoakKill(s, victim, Stopwatch.GetTimestamp());
                Kill(silos[victim]);
            }

            try
            {
                (StepReport report, double worst, TimeSpan _) = await StepChecker.RunAsync<BFloat16>(client, Spec, rng, 0.1, skewed: false, weighted: false, cancellationToken);
                bool any = report.MaskedRanks is { Count: > 0 };
                masked += any ? 1 : 0;
                if (worst > 1.0)
                {
                    wrong++;
                    output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  step {s}: WRONG result, {worst:0.00}x the tolerance off the reference"));
                    continue;
                }

                ok++;
                if (open is { } k)
                {
                    if (k.FirstGood is null && any)
                    {
                        k = k with { FirstGood = Stopwatch.GetElapsedTime(k.At) };
                        long restartBegan = Stopwatch.GetTimestamp();
                        silos[k.Rank]!.Dispose();
                        silos[k.Rank] = await StartSiloAsync(k.Rank, cancellationToken);
                        open = k with { Restarted = restartBegan };
                    }
                    else if (k.Restarted is long restarted && !any)
                    {
                        kills.Add(k with { Readmitted = Stopwatch.GetElapsedTime(restarted) });
                        output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                            $"  kill at step {k.Step} (rank {k.Rank}): {k.FailedSteps} failed steps, first good masked step {k.FirstGood!.Value.TotalMilliseconds:0} ms after the kill; re-admitted {Stopwatch.GetElapsedTime(restarted).TotalMilliseconds:0} ms after the restart began"));
                        open = null;
                    }
                }
            }
            catch (InvalidOperationException e) when (e.Message.Contains("masked slots", StringComparison.Ordinal))
            {
                wrong++; // the step's report of what masking dropped disagrees with the reference's
                output.WriteLine($"  step {s}: WRONG masked slot count: {e.Message}");
            }
            catch (Exception e) when (e is not OperationCanceledException || !cancellationToken.IsCancellationRequested)
            {
                failed++;
                if (open is { } k)
                {
                    open = k with { FailedSteps = k.FailedSteps + 1 };
                }

                output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  step {s}: failed: {e.GetType().Name}: {e.Message.ReplaceLineEndings(" ")}"));
            }

            if (s % Math.Max(1, steps / 10) == 0)
            {
                output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  {s} steps: {ok} ok ({masked} masked), {failed} failed, {wrong} wrong, {clock.Elapsed.TotalSeconds:0.0} s"));
                output.Flush();
            }
        }

        rss.Add(SampleRss(steps));
        RssSample first = rss[0];
        RssSample last = rss[^1];
        static bool Flat(long a, long b) => b <= a + Math.Max((long)(a * RssTolerance), RssSlackBytes);
        bool clientFlat = Flat(first.Client, last.Client);

        // A silo that lived from the first sample to the end (never killed since) is compared over that span; every
        // restarted silo is compared at its kill with the first sample of the same rank (one lifetime against another).
        bool silosFlat = Enumerable.Range(0, World).All(r => rss.Where(x => x.Silos[r] > 0).All(x => Flat(first.Silos[r], x.Silos[r])));
        output.WriteLine("  RSS (MiB) at each kill and at the end: step, client, silos 0-3");
        foreach (RssSample x in rss)
        {
            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"    {x.Step,6} {Mib(x.Client),7:0.0} {string.Join(' ', x.Silos.Select(b => $"{Mib(b),7:0.0}"))}"));
        }

        double[] outages = [.. kills.Select(k => k.FirstGood!.Value.TotalMilliseconds)];
        double[] readmits = [.. kills.Select(k => k.Readmitted!.Value.TotalMilliseconds)];
        output.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"  {steps} steps in {clock.Elapsed.TotalSeconds:0.0} s: {ok} ok ({masked} served masked), {failed} failed, {wrong} wrong; {kills.Count} kills, outage (kill to first good step) {(outages.Length > 0 ? $"{outages.Min():0}-{outages.Max():0} ms, median {SampleStats.Median(outages):0} ms" : "n/a")}, re-admission {(readmits.Length > 0 ? $"{readmits.Min():0}-{readmits.Max():0} ms" : "n/a")}; client RSS {(clientFlat ? "flat" : "GROWING")}, silo RSS {(silosFlat ? "flat" : "GROWING")} (tolerance max({RssTolerance:P0}, {RssSlackBytes >> 20} MiB))"));
        if (jsonPath is not null)
        {
            var result = new
            {
                steps,
                killEvery,
                seed,
                spec = new { Spec.MaxTokens, Spec.Hidden, Spec.TopK, Spec.NumExperts, Spec.WorldSize, stepTimeoutSeconds = Spec.StepTimeout.TotalSeconds, policy = Spec.OnLostRank.ToString() },
                seconds = clock.Elapsed.TotalSeconds,
                ok,
                servedMasked = masked,
                failed,
                wrong,
                kills = kills.Select(k => new { k.Step, k.Rank, k.FailedSteps, outageMs = k.FirstGood!.Value.TotalMilliseconds, readmittedMs = k.Readmitted!.Value.TotalMilliseconds }),
                unhealedKill = open is null ? null : new { open.Step, open.Rank },
                rssToleranceRelative = RssTolerance,
                rssSlackMiB = RssSlackBytes >> 20,
                rss = rss.Select(x => new { x.Step, clientMiB = Mib(x.Client), silosMiB = x.Silos.Select(Mib) }),
                clientFlat,
                silosFlat,
            };
            await File.WriteAllTextAsync(jsonPath, JsonSerializer.Serialize(result, Indented), cancellationToken);
        }

        return wrong == 0 && open is null && clientFlat && silosFlat;
    }

    private static double Mib(long bytes) => bytes / 1048576.0;

    private RssSample SampleRss(int step)
    {
        GC.Collect(GC.MaxGeneration, GCCollectionMode.Forced, blocking: true, compacting: true);
        return new RssSample(step, Rss(Environment.ProcessId), [.. silos.Select(p => p is { HasExited: false } ? Rss(p.Id) : 0)]);
    }

    /// <summary>VmRSS of a process from /proc (0 where it cannot be read).</summary>
    private static long Rss(int pid)
    {
        try
        {
            string? line = File.ReadLines($"/proc/{pid}/status").FirstOrDefault(l => l.StartsWith("VmRSS:", StringComparison.Ordinal));
            return line is null ? 0 : long.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1], CultureInfo.InvariantCulture) * 1024;
        }
        catch (IOException)
        {
            return 0;
        }
    }

    private async Task<Process> StartSiloAsync(int rank, CancellationToken cancellationToken)
    {
        string epa2a = Path.Combine(AppContext.BaseDirectory, "epa2a.dll");
        TaskCompletionSource started = new(TaskCreationOptions.RunContinuationsAsynchronously);
        Process p = StartProcess("dotnet", [epa2a, "silo", "--rank", rank.ToString(CultureInfo.InvariantCulture), "--world-size", World.ToString(CultureInfo.InvariantCulture), "--group", Group,
            "--clustering", "redis", "--redis", redis, "--cluster-id", clusterId, "--port-base", portBase.ToString(CultureInfo.InvariantCulture)],
            line =>
            {
                if (line.StartsWith("epa2a silo: rank", StringComparison.Ordinal))
                {
                    started.TrySetResult();
                }
            });
        await started.Task.WaitAsync(TimeSpan.FromSeconds(90), cancellationToken);
        return p;
    }

    private static Process StartProcess(string file, string[] arguments, Action<string>? onLine)
    {
        ProcessStartInfo start = new(file) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (string a in arguments)
        {
            start.ArgumentList.Add(a);
        }

        Process p = new() { StartInfo = start };
        p.OutputDataReceived += (_, e) =>
        {
            if (e.Data is { } l)
            {
                onLine?.Invoke(l);
            }
        };
        p.ErrorDataReceived += (_, _) => { };
        p.Start();
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        return p;
    }

    private static void Kill(Process? p)
    {
        if (p is { HasExited: false })
        {
            p.Kill(entireProcessTree: true);
            p.WaitForExit(10_000);
        }
    }

    private sealed record SoakKill(int Step, int Rank, long At)
    {
        public int FailedSteps { get; init; }

        public TimeSpan? FirstGood { get; init; }

        public long? Restarted { get; init; }

        public TimeSpan? Readmitted { get; init; }
    }

    private sealed record RssSample(int Step, long Client, long[] Silos);
}

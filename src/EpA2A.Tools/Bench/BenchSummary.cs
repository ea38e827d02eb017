using EpA2A.Telemetry;

namespace EpA2A.Tools.Bench;

/// <summary>Median, p99 and count of a sample (µs).</summary>
internal sealed record BenchStat(double Median, double P99, int Samples)
{
    public static BenchStat Of(IReadOnlyList<double> v) => new(SampleStats.Median(v), SampleStats.Percentile(v, 0.99), v.Count);
}

internal static class BenchStats
{
    /// <summary>Per iteration, the slowest rank: a step is done when every rank is.</summary>
    public static List<double> SlowestRank(IEnumerable<List<double>> perRank)
    {
        List<List<double>> all = [.. perRank];
        if (all.Count == 0)
        {
            return [];
        }

        int n = all.Min(l => l.Count);
        return [.. Enumerable.Range(0, n).Select(i => all.Max(l => l[i]))];
    }
}

/// <summary>Graph mode: GPU times per phase (slowest rank), the replay's wall time, and the replay's ceiling % (dispatch + combine bytes over the all-rank span of a replay).</summary>
internal sealed record BenchGraphSummary(BenchStat DispatchGpu, BenchStat CombineGpu, BenchStat ReplayWall, double CeilingPct);

internal sealed record BenchCudaSummary
{
    public BenchStat? DispatchGpu { get; init; }

    public BenchStat? CombineGpu { get; init; }

    public BenchStat? DispatchWall { get; init; }

    public BenchStat? CombineWall { get; init; }

    /// <summary>Median over iterations of the slowest rank's GPU idle time between counting and sending (host size poll).</summary>
    public double DispatchHostGapUs { get; init; }

    /// <summary>Median over ranks of the median counting time (count, counts all-to-all, row assignment) inside the dispatch.</summary>
    public double DispatchPrepareUs { get; init; }

    public double DispatchCeilingPct { get; init; }

    public double CombineCeilingPct { get; init; }

    public double DispatchAlgbwGBps { get; init; }

    public double CombineAlgbwGBps { get; init; }

    /// <summary>Median over ranks of (median C# call wall time - median direct libepa2a wall time): what the C# layer adds.</summary>
    public double DispatchOrchestrationUs { get; init; }

    public double CombineOrchestrationUs { get; init; }

    /// <summary>As the orchestration numbers, but of the calls timed with CUDA events (an observer listening).</summary>
    public double DispatchOrchestrationTimedUs { get; init; }

    public double CombineOrchestrationTimedUs { get; init; }

    /// <summary>Median over ranks and iterations of (call wall time - GPU time).</summary>
    public double DispatchWallMinusGpuUs { get; init; }

    public double CombineWallMinusGpuUs { get; init; }

    public BenchGraphSummary? Graph { get; init; }

    /// <summary>Normal-mode iterations whose slowest rank took over 1.5x the median (dispatch + combine wall time).</summary>
    public int SlowIterations { get; init; }

    /// <summary>Of <see cref="SlowIterations"/>, those in which some rank's launching thread lost its core.</summary>
    public int SlowIterationsPreempted { get; init; }

    /// <summary>All timed normal-mode iterations, and those in which some rank's launching thread lost its core.</summary>
    public int Iterations { get; init; }

    public int IterationsPreempted { get; init; }

    public bool Checked { get; init; }

    public string? Error { get; init; }

    public string? GraphError { get; init; }
}

internal sealed record BenchPeerSummary(double DispatchMedianUs, double DispatchP99Us, double CombineMedianUs, double CombineP99Us, double DispatchSpeedup, double CombineSpeedup, bool Checked);

internal sealed record BenchCpuSummary(BenchStat? Dispatch, BenchStat? Combine, string? Skipped, string? Error);

internal sealed record BenchPointSummary
{
    public required string Name { get; init; }

    public required string Layout { get; init; }

    public required string Routing { get; init; }

    public int World { get; init; }

    public int Local { get; init; }

    public int Tokens { get; init; }

    public int Hidden { get; init; }

    /// <summary>Rows all ranks receive in one step, mean over the routing sets (a token's rows to its own rank included).</summary>
    public double RecvRows { get; init; }

    /// <summary>The largest receive of one rank over the sets.</summary>
    public int MaxRankRecvRows { get; init; }

    /// <summary>Bytes a dispatch (or a combine) must at least read and write over all ranks: every token read once, every row written once.</summary>
    public double FloorBytes { get; init; }

    public BenchCudaSummary? Cuda { get; init; }

    public BenchPeerSummary? Peer { get; init; }

    public BenchCpuSummary? Cpu { get; init; }
}

internal sealed record BenchSummary
{
    public required string Gpu { get; init; }

    public required string Driver { get; init; }

    public required string Date { get; init; }

    public int HostCores { get; init; }

    public double CopyBytesPerSecond { get; init; }

    public string? PeerDevice { get; init; }

    public string? PeerMissing { get; init; }

    public BenchGrainOverhead? Grains { get; init; }

    public List<string> DeviceMemory { get; init; } = [];

    /// <summary>Whether each CUDA rank's launching thread had a core of its own.</summary>
    public bool PinCores { get; init; }

    /// <summary>Where the normal mode's libepa2a calls ran: "caller thread" or "GPU worker".</summary>
    public string Calls { get; init; } = string.Empty;

    /// <summary>Per rank, the GPU soak's samples (empty without --soak-steps).</summary>
    public List<List<BenchSoakSample>> Soak { get; init; } = [];

    public List<string> SoakErrors { get; init; } = [];

    public List<string> Definitions { get; init; } = [];

    public List<BenchPointSummary> Points { get; init; } = [];

    /// <summary>With more than one pass: per point, the first and every later pass's medians and their spread.</summary>
    public List<BenchPassSpread> Spread { get; init; } = [];

    public static BenchSummary Build(BenchManifest manifest, BenchRankReport?[]? cuda, BenchPeerReport? peer, Dictionary<string, BenchCpuResult> cpu, BenchGrainOverhead? grains, string gpu, string driver, DateTime started, int cores)
    {
        double bandwidth = cuda?.FirstOrDefault()?.CopyBytesPerSecond ?? 0;
        List<BenchPointSummary> points = [];
        List<BenchPassSpread> spread = [];
        foreach (BenchPoint p in manifest.Points)
        {
            double rows = p.RecvRows.Average(r => (double)r.Sum());
            double floor = ((double)p.Tokens * p.World + rows) * p.RowBytes;
            BenchCudaSummary? c = cuda is null ? null : Cuda(p, cuda, 0, rows, floor, bandwidth);
            if (cuda is not null && manifest.Passes > 1)
            {
                spread.Add(BenchPassSpread.Of(p, [c, .. Enumerable.Range(1, manifest.Passes - 1).Select(k => Cuda(p, cuda, k, rows, floor, bandwidth))]));
            }

            BenchPeerPoint? pp = peer?.Points.FirstOrDefault(x => x.Name == p.Name);
            BenchPeerSummary? ps = pp is null ? null : new BenchPeerSummary(
                pp.Dispatch.Median, pp.Dispatch.P99, pp.Combine.Median, pp.Combine.P99,
                c?.DispatchGpu is { Median: > 0 } d ? pp.Dispatch.Median / d.Median : 0,
                c?.CombineGpu is { Median: > 0 } cb ? pp.Combine.Median / cb.Median : 0,
                pp.Checked);
            BenchCpuSummary? cs = cpu.TryGetValue(p.Name, out BenchCpuResult? cr)
                ? new BenchCpuSummary(cr.Dispatch.Count > 0 ? BenchStat.Of(cr.Dispatch) : null, cr.Combine.Count > 0 ? BenchStat.Of(cr.Combine) : null, cr.Skipped, cr.Error)
                : null;
            points.Add(new BenchPointSummary
            {
                Name = p.Name,
                Layout = p.Layout,
                Routing = p.Routing,
                World = p.World,
                Local = p.Local,
                Tokens = p.Tokens,
                Hidden = p.Hidden,
                RecvRows = rows,
                MaxRankRecvRows = p.RecvRows.Max(r => r.Max()),
                FloorBytes = floor,
                Cuda = c,
                Peer = ps,
                Cpu = cs,
            });
        }

        List<string> memory = cuda is null ? [] : [.. cuda.Select((r, i) => r is null
            ? $"rank {i}: no report"
            : r.DeviceFreeAfterPass.Count > 1
                ? $"rank {i}: free device memory {r.DeviceFreeBefore / 1048576.0:0} MiB before the sweep, after each pass (every layer disposed) {string.Join(" / ", r.DeviceFreeAfterPass.Select(f => (f / 1048576.0).ToString("0", System.Globalization.CultureInfo.InvariantCulture)))} MiB: {(r.DeviceFreeBefore - r.DeviceFreeAfterPass[0]) / 1048576.0:0} MiB held after the first pass, {(r.DeviceFreeAfterPass[0] - r.DeviceFreeAfterPass[^1]) / 1048576.0:0} MiB more after the last"
                : $"rank {i}: free device memory {r.DeviceFreeBefore / 1048576.0:0} MiB before the sweep, {r.DeviceFreeAfter / 1048576.0:0} MiB after (every layer disposed)")];
        return new BenchSummary
        {
            Gpu = gpu,
            Driver = driver,
            Date = started.ToString("yyyy-MM-ddTHH:mm:ssZ", System.Globalization.CultureInfo.InvariantCulture),
            HostCores = cores,
            CopyBytesPerSecond = bandwidth,
            PeerDevice = peer?.Device,
            PeerMissing = peer?.Missing,
            Grains = grains,
            DeviceMemory = memory,
            Calls = manifest.CallerThread ? "caller thread" : "GPU worker",
            PinCores = manifest.PinCores,
            Soak = cuda is null ? [] : [.. cuda.Select(r => r?.Soak ?? [])],
            SoakErrors = cuda is null ? [] : [.. cuda.Select((r, i) => r?.SoakError is { } e ? $"rank {i}: {e}" : null).OfType<string>()],
            Definitions =
            [
                "Times are medians (p99) over iterations of the slowest rank's time in that iteration; every iteration starts after a layer barrier.",
                "CUDA dispatch time: CUDA events on each rank's stream from the counting kernels to the end of the dispatch barrier, so the host's size poll and the send launch (host gap) are inside it.",
                "Ceiling %: (floor bytes / device copy bandwidth) / span, the span being the median over iterations of the earliest call start to the latest return over all ranks (one host clock): every rank's bytes against every rank's time, so it cannot pass 100 while the bandwidth is right. Floor bytes = every token read once + every received row written once, over all ranks (combine: rows read once + results written once). The copy bandwidth is a 1 GiB device-to-device copy measured in the same run (read + write counted). Graph mode: one replay (dispatch + combine) against both floors.",
                "Algorithm bandwidth as DeepEP counts it: received token bytes per rank / time; rows a rank sends to itself are counted (on one GPU every row is local traffic).",
                "Orchestration: median C# call wall time (GPU timing off: no observer, no metric listener) minus median wall time of the same libepa2a call sequence made directly on the GPU worker thread (per rank, then the median over ranks); the host-side table also gives it with GPU timing on.",
                "Graph mode: fixed-capacity layer, dispatch and combine captured as two CUDA graphs and replayed back to back (no host wait); GPU times from events around each graph launch.",
                "PyTorch peer: bench/torch_peer.py, all ranks' buffers in one process on the same GPU, same routing files and bytes; speedup = peer time / our time (above 1: we are faster).",
            ],
            Points = points,
            Spread = spread,
        };
    }

    private static BenchCudaSummary Cuda(BenchPoint p, BenchRankReport?[] reports, int pass, double rows, double floor, double bandwidth)
    {
        List<BenchRankPoint?> per = [.. reports.Select(r => r?.Points.FirstOrDefault(x => x.Name == p.Name && x.Pass == pass))];
        string? error = per.Select((x, i) => x is null ? $"rank {i}: no result" : x.Error is null ? null : $"rank {i}: {x.Error}").FirstOrDefault(e => e is not null);
        string? graphError = per.Select((x, i) => x?.GraphError is null ? null : $"rank {i}: {x.GraphError}").FirstOrDefault(e => e is not null);
        if (per.Any(x => x is null || x.DispatchGpu.Count == 0))
        {
            return new BenchCudaSummary { Error = error ?? "no samples", GraphError = graphError };
        }

        BenchRankPoint[] ok = [.. per.Select(x => x!)];
        BenchStat dGpu = BenchStat.Of(BenchStats.SlowestRank(ok.Select(x => x.DispatchGpu)));
        BenchStat cGpu = BenchStat.Of(BenchStats.SlowestRank(ok.Select(x => x.CombineGpu)));
        double recvBytesPerRank = rows / p.World * p.RowBytes;
        BenchGraphSummary? graph = null;
        if (ok.All(x => x.GraphDispatchGpu.Count > 0))
        {
            BenchStat gd = BenchStat.Of(BenchStats.SlowestRank(ok.Select(x => x.GraphDispatchGpu)));
            BenchStat gc = BenchStat.Of(BenchStats.SlowestRank(ok.Select(x => x.GraphCombineGpu)));
            double replaySpan = CopyCeiling.MedianSpanUs([.. ok.Select(x => CopyCeiling.Intervals(x.GraphStarts, x.GraphEnds))]);
            graph = new BenchGraphSummary(gd, gc, BenchStat.Of(BenchStats.SlowestRank(ok.Select(x => x.GraphWall))), CopyCeiling.Percent(2 * floor, bandwidth, replaySpan));
        }

        (int slow, int slowPreempted, int all, int allPreempted) = Tails(ok);
        return new BenchCudaSummary
        {
            SlowIterations = slow,
            SlowIterationsPreempted = slowPreempted,
            Iterations = all,
            IterationsPreempted = allPreempted,
            DispatchGpu = dGpu,
            CombineGpu = cGpu,
            DispatchWall = BenchStat.Of(BenchStats.SlowestRank(ok.Select(x => x.DispatchWall))),
            CombineWall = BenchStat.Of(BenchStats.SlowestRank(ok.Select(x => x.CombineWall))),
            DispatchHostGapUs = SampleStats.Median(BenchStats.SlowestRank(ok.Select(x => x.DispatchHostGap))),
            DispatchPrepareUs = SampleStats.Median([.. ok.Select(x => SampleStats.Median(x.DispatchPrepareGpu))]),
            DispatchCeilingPct = CopyCeiling.Percent(floor, bandwidth, CopyCeiling.MedianSpanUs([.. ok.Select(x => CopyCeiling.Intervals(x.DispatchStarts, x.DispatchEnds))])),
            CombineCeilingPct = CopyCeiling.Percent(floor, bandwidth, CopyCeiling.MedianSpanUs([.. ok.Select(x => CopyCeiling.Intervals(x.DispatchEnds, x.CombineEnds))])),
            DispatchAlgbwGBps = dGpu.Median > 0 ? recvBytesPerRank / dGpu.Median / 1e3 : 0,
            CombineAlgbwGBps = cGpu.Median > 0 ? recvBytesPerRank / cGpu.Median / 1e3 : 0,
            DispatchOrchestrationUs = SampleStats.Median([.. ok.Select(x => SampleStats.Median(x.DispatchWallUntimed) - SampleStats.Median(x.DirectDispatchWall))]),
            CombineOrchestrationUs = SampleStats.Median([.. ok.Select(x => SampleStats.Median(x.CombineWallUntimed) - SampleStats.Median(x.DirectCombineWall))]),
            DispatchOrchestrationTimedUs = SampleStats.Median([.. ok.Select(x => SampleStats.Median(x.DispatchWall) - SampleStats.Median(x.DirectDispatchWall))]),
            CombineOrchestrationTimedUs = SampleStats.Median([.. ok.Select(x => SampleStats.Median(x.CombineWall) - SampleStats.Median(x.DirectCombineWall))]),
            DispatchWallMinusGpuUs = SampleStats.Median([.. ok.Select(x => SampleStats.Median([.. x.DispatchWall.Zip(x.DispatchGpu, (w, g) => w - g)]))]),
            CombineWallMinusGpuUs = SampleStats.Median([.. ok.Select(x => SampleStats.Median([.. x.CombineWall.Zip(x.CombineGpu, (w, g) => w - g)]))]),
            Graph = graph,
            Checked = ok.All(x => x.Checked),
            Error = error,
            GraphError = graphError,
        };
    }

    /// <summary>
    /// The tail's cause, counted: per iteration the slowest rank's dispatch + combine wall time, and whether any rank's
    /// launching thread was preempted in it. Slow = over 1.5x the median (the issue's p99 bound).
    /// </summary>
    internal static (int Slow, int SlowPreempted, int All, int AllPreempted) Tails(IReadOnlyList<BenchRankPoint> ranks)
    {
        List<double> step = BenchStats.SlowestRank(ranks.Select(x => x.DispatchWall.Zip(x.CombineWall, (a, b) => a + b).ToList()));
        int n = Math.Min(step.Count, ranks.Min(x => x.Preemptions.Count));
        if (n == 0)
        {
            return (0, 0, 0, 0);
        }

        double median = SampleStats.Median(step);
        int slow = 0, slowPreempted = 0, preempted = 0;
        for (int i = 0; i < n; i++)
        {
            bool lost = ranks.Any(x => x.Preemptions[i] > 0);
            preempted += lost ? 1 : 0;
            if (step[i] > 1.5 * median)
            {
                slow++;
                slowPreempted += lost ? 1 : 0;
            }
        }

        return (slow, slowPreempted, n, preempted);
    }
}

/// <summary>
/// One point's medians in every pass of the sweep (slowest rank per iteration, GPU time) and the spread: the largest
/// over the smallest median, minus one. A point of 128 tokens or more should stay within 10%.
/// </summary>
internal sealed record BenchPassSpread(string Name, int Tokens, double[] DispatchMedians, double[] CombineMedians, double DispatchSpreadPct, double CombineSpreadPct)
{
    /// <summary>The bound a point of at least <see cref="BoundFromTokens"/> tokens must meet, in percent.</summary>
    public const double BoundPct = 10;

    public const int BoundFromTokens = 128;

    public bool Bounded => Tokens >= BoundFromTokens;

    public bool Within => !Bounded || (DispatchSpreadPct <= BoundPct && CombineSpreadPct <= BoundPct);

    public static BenchPassSpread Of(BenchPoint point, IReadOnlyList<BenchCudaSummary?> passes)
    {
        double[] d = [.. passes.Select(c => c?.DispatchGpu?.Median ?? double.NaN)];
        double[] c = [.. passes.Select(c => c?.CombineGpu?.Median ?? double.NaN)];
        return new BenchPassSpread(point.Name, point.Tokens, d, c, SpreadPct(d), SpreadPct(c));
    }

    /// <summary>max / min - 1 in percent; NaN when a pass has no result.</summary>
    public static double SpreadPct(IReadOnlyList<double> medians) =>
        medians.Count == 0 || medians.Any(m => double.IsNaN(m) || m <= 0) ? double.NaN : ((medians.Max() / medians.Min()) - 1) * 100;
}

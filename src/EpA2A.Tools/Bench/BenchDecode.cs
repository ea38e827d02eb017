using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using EpA2A.Config;
using EpA2A.Cuda;
using EpA2A.Layer;
using EpA2A.LowLatency;
using EpA2A.Numerics;
using EpA2A.Reference;
using EpA2A.Telemetry;

namespace EpA2A.Tools.Bench;

/// <summary>
/// `epa2a-tools bench --decode`: the decode sweep of issue 11 on the low-latency layer. One process per rank on the GPU
/// (MPS); per point (tokens per rank x hidden x routing x dispatch format) the step is captured as CUDA graphs of its four
/// split phases (zero-copy, weighted combine) and replayed after a device barrier each time; the GPU time of dispatch and
/// combine (CUDA events) gives median and p99 over the timed replays. Rank 0 then measures the device copy ceiling, and
/// the table shows each phase against its byte floor (bytes read + written by all ranks / the ceiling) and the algorithm
/// bandwidth both ways: per (token, expert) pair, as low-latency kernels count, and per destination rank, deduplicated,
/// as DeepEP's normal mode counts. Each point's rows per expert are checked against the routing on every rank.
/// </summary>
internal static class BenchDecode
{
    private const string ManifestFile = "decode-manifest.json";

    /// <summary>The orchestrator: writes the manifest, runs the rank processes, writes JSON and markdown, prints the table.</summary>
    public static async Task<int> RunAsync(BenchDecodeManifest manifest, int gpus, bool pinCores, string outDir, TimeSpan limit, TextWriter console, CancellationToken ct)
    {
        if (!NvshmemRuntime.IsAvailable(out string why))
        {
            await console.WriteLineAsync($"epa2a-tools bench --decode needs a usable GPU: {why}").ConfigureAwait(false);
            return 2;
        }

        DateTime started = DateTime.UtcNow;
        string dir = Directory.CreateTempSubdirectory("epa2a-decode-").FullName;
        await File.WriteAllTextAsync(Path.Combine(dir, ManifestFile), JsonSerializer.Serialize(manifest, BenchJson.Indented), ct).ConfigureAwait(false);
        (string gpu, string driver) = RankProcesses.GpuName();
        int points = manifest.Tokens.Length * manifest.Hidden.Length * manifest.Routing.Length * manifest.Formats.Length * manifest.Kernels.Length;
        await console.WriteLineAsync(string.Create(CultureInfo.InvariantCulture, $"== epa2a-tools bench --decode {started:yyyy-MM-ddTHH:mm:ssZ} on {gpu} (driver {driver}): {manifest.World} ranks, {points} points x {manifest.Iterations} graph replays, seed {manifest.Seed}")).ConfigureAwait(false);
        List<Process> ranks = [];
        StringBuilder logs = new();
        try
        {
            for (int r = 0; r < manifest.World; r++)
            {
                ranks.Add(RankProcesses.Start(
                    ["bench", "--decode", "--rank", $"{r}", "--world", $"{manifest.World}", "--dir", dir, "--gpus", $"{gpus}"],
                    (line, stderr) =>
                    {
                        lock (logs)
                        {
                            logs.AppendLine(CultureInfo.InvariantCulture, $"[rank {r}{(stderr ? " stderr" : string.Empty)}] {line}");
                        }
                    },
                    pinCores ? CoreAffinity.Plan(r, manifest.World, Environment.ProcessorCount) : null));
            }

            if (!await RankProcesses.WaitAsync(ranks, limit, ct).ConfigureAwait(false))
            {
                await console.WriteLineAsync($"bench --decode: rank processes still running after {limit.TotalSeconds:0} s: killing them").ConfigureAwait(false);
            }
        }
        finally
        {
            await RankProcesses.KillAsync(ranks).ConfigureAwait(false);
        }

        string log;
        lock (logs)
        {
            log = logs.ToString();
        }

        await File.WriteAllTextAsync(Path.Combine(dir, "ranks.log"), log, ct).ConfigureAwait(false);
        foreach (string line in log.Split('\n').Where(l => l.Contains("FAIL", StringComparison.Ordinal) || l.Contains("Unhandled", StringComparison.Ordinal)).Take(20))
        {
            await console.WriteLineAsync(line).ConfigureAwait(false);
        }

        BenchDecodeRankReport?[] reports = new BenchDecodeRankReport?[manifest.World];
        for (int r = 0; r < manifest.World; r++)
        {
            string path = Path.Combine(dir, $"decode_{r}.json");
            if (File.Exists(path))
            {
                reports[r] = JsonSerializer.Deserialize<BenchDecodeRankReport>(await File.ReadAllTextAsync(path, ct).ConfigureAwait(false));
            }

            if (ranks[r].ExitCode != 0)
            {
                await console.WriteLineAsync($"bench --decode: rank {r} exited with {ranks[r].ExitCode} (log: {Path.Combine(dir, "ranks.log")})").ConfigureAwait(false);
            }

            ranks[r].Dispose();
        }

        BenchDecodeSummary summary = Summarize(manifest, reports, gpu, driver, started);
        Directory.CreateDirectory(outDir);
        string stem = $"bench-decode-{new string([.. gpu.ToLowerInvariant().Select(ch => char.IsAsciiLetterOrDigit(ch) ? ch : '-')])}-{started:yyyy-MM-dd}";
        string markdown = Markdown(summary);
        await File.WriteAllTextAsync(Path.Combine(outDir, $"{stem}.json"), JsonSerializer.Serialize(summary, BenchJson.Indented), ct).ConfigureAwait(false);
        await File.WriteAllTextAsync(Path.Combine(outDir, $"{stem}.md"), markdown, ct).ConfigureAwait(false);
        await console.WriteLineAsync().ConfigureAwait(false);
        await console.WriteAsync(markdown).ConfigureAwait(false);
        await console.WriteLineAsync($"results: {Path.Combine(outDir, stem)}.{{json,md}}").ConfigureAwait(false);
        bool failed = reports.Any(r => r is null) || summary.Points.Any(p => p.Error is not null);
        if (failed)
        {
            await console.WriteLineAsync($"bench --decode: rank logs kept in {dir}").ConfigureAwait(false);
            return 1;
        }

        Directory.Delete(dir, recursive: true);
        return 0;
    }

    /// <summary>One rank process: every point of the manifest, one layer per hidden size (capacity = the largest token count).</summary>
    public static async Task<int> RankAsync(int rank, int world, int gpus, string dir, TextWriter log, CancellationToken ct)
    {
        BenchDecodeManifest manifest = JsonSerializer.Deserialize<BenchDecodeManifest>(await File.ReadAllTextAsync(Path.Combine(dir, ManifestFile), ct).ConfigureAwait(false))
            ?? throw new InvalidDataException("empty decode manifest");
        using NvshmemRuntime runtime = await RankProcesses.JoinNvshmemAsync(dir, rank, world, gpus, ct).ConfigureAwait(false);
        List<BenchDecodeRankPoint> results = [];
        string path = Path.Combine(dir, $"decode_{rank}.json");
        int maxTokens = manifest.Tokens.Max();
        foreach (int hidden in manifest.Hidden)
        {
            EpConfig config = new(maxTokens, hidden, manifest.TopK, manifest.Experts, rank, world, world);
            using EpLowLatencyLayer layer = EpLowLatencyLayer.CreateCuda(config, runtime, new EpLowLatencyOptions { StepTimeout = TimeSpan.FromSeconds(30), NumSms = manifest.NumSms });
            using DeviceBuffer<BFloat16> x = DeviceBuffer.Allocate<BFloat16>(runtime, maxTokens, hidden);
            using DeviceBuffer<int> ids = DeviceBuffer.Allocate<int>(runtime, maxTokens, manifest.TopK);
            using DeviceBuffer<float> weights = DeviceBuffer.Allocate<float>(runtime, maxTokens, manifest.TopK);

            // Zero-copy combine from a zeroed combine buffer (before any step, so no peer reads it yet).
            await DeviceCopies.FillAsync(runtime, layer.DeviceCombineBuffer.Pointer, layer.DeviceCombineBuffer.ByteLength, 0).ConfigureAwait(false);
            foreach (string routing in manifest.Routing)
            {
                foreach (int tokens in manifest.Tokens)
                {
                    foreach ((string format, string kernels) in manifest.Formats.SelectMany(f => manifest.Kernels.Select(k => (f, k))))
                    {
                        BenchDecodeRankPoint point = new() { Hidden = hidden, Tokens = tokens, Routing = routing, Format = format, Kernels = kernels };
                        Stopwatch sw = Stopwatch.StartNew();
                        try
                        {
                            await RunPointAsync(manifest, runtime, layer, config, x, ids, weights, point).ConfigureAwait(false);
                        }
                        catch (Exception e) when (e is not OutOfMemoryException)
                        {
                            point.Error = $"{e.GetType().Name}: {e.Message}";
                            await log.WriteLineAsync($"[decode rank {rank}] {point.Key} FAIL {point.Error}").ConfigureAwait(false);
                            results.Add(point);
                            await File.WriteAllTextAsync(path, JsonSerializer.Serialize(new BenchDecodeRankReport(rank, 0, results)), CancellationToken.None).ConfigureAwait(false);
                            throw;
                        }

                        results.Add(point);
                        await log.WriteLineAsync(string.Create(CultureInfo.InvariantCulture, $"[decode rank {rank}] {point.Key}: dispatch {point.DispatchMedianUs:0.0} us (p99 {point.DispatchP99Us:0.0}), combine {point.CombineMedianUs:0.0} us (p99 {point.CombineP99Us:0.0}) in {sw.Elapsed.TotalSeconds:0.0} s")).ConfigureAwait(false);
                        await File.WriteAllTextAsync(path, JsonSerializer.Serialize(new BenchDecodeRankReport(rank, 0, results)), CancellationToken.None).ConfigureAwait(false);
                    }
                }
            }
        }

        double bandwidth = rank == 0 ? await DeviceCopies.MeasureBandwidthAsync(runtime).ConfigureAwait(false) : 0;
        await File.WriteAllTextAsync(path, JsonSerializer.Serialize(new BenchDecodeRankReport(rank, bandwidth, results)), CancellationToken.None).ConfigureAwait(false);
        return 0;
    }

    private static async Task RunPointAsync(
        BenchDecodeManifest m,
        NvshmemRuntime runtime,
        EpLowLatencyLayer layer,
        EpConfig config,
        DeviceBuffer<BFloat16> x,
        DeviceBuffer<int> ids,
        DeviceBuffer<float> weights,
        BenchDecodeRankPoint point)
    {
        int rank = config.Rank;
        int n = point.Tokens;
        point.Blocks = CudaLowLatencyDiagnostics.KernelBlocks(layer);
        int k = m.TopK;

        // Every rank draws the whole group's routing from the same seed (so each can check its receive), and uses its own.
        Random rng = new(unchecked((m.Seed * 1_000_003) + (n * 2) + (point.Routing == "skewed" ? 1 : 0)));
        RankInput<BFloat16>[] inputs = RoutingGenerator.Draw<BFloat16>(config, [.. Enumerable.Repeat(n, config.WorldSize)], 0, point.Routing == "skewed", withWeights: true, rng);
        RankInput<BFloat16> mine = inputs[rank];
        await DeviceCopies.UploadAsync(runtime, mine.Tokens, new DeviceTensor<BFloat16>(x.Tensor.Pointer, [n * config.Hidden], x)).ConfigureAwait(false);
        await DeviceCopies.UploadAsync(runtime, mine.ExpertIds, new DeviceTensor<int>(ids.Tensor.Pointer, [n * k], ids)).ConfigureAwait(false);
        await DeviceCopies.UploadAsync(runtime, mine.Weights!, new DeviceTensor<float>(weights.Tensor.Pointer, [n * k], weights)).ConfigureAwait(false);
        LowLatencyDispatchOptions format = point.Format switch
        {
            "fp8" => LowLatencyDispatchOptions.Fp8,
            "fp8-pow2" => LowLatencyDispatchOptions.Fp8PowerOfTwo,
            _ => LowLatencyDispatchOptions.Bf16,
        };
        using EpLowLatencyGraph graph = await EpLowLatencyGraph.CaptureAsync(
            layer,
            new DeviceTensor<BFloat16>(x.Tensor.Pointer, [n, config.Hidden], x),
            new DeviceTensor<int>(ids.Tensor.Pointer, [n, k], ids),
            new DeviceTensor<float>(weights.Tensor.Pointer, [n, k], weights),
            format,
            expertOutput: null,
            weighted: true,
            oneKernel: point.Kernels == "one").ConfigureAwait(false);

        GC.Collect(2, GCCollectionMode.Forced, blocking: true, compacting: true);
        GC.WaitForPendingFinalizers();
        List<double> dispatch = new(m.Iterations), combine = new(m.Iterations), dispatchSend = new(m.Iterations), combineSend = new(m.Iterations);
        for (int i = 0; i < m.Warmup + m.Iterations; i++)
        {
            LowLatencyGraphReplay r = await graph.ReplayStepAsync().ConfigureAwait(false);
            if (i >= m.Warmup)
            {
                dispatch.Add(r.Dispatch.TotalMicroseconds);
                combine.Add(r.Combine.TotalMicroseconds);
                dispatchSend.Add(r.DispatchSend.TotalMicroseconds);
                combineSend.Add(r.CombineSend.TotalMicroseconds);
            }
        }

        // The receive of the last replay against the routing.
        await CudaLowLatencyDiagnostics.SynchronizeAsync(layer).ConfigureAwait(false);
        int[] rows = new int[config.ExpertsPerRank];
        await DeviceCopies.DownloadAsync(runtime, graph.Dispatch.RowsPerExpert, rows).ConfigureAwait(false);
        for (int j = 0; j < rows.Length; j++)
        {
            int expert = (rank * config.ExpertsPerRank) + j;
            int want = inputs.Sum(input => input.ExpertIds.Count(e => e == expert));
            if (rows[j] != want)
            {
                throw new InvalidDataException($"rank {rank}: local expert {j} received {rows[j]} rows, the routing says {want}");
            }
        }

        // Bytes and pairs of the whole group, for floors and algorithm bandwidth.
        int groups = config.Hidden / LowLatencyDispatchOptions.ScaleGroup;
        double wire = format.Format == LowLatencyFormat.Fp8 ? config.Hidden + (4.0 * groups) : 2.0 * config.Hidden;
        long pairs = inputs.Sum(input => (long)input.ExpertIds.Count(e => e < config.NumExperts));
        long dedup = inputs.Sum(input => (long)Enumerable.Range(0, input.Count).Sum(t => input.ExpertIds.AsSpan(t * k, k).ToArray().Where(e => e < config.NumExperts).Select(e => e / config.ExpertsPerRank).Distinct().Count()));
        point.RowsReceived = rows.Sum();
        point.GroupPairs = pairs;
        point.GroupDestinations = dedup;
        point.MyPairs = mine.ExpertIds.Count(e => e < config.NumExperts);
        point.MyDestinations = Enumerable.Range(0, n).Sum(t => mine.ExpertIds.AsSpan(t * k, k).ToArray().Where(e => e < config.NumExperts).Select(e => e / config.ExpertsPerRank).Distinct().Count());
        point.DispatchRowBytes = wire;
        point.CombineRowBytes = 2.0 * config.Hidden;

        // Floors: dispatch moves every row once (read at the source, written at the destination); combine reads every
        // row once and writes each token once.
        point.DispatchFloorBytes = 2.0 * pairs * wire;
        point.CombineFloorBytes = (pairs * 2.0 * config.Hidden) + ((double)n * config.WorldSize * 2.0 * config.Hidden);
        point.DispatchMedianUs = SampleStats.Percentile(dispatch, 0.5);
        point.DispatchP99Us = SampleStats.Percentile(dispatch, 0.99);
        point.CombineMedianUs = SampleStats.Percentile(combine, 0.5);
        point.CombineP99Us = SampleStats.Percentile(combine, 0.99);
        point.DispatchSendMedianUs = SampleStats.Percentile(dispatchSend, 0.5);
        point.CombineSendMedianUs = SampleStats.Percentile(combineSend, 0.5);
    }

    private static BenchDecodeSummary Summarize(BenchDecodeManifest m, BenchDecodeRankReport?[] reports, string gpu, string driver, DateTime started)
    {
        double ceiling = reports[0]?.CopyBytesPerSecond ?? 0;
        List<BenchDecodePoint> points = [];
        foreach (BenchDecodeRankPoint lead in reports[0]?.Points ?? [])
        {
            BenchDecodeRankPoint?[] per = [.. reports.Select(r => r?.Points.FirstOrDefault(p => p.Key == lead.Key))];
            string? error = per.Select((p, r) => p is null ? $"rank {r}: no result" : p.Error is null ? null : $"rank {r}: {p.Error}").FirstOrDefault(e => e is not null);
            double Us(double bytes) => ceiling > 0 ? bytes / ceiling * 1e6 : 0;
            double Gbps(double bytes, double us) => us > 0 ? bytes / (us * 1e-6) / 1e9 : 0;
            points.Add(new BenchDecodePoint
            {
                Hidden = lead.Hidden,
                Tokens = lead.Tokens,
                Routing = lead.Routing,
                Format = lead.Format,
                Kernels = lead.Kernels,
                Blocks = lead.Blocks,
                Error = error,
                DispatchMedianUs = lead.DispatchMedianUs,
                DispatchP99Us = lead.DispatchP99Us,
                DispatchWorstRankMedianUs = per.Max(p => p?.DispatchMedianUs ?? 0),
                CombineMedianUs = lead.CombineMedianUs,
                CombineP99Us = lead.CombineP99Us,
                CombineWorstRankMedianUs = per.Max(p => p?.CombineMedianUs ?? 0),
                DispatchSendMedianUs = lead.DispatchSendMedianUs,
                CombineSendMedianUs = lead.CombineSendMedianUs,
                DispatchFloorUs = Us(lead.DispatchFloorBytes),
                CombineFloorUs = Us(lead.CombineFloorBytes),
                DispatchPairGBps = Gbps(lead.MyPairs * lead.DispatchRowBytes, lead.DispatchMedianUs),
                DispatchRankGBps = Gbps(lead.MyDestinations * lead.DispatchRowBytes, lead.DispatchMedianUs),
                CombinePairGBps = Gbps(lead.MyPairs * lead.CombineRowBytes, lead.CombineMedianUs),
                CombineRankGBps = Gbps(lead.MyDestinations * lead.CombineRowBytes, lead.CombineMedianUs),
            });
        }

        return new BenchDecodeSummary
        {
            Gpu = gpu,
            Driver = driver,
            Date = started.ToString("yyyy-MM-ddTHH:mm:ssZ", CultureInfo.InvariantCulture),
            World = m.World,
            TopK = m.TopK,
            Experts = m.Experts,
            Iterations = m.Iterations,
            NumSms = m.NumSms,
            CopyBytesPerSecond = ceiling,
            Points = points,
        };
    }

    private static string Markdown(BenchDecodeSummary s)
    {
        StringBuilder sb = new();
        sb.AppendLine(CultureInfo.InvariantCulture, $"# Low-latency decode sweep on {s.Gpu}");
        sb.AppendLine();
        sb.AppendLine(CultureInfo.InvariantCulture, $"{s.Date}, driver {s.Driver}; {s.World} ranks as processes on the GPU (MPS), top-{s.TopK} of {s.Experts}, {string.Join(" / ", s.Points.Select(p => p.Blocks).Distinct())} blocks a kernel (asked for {s.NumSms?.ToString(CultureInfo.InvariantCulture) ?? "the default"}; capped so that every rank's grid fits on the GPU at once); every point captured as CUDA graphs of the four split phases (zero-copy weighted combine) and replayed {s.Iterations} times after a device barrier each.");
        sb.AppendLine(CultureInfo.InvariantCulture, $"GPU times from CUDA events on rank 0 (median, p99) and the slowest rank's median. Copy ceiling {s.CopyBytesPerSecond / 1e12:0.00} TB/s (device-to-device read + write, this run); floor = bytes read + written by all ranks / ceiling (dispatch: FP8 bytes plus scales, or bf16, once per (token, expert) row; combine: every row read once, every token written once). Algorithm bandwidth of rank 0: per (token, expert) pair, and per destination rank deduplicated.");
        sb.AppendLine();
        sb.AppendLine("| hidden | tokens | routing | format | kernels | dispatch us | p99 | p99/med | worst rank | floor us | x floor | combine us | p99 | p99/med | worst rank | floor us | x floor | dispatch GB/s pair / rank | combine GB/s pair / rank |");
        sb.AppendLine("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        foreach (BenchDecodePoint p in s.Points)
        {
            if (p.Error is not null)
            {
                sb.AppendLine(CultureInfo.InvariantCulture, $"| {p.Hidden} | {p.Tokens} | {p.Routing} | {p.Format} | {p.Kernels} | FAILED: {p.Error} |");
                continue;
            }

            static string R(double a, double b) => b > 0 ? (a / b).ToString("0.00", CultureInfo.InvariantCulture) : "-";
            sb.AppendLine(CultureInfo.InvariantCulture, $"| {p.Hidden} | {p.Tokens} | {p.Routing} | {p.Format} | {p.Kernels} | {p.DispatchMedianUs:0.0} | {p.DispatchP99Us:0.0} | {R(p.DispatchP99Us, p.DispatchMedianUs)} | {p.DispatchWorstRankMedianUs:0.0} | {p.DispatchFloorUs:0.0} | {R(p.DispatchMedianUs, p.DispatchFloorUs)} | {p.CombineMedianUs:0.0} | {p.CombineP99Us:0.0} | {R(p.CombineP99Us, p.CombineMedianUs)} | {p.CombineWorstRankMedianUs:0.0} | {p.CombineFloorUs:0.0} | {R(p.CombineMedianUs, p.CombineFloorUs)} | {p.DispatchPairGBps:0} / {p.DispatchRankGBps:0} | {p.CombinePairGBps:0} / {p.CombineRankGBps:0} |");
        }

        sb.AppendLine();
        sb.AppendLine("Targets (hidden 7168, uniform, graph replay): 128 tokens FP8 dispatch <= 30 us, combine <= 45 us (each within 1.6x of its floor); 1 token <= 15 us each; p99 <= 1.3x median everywhere.");
        foreach (BenchDecodePoint p in s.Points.Where(p => p.Error is null && p.Hidden == 7168 && p.Routing == "uniform" && p.Format == "fp8" && p.Tokens is 1 or 128))
        {
            double d = p.Tokens == 1 ? 15 : 30, c = p.Tokens == 1 ? 15 : 45;
            sb.AppendLine(CultureInfo.InvariantCulture, $"- {p.Tokens} token(s), {p.Kernels} kernels: dispatch {p.DispatchMedianUs:0.0} us ({(p.DispatchMedianUs <= d ? "met" : "MISSED")} {d} us), combine {p.CombineMedianUs:0.0} us ({(p.CombineMedianUs <= c ? "met" : "MISSED")} {c} us)");
        }

        int tails = s.Points.Count(p => p.Error is null && (p.DispatchP99Us > 1.3 * p.DispatchMedianUs || p.CombineP99Us > 1.3 * p.CombineMedianUs));
        sb.AppendLine(CultureInfo.InvariantCulture, $"- p99 above 1.3x the median at {tails} of {s.Points.Count} points");
        return sb.ToString();
    }
}

/// <summary>What the decode ranks run.</summary>
internal sealed record BenchDecodeManifest
{
    public int World { get; init; } = 8;

    public int TopK { get; init; } = 8;

    public int Experts { get; init; } = 256;

    public int[] Tokens { get; init; } = [1, 8, 32, 64, 128, 256];

    public int[] Hidden { get; init; } = [7168, 4096];

    public string[] Routing { get; init; } = ["uniform", "skewed"];

    public string[] Formats { get; init; } = ["fp8", "bf16"];

    /// <summary>split: a send and a receive kernel a phase (4 graphs); one: one kernel a phase (epa2a_ll_dispatch / _combine).</summary>
    public string[] Kernels { get; init; } = ["split", "one"];

    public int Iterations { get; init; } = 1000;

    public int Warmup { get; init; } = 50;

    public int Seed { get; init; } = 42;

    public int? NumSms { get; init; }
}

/// <summary>One rank's measurements of one point.</summary>
internal sealed class BenchDecodeRankPoint
{
    public int Hidden { get; init; }

    public int Tokens { get; init; }

    public required string Routing { get; init; }

    public required string Format { get; init; }

    public string Kernels { get; init; } = "split";

    public string Key => $"h{Hidden}-t{Tokens}-{Routing}-{Format}-{Kernels}";

    /// <summary>Blocks each kernel launched with (the SM budget after the layer's cap for ranks sharing the GPU).</summary>
    public int Blocks { get; set; }

    public string? Error { get; set; }

    public double DispatchMedianUs { get; set; }

    public double DispatchP99Us { get; set; }

    public double CombineMedianUs { get; set; }

    public double CombineP99Us { get; set; }

    public double DispatchSendMedianUs { get; set; }

    public double CombineSendMedianUs { get; set; }

    public int RowsReceived { get; set; }

    public long GroupPairs { get; set; }

    public long GroupDestinations { get; set; }

    public long MyPairs { get; set; }

    public long MyDestinations { get; set; }

    public double DispatchRowBytes { get; set; }

    public double CombineRowBytes { get; set; }

    public double DispatchFloorBytes { get; set; }

    public double CombineFloorBytes { get; set; }
}

/// <summary>A rank's report; rank 0's carries the copy ceiling.</summary>
internal sealed record BenchDecodeRankReport(int Rank, double CopyBytesPerSecond, List<BenchDecodeRankPoint> Points);

/// <summary>One row of the decode table.</summary>
internal sealed record BenchDecodePoint
{
    public int Hidden { get; init; }

    public int Tokens { get; init; }

    public required string Routing { get; init; }

    public required string Format { get; init; }

    public string Kernels { get; init; } = "split";

    public int Blocks { get; init; }

    public string? Error { get; init; }

    public double DispatchMedianUs { get; init; }

    public double DispatchP99Us { get; init; }

    public double DispatchWorstRankMedianUs { get; init; }

    public double CombineMedianUs { get; init; }

    public double CombineP99Us { get; init; }

    public double CombineWorstRankMedianUs { get; init; }

    public double DispatchSendMedianUs { get; init; }

    public double CombineSendMedianUs { get; init; }

    public double DispatchFloorUs { get; init; }

    public double CombineFloorUs { get; init; }

    public double DispatchPairGBps { get; init; }

    public double DispatchRankGBps { get; init; }

    public double CombinePairGBps { get; init; }

    public double CombineRankGBps { get; init; }
}

/// <summary>The decode sweep's JSON.</summary>
internal sealed record BenchDecodeSummary
{
    public required string Gpu { get; init; }

    public required string Driver { get; init; }

    public required string Date { get; init; }

    public int World { get; init; }

    public int TopK { get; init; }

    public int Experts { get; init; }

    public int Iterations { get; init; }

    public int? NumSms { get; init; }

    public double CopyBytesPerSecond { get; init; }

    public required List<BenchDecodePoint> Points { get; init; }
}

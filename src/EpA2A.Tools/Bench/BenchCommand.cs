using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using EpA2A.Cuda;

namespace EpA2A.Tools.Bench;

/// <summary>
/// `epa2a-tools bench`: the sweep of issue 6. Draws the routing of every point (uniform and skewed, fresh per routing
/// set) into files, then times the CUDA backend (one process per rank on the GPU, in-process device API, normal
/// and graph mode), the PyTorch peer on the same routing files, the CPU backend (in-process group), and the
/// grain-path overhead; writes JSON, a markdown table and a PNG plot to --out and prints the table last.
/// </summary>
internal static class BenchCommand
{
    public static Command Create()
    {
        Option<string> backend = new("--backend") { Description = "cuda, cpu or both (default: both when a GPU is usable, else cpu)", DefaultValueFactory = _ => "auto" };
        Option<string> tokens = new("--tokens") { Description = "Tokens per rank, comma-separated", DefaultValueFactory = _ => "1,128,512,4096,8192" };
        Option<string> hidden = new("--hidden") { Description = "Hidden sizes, comma-separated", DefaultValueFactory = _ => "2048,7168" };
        Option<string> layouts = new("--layouts") { Description = "intra (one node) and/or inter (LocalWorldSize --local)", DefaultValueFactory = _ => "intra,inter" };
        Option<string> routing = new("--routing") { Description = "uniform and/or skewed", DefaultValueFactory = _ => "uniform,skewed" };
        Option<int> ranks = new("--ranks") { Description = "World size", DefaultValueFactory = _ => 8 };
        Option<int> local = new("--local") { Description = "LocalWorldSize of the inter layout", DefaultValueFactory = _ => 2 };
        Option<int> topK = new("--topk") { DefaultValueFactory = _ => 8 };
        Option<int> experts = new("--experts") { DefaultValueFactory = _ => 256 };
        Option<int> sets = new("--sets") { Description = "Routing sets per point (fresh random routing each)", DefaultValueFactory = _ => 3 };
        Option<int> iterations = new("--iterations") { Description = "Timed iterations per routing set", DefaultValueFactory = _ => 10 };
        Option<int> warmup = new("--warmup") { Description = "Untimed iterations before the first set (1 before the others)", DefaultValueFactory = _ => 3 };
        Option<int> seed = new("--seed") { DefaultValueFactory = _ => 42 };
        Option<int> gpus = new("--gpus") { Description = "GPUs to spread the ranks over (rank r uses device r mod N)", DefaultValueFactory = _ => 1 };
        Option<string> peer = new("--peer") { Description = "Python with torch for the PyTorch peer, or none", DefaultValueFactory = _ => "python3" };
        Option<bool> noGrains = new("--no-grains") { Description = "Skip the grain-path overhead measurement" };
        Option<double> cpuBudget = new("--cpu-max-gb") { Description = "CPU backend: skip points whose received rows exceed this many GB in all", DefaultValueFactory = _ => 3 };
        Option<string> calls = new("--calls") { Description = "CUDA normal mode: libepa2a calls on the caller's thread (caller) or handed to the GPU worker thread (worker)", DefaultValueFactory = _ => "caller" };
        Option<string> pinCores = new("--pin-cores") { Description = "CUDA rank processes: give each rank's GPU thread a core of its own (on) or leave placement to the scheduler (off)", DefaultValueFactory = _ => "on" };
        Option<int> numSms = new("--num-sms") { Description = "CUDA: blocks of each token kernel per rank (EpConfig.NumSms) of the swept layers", DefaultValueFactory = _ => 32 };
        Option<int> passes = new("--passes") { Description = "CUDA: run the whole sweep this many times in the same rank processes and print each point's spread (and free device memory after each pass)", DefaultValueFactory = _ => 1 };
        Option<int> soak = new("--soak-steps") { Description = "CUDA: after the sweep, this many steps with random token counts on one layer, device memory sampled (0: none)", DefaultValueFactory = _ => 0 };
        Option<string?> fromJson = new("--from-json") { HelpName = "FILE", Description = "Only write the markdown and the plot again from a saved bench JSON (next to it)" };
        Option<string?> output = new("--out") { HelpName = "DIR", Description = "Where the results go (default: bench/results)" };
        Option<double> limit = new("--timeout-seconds") { Description = "Deadline of the GPU rank processes", DefaultValueFactory = _ => 540 };
        Option<bool> decode = new("--decode") { Description = "The low-latency decode sweep instead (issue 11): graph replays of the split phases, median and p99, byte floors, algorithm bandwidth" };
        Option<string> decodeTokens = new("--decode-tokens") { Description = "Decode sweep: tokens per rank", DefaultValueFactory = _ => "1,8,32,64,128,256" };
        Option<string> decodeHidden = new("--decode-hidden") { Description = "Decode sweep: hidden sizes", DefaultValueFactory = _ => "7168,4096" };
        Option<string> decodeFormats = new("--decode-formats") { Description = "Decode sweep: dispatch formats (fp8, fp8-pow2, bf16)", DefaultValueFactory = _ => "fp8,bf16" };
        Option<string> decodeKernels = new("--decode-kernels") { Description = "Decode sweep: split (send and receive kernels, 4 graphs a step) and/or one (one kernel a phase)", DefaultValueFactory = _ => "split,one" };
        Option<int> decodeIterations = new("--decode-iterations") { Description = "Decode sweep: timed graph replays a point", DefaultValueFactory = _ => 1000 };
        Option<int?> decodeSms = new("--decode-sms") { Description = "Decode sweep: blocks of each low-latency kernel per rank (default EpConfig.NumSms)" };
        Option<int?> rank = new("--rank") { Hidden = true };
        Option<string?> dir = new("--dir") { Hidden = true };
        Option<int> world = new("--world") { Hidden = true, DefaultValueFactory = _ => 8 };

        Command command = new("bench", "Benchmark dispatch and combine: CUDA (rank processes under MPS) and CPU backends, a PyTorch peer on the same routing, the grain path; JSON, table and plot to bench/results.")
        {
            backend, tokens, hidden, layouts, routing, ranks, local, topK, experts, sets, iterations, warmup, seed, gpus, peer, noGrains, calls, pinCores, numSms, passes, soak, fromJson, cpuBudget, output, limit, decode, decodeTokens, decodeHidden, decodeFormats, decodeKernels, decodeIterations, decodeSms, rank, dir, world,
        };
        command.SetAction(async (p, ct) =>
        {
            if (p.GetValue(rank) is { } dr && p.GetValue(decode))
            {
                return await BenchDecode.RankAsync(dr, p.GetValue(world), p.GetValue(gpus), p.GetValue(dir)!, Console.Out, ct);
            }

            if (p.GetValue(decode))
            {
                string[] formats = Words(p.GetValue(decodeFormats)!);
                if (formats.Any(f => f is not ("fp8" or "fp8-pow2" or "bf16")) || Words(p.GetValue(routing)!).Any(r => r is not ("uniform" or "skewed")))
                {
                    throw new ArgumentException("--decode-formats takes fp8, fp8-pow2, bf16 and --routing uniform, skewed");
                }

                BenchDecodeManifest manifest = new()
                {
                    World = p.GetValue(ranks),
                    TopK = p.GetValue(topK),
                    Experts = p.GetValue(experts),
                    Tokens = Ints(p.GetValue(decodeTokens)!),
                    Hidden = Ints(p.GetValue(decodeHidden)!),
                    Routing = Words(p.GetValue(routing)!),
                    Formats = formats,
                    Kernels = Words(p.GetValue(decodeKernels)!) is { Length: > 0 } kernels && kernels.All(k => k is "split" or "one") ? kernels : throw new ArgumentException("--decode-kernels takes split and/or one"),
                    Iterations = p.GetValue(decodeIterations),
                    Seed = p.GetValue(seed),
                    NumSms = p.GetValue(decodeSms),
                };
                string outDir = p.GetValue(output) ?? Path.Combine(Environment.CurrentDirectory, "bench", "results");
                return await BenchDecode.RunAsync(manifest, p.GetValue(gpus), p.GetValue(pinCores) != "off", outDir, TimeSpan.FromSeconds(p.GetValue(limit)), Console.Out, ct);
            }

            if (p.GetValue(rank) is { } r)
            {
                return await new BenchRank(r, p.GetValue(world), p.GetValue(gpus), p.GetValue(dir)!, Console.Out).RunAsync(ct);
            }

            if (p.GetValue(fromJson) is { } saved)
            {
                return await BenchReport.RewriteAsync(saved, Console.Out, ct);
            }

            BenchRun run = new()
            {
                Backend = p.GetValue(backend)!,
                Tokens = Ints(p.GetValue(tokens)!),
                Hidden = Ints(p.GetValue(hidden)!),
                Layouts = Words(p.GetValue(layouts)!),
                Routing = Words(p.GetValue(routing)!),
                World = p.GetValue(ranks),
                Local = p.GetValue(local),
                TopK = p.GetValue(topK),
                Experts = p.GetValue(experts),
                Sets = p.GetValue(sets),
                Iterations = p.GetValue(iterations),
                Warmup = p.GetValue(warmup),
                Seed = p.GetValue(seed),
                Gpus = p.GetValue(gpus),
                Peer = p.GetValue(peer)!,
                Grains = !p.GetValue(noGrains),
                SoakSteps = p.GetValue(soak),
                Passes = p.GetValue(passes) is var n and >= 1 and <= 10 ? n : throw new ArgumentException($"--passes {p.GetValue(passes)}: expected 1..10"),
                CallerThread = p.GetValue(calls) switch { "caller" => true, "worker" => false, var c => throw new ArgumentException($"--calls {c}: expected caller or worker") },
                NumSms = p.GetValue(numSms) is var sms and >= 1 and <= 1024 ? sms : throw new ArgumentException($"--num-sms {p.GetValue(numSms)}: expected 1..1024"),
                PinCores = p.GetValue(pinCores) switch { "on" => true, "off" => false, var c => throw new ArgumentException($"--pin-cores {c}: expected on or off") },
                CpuMaxBytes = p.GetValue(cpuBudget) * 1e9,
                Out = p.GetValue(output) ?? Path.Combine(Environment.CurrentDirectory, "bench", "results"),
                RankTimeout = TimeSpan.FromSeconds(p.GetValue(limit)),
            };
            return await run.ExecuteAsync(Console.Out, ct);
        });
        return command;
    }

    private static int[] Ints(string text) => [.. Words(text).Select(w => int.Parse(w, CultureInfo.InvariantCulture))];

    private static string[] Words(string text) => text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
}

/// <summary>One run of `epa2a-tools bench`.</summary>
internal sealed class BenchRun
{
    public required string Backend { get; init; }

    public required int[] Tokens { get; init; }

    public required int[] Hidden { get; init; }

    public required string[] Layouts { get; init; }

    public required string[] Routing { get; init; }

    public int World { get; init; } = 8;

    public int Local { get; init; } = 2;

    public int TopK { get; init; } = 8;

    public int Experts { get; init; } = 256;

    public int Sets { get; init; } = 3;

    public int Iterations { get; init; } = 10;

    public int Warmup { get; init; } = 3;

    public int Seed { get; init; } = 42;

    public int Gpus { get; init; } = 1;

    public string Peer { get; init; } = "python3";

    public bool Grains { get; init; } = true;

    public bool CallerThread { get; init; } = true;

    /// <summary>EpConfig.NumSms of the swept CUDA layers.</summary>
    public int NumSms { get; init; } = 32;

    /// <summary>Each CUDA rank process's GPU thread on a core of its own (<see cref="CoreAffinity"/>).</summary>
    public bool PinCores { get; init; } = true;

    public int SoakSteps { get; init; }

    /// <summary>How often each CUDA rank process runs the sweep (<see cref="BenchManifest.Passes"/>).</summary>
    public int Passes { get; init; } = 1;

    public double CpuMaxBytes { get; init; } = 3e9;

    public required string Out { get; init; }

    public TimeSpan RankTimeout { get; init; } = TimeSpan.FromSeconds(540);

    public async Task<int> ExecuteAsync(TextWriter console, CancellationToken ct)
    {
        Validate();
        bool gpu = NvshmemRuntime.IsAvailable(out string why);
        bool runCuda = Backend is "cuda" or "both" || (Backend == "auto" && gpu);
        bool runCpu = Backend is "cpu" or "both" or "auto";
        if (runCuda && !gpu)
        {
            await console.WriteLineAsync($"epa2a-tools bench: --backend {Backend} needs a usable GPU: {why}").ConfigureAwait(false);
            return 2;
        }

        DateTime started = DateTime.UtcNow;
        string dir = Directory.CreateTempSubdirectory("epa2a-bench-").FullName;
        BenchManifest manifest = WriteManifest(dir);
        (string gpuName, string driver) = gpu ? RankProcesses.GpuName() : ("no GPU", "-");
        await console.WriteLineAsync(string.Create(CultureInfo.InvariantCulture, $"== epa2a-tools bench {started:yyyy-MM-ddTHH:mm:ssZ}: {manifest.Points.Count} points, {Sets} routing sets x {Iterations} iterations, seed {Seed}, {(runCuda ? $"CUDA on {gpuName} (driver {driver}), " : string.Empty)}{(runCpu ? "CPU, " : string.Empty)}routing in {dir}")).ConfigureAwait(false);

        BenchRankReport?[]? cuda = null;
        BenchPeerReport? peer = null;
        if (runCuda)
        {
            cuda = await RunRanksAsync(dir, manifest, console, ct).ConfigureAwait(false);
            peer = await BenchPeer.RunAsync(Peer, dir, manifest, console, ct).ConfigureAwait(false);
        }

        Dictionary<string, BenchCpuResult> cpu = runCpu ? await BenchCpu.RunAsync(dir, manifest, CpuMaxBytes, console, ct).ConfigureAwait(false) : [];
        BenchGrainOverhead? grains = Grains ? await BenchGrainOverhead.MeasureAsync(World, console, ct).ConfigureAwait(false) : null;

        BenchSummary summary = BenchSummary.Build(manifest, cuda, peer, cpu, grains, gpuName, driver, started, Environment.ProcessorCount);
        Directory.CreateDirectory(Out);
        string stem = $"bench-{(runCuda ? Slug(gpuName) : "cpu")}-{started:yyyy-MM-dd}";
        string markdown = BenchReport.Markdown(summary, $"{stem}.png");
        await File.WriteAllTextAsync(Path.Combine(Out, $"{stem}.json"), JsonSerializer.Serialize(summary, BenchJson.Indented), ct).ConfigureAwait(false);
        await File.WriteAllTextAsync(Path.Combine(Out, $"{stem}.md"), markdown, ct).ConfigureAwait(false);
        await console.WriteLineAsync().ConfigureAwait(false);
        await console.WriteAsync(markdown).ConfigureAwait(false);

        // The plot is drawn from the saved JSON where the results are read (`--from-json`), not on the GPU host.
        await console.WriteLineAsync($"results: {Path.Combine(Out, stem)}.{{json,md}}; the plot: epa2a-tools bench --from-json {Path.Combine(Out, stem)}.json").ConfigureAwait(false);
        bool failed = summary.Points.Any(p => p.Cuda?.Error is not null || p.Cuda?.GraphError is not null || p.Cpu?.Error is not null) || (runCuda && cuda!.Any(r => r is null));
        if (failed)
        {
            await console.WriteLineAsync($"bench: routing files and rank logs kept in {dir}").ConfigureAwait(false);
            return 1;
        }

        Directory.Delete(dir, recursive: true);
        return 0;
    }

    private void Validate()
    {
        string[] backends = ["auto", "cuda", "cpu", "both"];
        if (!backends.Contains(Backend))
        {
            throw new ArgumentException($"--backend {Backend}: expected one of {string.Join(", ", backends)}");
        }

        if (Layouts.Any(l => l is not ("intra" or "inter")) || Routing.Any(r => r is not ("uniform" or "skewed")))
        {
            throw new ArgumentException("--layouts takes intra/inter and --routing uniform/skewed");
        }

        if (Tokens.Length == 0 || Tokens.Any(t => t < 1) || Hidden.Any(h => h < 1 || h % 8 != 0) || World < 1 || Local < 1 || Experts % World != 0 || World % Local != 0 || TopK < 1 || TopK > Experts || Sets < 1 || Iterations < 1 || Warmup < 0)
        {
            throw new ArgumentException("tokens >= 1, hidden a multiple of 8, experts a multiple of --ranks, --ranks a multiple of --local (>= 1), --topk in [1, experts], sets and iterations >= 1");
        }
    }

    /// <summary>Draws and writes every routing set once per (tokens, routing): every hidden size and layout reuses it.</summary>
    private BenchManifest WriteManifest(string dir)
    {
        Dictionary<(int, string), (List<List<string>> Files, List<int[]> Rows)> drawn = [];
        foreach (int t in Tokens)
        {
            foreach (string r in Routing)
            {
                // Not HashCode.Combine: it is salted per process, and one --seed must draw the same routing in every run.
                Random rng = new(unchecked((Seed * 1_000_003) + (t * 2) + (r == "skewed" ? 1 : 0)));
                List<List<string>> files = [];
                List<int[]> rows = [];
                for (int s = 0; s < Sets; s++)
                {
                    double[]? popularity = r == "skewed" ? BenchRouting.SkewedPopularity(Experts, rng) : null;
                    List<int[]> ids = [];
                    List<string> names = [];
                    for (int rank = 0; rank < World; rank++)
                    {
                        int[] id = BenchRouting.Draw(t, TopK, Experts, popularity, rng);
                        string name = $"t{t}_{r}_s{s}_r{rank}.i32";
                        BenchRouting.Write(Path.Combine(dir, name), id);
                        ids.Add(id);
                        names.Add(name);
                    }

                    files.Add(names);
                    rows.Add(BenchRouting.ReceivedRows(ids, World, Experts));
                }

                drawn[(t, r)] = (files, rows);
            }
        }

        List<BenchPoint> points = [];
        foreach (string layout in Layouts)
        {
            foreach (string r in Routing)
            {
                foreach (int h in Hidden)
                {
                    foreach (int t in Tokens)
                    {
                        (List<List<string>> files, List<int[]> rows) = drawn[(t, r)];
                        int most = rows.Max(x => x.Max());
                        points.Add(new BenchPoint
                        {
                            Name = $"{layout}-{r}-h{h}-t{t}",
                            World = World,
                            Local = layout == "intra" ? World : Local,
                            Tokens = t,
                            Hidden = h,
                            TopK = TopK,
                            Experts = Experts,
                            Routing = r,
                            Sets = files,
                            RecvRows = rows,
                            GraphCapacity = Math.Max(1, (most + (t * TopK) - 1) / (t * TopK)),
                        });
                    }
                }
            }
        }

        BenchManifest manifest = new() { Seed = Seed, Warmup = Warmup, Iterations = Iterations, CallerThread = CallerThread, PinCores = PinCores, NumSms = NumSms, SoakSteps = SoakSteps, Passes = Passes, Points = points };
        File.WriteAllText(Path.Combine(dir, "manifest.json"), JsonSerializer.Serialize(manifest, BenchJson.Indented));
        return manifest;
    }

    private async Task<BenchRankReport?[]> RunRanksAsync(string dir, BenchManifest manifest, TextWriter console, CancellationToken ct)
    {
        List<Process> ranks = [];
        StringBuilder logs = new();
        BenchProgress progress = new(console, manifest.Points.Count * manifest.Passes);
        try
        {
            for (int r = 0; r < World; r++)
            {
                ranks.Add(StartRank(r, dir, logs, r == 0 ? progress : null));
            }

            if (!await RankProcesses.WaitAsync(ranks, RankTimeout, ct).ConfigureAwait(false))
            {
                await console.WriteLineAsync($"bench: rank processes still running after {RankTimeout.TotalSeconds:0} s: killing them").ConfigureAwait(false);
            }
        }
        finally
        {
            await RankProcesses.KillAsync(ranks).ConfigureAwait(false);
            progress.Done();
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

        BenchRankReport?[] reports = new BenchRankReport?[World];
        for (int r = 0; r < World; r++)
        {
            if (ranks[r].ExitCode != 0)
            {
                await console.WriteLineAsync($"bench: rank {r} exited with {ranks[r].ExitCode} (log: {Path.Combine(dir, "ranks.log")})").ConfigureAwait(false);
            }

            string path = Path.Combine(dir, $"result_{r}.json");
            if (File.Exists(path))
            {
                reports[r] = JsonSerializer.Deserialize<BenchRankReport>(await File.ReadAllTextAsync(path, ct).ConfigureAwait(false));
            }

            ranks[r].Dispose();
        }

        return reports;
    }

    private Process StartRank(int rank, string dir, StringBuilder logs, BenchProgress? progress) =>
        RankProcesses.Start(
            ["bench", "--rank", $"{rank}", "--world", $"{World}", "--dir", dir, "--gpus", $"{Gpus}"],
            (line, stderr) =>
            {
                if (!stderr && progress is not null && line.StartsWith(BenchRank.ProgressPrefix, StringComparison.Ordinal))
                {
                    progress.Report(line[BenchRank.ProgressPrefix.Length..]);
                    return;
                }

                lock (logs)
                {
                    logs.AppendLine(CultureInfo.InvariantCulture, $"[rank {rank}{(stderr ? " stderr" : string.Empty)}] {line}");
                }
            },
            PinCores ? CoreAffinity.Plan(rank, World, Environment.ProcessorCount) : null);

    private static string Slug(string gpu) => new([.. gpu.ToLowerInvariant().Select(c => char.IsAsciiLetterOrDigit(c) ? c : '-')]);
}

/// <summary>A progress bar on a terminal, one line per point otherwise.</summary>
internal sealed class BenchProgress(TextWriter console, int total)
{
    private readonly Lock gate = new();
    private readonly bool terminal = !Console.IsOutputRedirected;
    private readonly Stopwatch clock = Stopwatch.StartNew();
    private bool any;

    public void Report(string text)
    {
        string[] parts = text.Split(' ', 3);
        int done = int.TryParse(parts[0], CultureInfo.InvariantCulture, out int d) ? d : 0;
        string name = parts.Length > 2 ? parts[2] : string.Empty;
        const int width = 30;
        int filled = total == 0 ? width : Math.Clamp(done * width / total, 0, width);
        string bar = string.Create(CultureInfo.InvariantCulture, $"[{new string('#', filled)}{new string('.', width - filled)}] {done}/{total} {clock.Elapsed.TotalSeconds,5:0}s {name}");
        lock (gate)
        {
            any = true;
            if (terminal)
            {
                console.Write($"\r{bar,-100}");
            }
            else
            {
                console.WriteLine(bar);
            }
        }
    }

    public void Done()
    {
        lock (gate)
        {
            if (terminal && any)
            {
                console.WriteLine();
            }
        }
    }
}

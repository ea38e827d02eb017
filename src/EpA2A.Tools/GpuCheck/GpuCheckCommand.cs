using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text;
using System.Text.Json;
using EpA2A.Cuda;

namespace EpA2A.Tools.GpuCheck;

/// <summary>
/// `epa2a-tools gpu-check`: the GPU test suite and first benchmark of the CUDA backend. For each group of cases it
/// starts one process of itself per rank on the GPU(s) (`epa2a-tools gpu-check --rank R ...`; NVSHMEM bootstrapped by a
/// unique id passed through a file in a temporary folder), waits for them with a deadline, and gathers what each
/// rank checked: its own dispatch output, weights and layout exactly, and combine within one rounding, against
/// the per-rank reference and (small cases) the CPU backend; a rank that never arrives; and timings. Writes
/// gpu-check.json and gpu-check.md (GPU, date) into --out and prints the table last.
/// Exit codes: 0 every case passed on every rank, 1 a failure, 2 no usable GPU or libepa2a.
/// </summary>
internal static class GpuCheckCommand
{
    public const int ExitPassed = 0;
    public const int ExitFailed = 1;
    public const int ExitUnavailable = 2;

    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    public static Command Create()
    {
        Option<string> groups = new("--groups") { Description = "Comma-separated groups to run: w1, w2, w4, w8, inter, graph, big, ll2, ll4, ll8 (all: every group but w1)", DefaultValueFactory = _ => "all" };
        Option<string?> filter = new("--filter") { Description = "Only cases whose name contains one of these comma-separated strings" };
        Option<string?> output = new("--out") { HelpName = "DIR", Description = "Where gpu-check.json and gpu-check.md go (default: $OUT, else ./gpu-check-results)" };
        Option<int> seed = new("--seed") { Description = "Seed of the random inputs", DefaultValueFactory = _ => 42 };
        Option<int> gpus = new("--gpus") { Description = "GPUs to spread the ranks over (rank r uses device r mod N)", DefaultValueFactory = _ => 1 };
        Option<double?> groupTimeout = new("--group-timeout-seconds") { Description = "Deadline of one group's rank processes (default: derived from its cases' work, printed per group)" };
        Option<int> repeat = new("--repeat") { Description = "Run the selected groups this many times, each with a fresh seed (seed, seed + 1, ...)", DefaultValueFactory = _ => 1 };
        Option<int?> rank = new("--rank") { Hidden = true };
        Option<string?> group = new("--group") { Hidden = true };
        Option<string?> dir = new("--dir") { Hidden = true };

        Command command = new("gpu-check", "Run the CUDA backend's GPU suite: rank processes on the GPU, every case checked against the reference and the CPU backend, timings in a table.")
        {
            groups, filter, output, seed, gpus, groupTimeout, repeat, rank, group, dir,
        };
        command.SetAction(async (p, ct) =>
        {
            if (p.GetValue(rank) is { } r)
            {
                string g = p.GetValue(group) ?? throw new ArgumentException("--rank needs --group");
                int world = GpuCheckCase.Of(g, null).FirstOrDefault()?.World ?? throw new ArgumentException($"unknown group {g}");
                return await new GpuCheckRank(g, r, world, p.GetValue(gpus), p.GetValue(dir)!, p.GetValue(seed), p.GetValue(filter), Console.Out).RunAsync(ct);
            }

            string[] wanted = p.GetValue(groups) is "all" or null ? [.. GpuCheckCase.DefaultGroups] : p.GetValue(groups)!.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries);
            string outDir = p.GetValue(output) ?? (Environment.GetEnvironmentVariable("OUT") is { Length: > 0 } o ? o : Path.Combine(Environment.CurrentDirectory, "gpu-check-results"));
            TimeSpan? limit = p.GetValue(groupTimeout) is { } seconds ? TimeSpan.FromSeconds(seconds) : null;
            return await RunAllAsync(wanted, p.GetValue(filter), outDir, p.GetValue(seed), p.GetValue(gpus), limit, Math.Max(1, p.GetValue(repeat)), Console.Out, ct);
        });
        return command;
    }

    /// <summary>
    /// Runs the groups as rank processes (<paramref name="repeat"/> times, seeds <paramref name="seed"/>, seed + 1, ...),
    /// then writes and prints the table. A group's deadline is <paramref name="groupTimeout"/>, else derived from its
    /// cases (<see cref="GpuCheckCase.GroupDeadline"/>). Returns the exit code.
    /// </summary>
    internal static async Task<int> RunAllAsync(string[] groups, string? filter, string outDir, int seed, int gpus, TimeSpan? groupTimeout, int repeat, TextWriter console, CancellationToken ct)
    {
        if (!NvshmemRuntime.IsAvailable(out string reason))
        {
            await console.WriteLineAsync($"epa2a-tools gpu-check: no usable GPU: {reason}").ConfigureAwait(false);
            return ExitUnavailable;
        }

        string[] unknown = [.. groups.Where(g => !GpuCheckCase.Groups.Contains(g))];
        if (unknown.Length > 0)
        {
            await console.WriteLineAsync($"epa2a-tools gpu-check: unknown group(s) {string.Join(", ", unknown)}; groups: {string.Join(", ", GpuCheckCase.Groups)}").ConfigureAwait(false);
            return ExitFailed;
        }

        (string gpu, string driver) = RankProcesses.GpuName();
        DateTime started = DateTime.UtcNow;
        await console.WriteLineAsync($"== epa2a-tools gpu-check {started:yyyy-MM-ddTHH:mm:ssZ} on {gpu} (driver {driver}), seed {seed}").ConfigureAwait(false);
        List<GpuCheckRow> rows = [];
        double bandwidth = 0;
        for (int run = 0; run < repeat; run++)
        {
            int runSeed = unchecked(seed + run);
            foreach (string g in groups)
            {
                GpuCheckCase[] cases = GpuCheckCase.Of(g, filter);
                if (cases.Length == 0)
                {
                    continue;
                }

                TimeSpan limit = groupTimeout ?? GpuCheckCase.GroupDeadline(cases);
                (List<GpuCheckRow> groupRows, double bw) = await RunGroupAsync(g, cases, filter, runSeed, gpus, limit, console, ct).ConfigureAwait(false);
                rows.AddRange(groupRows);
                bandwidth = Math.Max(bandwidth, bw);
            }
        }

        Directory.CreateDirectory(outDir);
        string table = Table(rows, bandwidth, gpu, driver, started);
        var json = new
        {
            gpu,
            driver,
            date = started.ToString("yyyy-MM-ddTHH:mm:ssZ", CultureInfo.InvariantCulture),
            seed,
            repeat,
            wallSeconds = (DateTime.UtcNow - started).TotalSeconds,
            copyBandwidthBytesPerSecond = bandwidth,
            note = "dispatch/combine GPU us: medians over timed device-API steps on rank 0 (CUDA events: prepare + size wait + send + finish; combine incl. copy-in); call us: host time of the device-API call incl. the stream sync; span us: per timed step, the earliest call start to the latest return over all ranks (one host clock), median over steps; ceiling % = (bytes read + written by all ranks / copy bandwidth) / span",
            cases = rows,
        };
        await File.WriteAllTextAsync(Path.Combine(outDir, "gpu-check.json"), JsonSerializer.Serialize(json, Indented), ct).ConfigureAwait(false);
        await File.WriteAllTextAsync(Path.Combine(outDir, "gpu-check.md"), table, ct).ConfigureAwait(false);
        await console.WriteLineAsync().ConfigureAwait(false);
        await console.WriteAsync(table).ConfigureAwait(false);
        return rows.Count > 0 && rows.All(r => r.Pass) ? ExitPassed : ExitFailed;
    }

    private static async Task<(List<GpuCheckRow> Rows, double Bandwidth)> RunGroupAsync(string group, GpuCheckCase[] cases, string? filter, int seed, int gpus, TimeSpan limit, TextWriter console, CancellationToken ct)
    {
        int world = cases[0].World;
        string dir = Directory.CreateTempSubdirectory($"epa2a-gpu-check-{group}-").FullName;
        await console.WriteLineAsync($"== group {group} (seed {seed}): {world} rank processes, {cases.Length} case(s), deadline {limit.TotalSeconds:0} s, folder {dir}").ConfigureAwait(false);
        Stopwatch groupTime = Stopwatch.StartNew();
        List<Process> ranks = [];
        StringBuilder logs = new();
        try
        {
            for (int r = 0; r < world; r++)
            {
                ranks.Add(StartRank(group, r, dir, seed, gpus, filter, logs));
            }

            if (!await RankProcesses.WaitAsync(ranks, limit, ct).ConfigureAwait(false))
            {
                await console.WriteLineAsync($"group {group}: rank processes still running after {limit.TotalSeconds:0} s (the deadline): killing them").ConfigureAwait(false);
            }

            await console.WriteLineAsync(string.Create(CultureInfo.InvariantCulture, $"== group {group}: ranks done in {groupTime.Elapsed.TotalSeconds:0.0} s (deadline {limit.TotalSeconds:0} s)")).ConfigureAwait(false);
        }
        finally
        {
            await RankProcesses.KillAsync(ranks).ConfigureAwait(false);
        }

        lock (logs)
        {
            console.Write(logs.ToString());
        }

        GpuCheckRankReport?[] reports = new GpuCheckRankReport?[world];
        for (int r = 0; r < world; r++)
        {
            string path = Path.Combine(dir, $"result_{r}.json");
            if (ranks[r].ExitCode != 0)
            {
                await console.WriteLineAsync($"group {group}: rank {r} exited with {ranks[r].ExitCode}").ConfigureAwait(false);
            }

            if (File.Exists(path))
            {
                reports[r] = JsonSerializer.Deserialize<GpuCheckRankReport>(await File.ReadAllTextAsync(path, ct).ConfigureAwait(false));
            }
        }

        foreach (Process p in ranks)
        {
            p.Dispose();
        }

        List<GpuCheckRow> rows = [];
        foreach (GpuCheckCase c in cases)
        {
            GpuCheckRankResult?[] per = [.. reports.Select(rep => rep?.Cases.FirstOrDefault(x => x.Name == c.Name))];
            int ok = per.Count(x => x is { Pass: true });
            GpuCheckRankResult? lead = per[0];
            string failures = string.Join(" | ", per.Select((x, r) => (x, r)).Where(t => t.x is not { Pass: true }).Select(t => $"rank {t.r}: {t.x?.Message ?? "no result (crashed, hung or killed)"}"));
            bool timedEverywhere = per.All(x => x is { Pass: true, DispatchStarts.Count: > 0 });
            double dispatchSpan = timedEverywhere ? CopyCeiling.MedianSpanUs([.. per.Select(x => CopyCeiling.Intervals(x!.DispatchStarts, x.DispatchEnds))]) : 0;
            double combineSpan = timedEverywhere ? CopyCeiling.MedianSpanUs([.. per.Select(x => CopyCeiling.Intervals(x!.DispatchEnds, x.CombineEnds))]) : 0;
            rows.Add(new GpuCheckRow
            {
                Group = group,
                Seed = seed,
                Name = c.Name,
                World = c.World,
                Local = c.Local,
                Type = c.TypeName,
                Flags = c.Flags,
                Pass = ok == world,
                RanksOk = ok,
                Ranks = world,
                MaxRecvRows = per.Max(x => x?.RecvRows ?? 0),
                MaxAbsError = per.Max(x => x?.MaxAbsError ?? 0),
                MatchesCpu = c.CompareWithCpu && !c.Fault ? per.All(x => x?.MatchesCpu == true) : null,
                DispatchGpuUs = lead?.DispatchGpuUs ?? 0,
                CombineGpuUs = lead?.CombineGpuUs ?? 0,
                PrepareGpuUs = lead?.PrepareGpuUs ?? 0,
                SizeWaitGpuUs = lead?.SizeWaitGpuUs ?? 0,
                SendFinishGpuUs = lead?.SendFinishGpuUs ?? 0,
                DispatchCallUs = lead?.DispatchCallUs ?? 0,
                CombineCallUs = lead?.CombineCallUs ?? 0,
                DispatchSpanUs = dispatchSpan,
                CombineSpanUs = combineSpan,
                DispatchBytes = lead?.DispatchBytes ?? 0,
                CombineBytes = lead?.CombineBytes ?? 0,
                Message = ok == world ? lead?.Message ?? string.Empty : failures,
            });
        }

        double bandwidth = reports[0]?.CopyBytesPerSecond ?? 0;
        return (rows, bandwidth);
    }

    private static Process StartRank(string group, int rank, string dir, int seed, int gpus, string? filter, StringBuilder logs)
    {
        List<string> args = ["gpu-check", "--group", group, "--rank", $"{rank}", "--dir", dir, "--seed", $"{seed}", "--gpus", $"{gpus}"];
        if (!string.IsNullOrEmpty(filter))
        {
            args.AddRange(["--filter", filter]);
        }

        return RankProcesses.Start(args, (line, _) =>
        {
            lock (logs)
            {
                logs.AppendLine(line);
            }
        });
    }

    private static string Table(List<GpuCheckRow> rows, double bandwidth, string gpu, string driver, DateTime started)
    {
        static string Pct(double bytes, double spanUs, double bw) => spanUs > 0 && bw > 0 ? string.Create(CultureInfo.InvariantCulture, $"{CopyCeiling.Percent(bytes, bw, spanUs):0}") : "-";
        StringBuilder sb = new();
        sb.AppendLine(CultureInfo.InvariantCulture, $"# epa2a-tools gpu-check: CUDA backend on {gpu}");
        sb.AppendLine();
        sb.AppendLine(CultureInfo.InvariantCulture, $"{started:yyyy-MM-dd HH:mm} UTC, driver {driver}; every rank a process on the GPU (MPS), the C# layer driving libepa2a. Device copy ceiling: {bandwidth / 1e12:0.00} TB/s (read + write, measured in this run).");
        sb.AppendLine("Checks per rank: dispatch output, weights and layout exactly (outputs poisoned first) and combine within one rounding, against the per-rank reference, through the host API and the device API; small cases also against the CPU backend.");
        sb.AppendLine("Timing (medians of device-API steps after a barrier): GPU us from CUDA events on rank 0 (dispatch = prepare + size wait + send + finish; combine includes the expert rows' copy-in); call us = rank 0's host time of the C# call, stream sync included; span us = all ranks: the earliest call start to the latest return in a step (one host clock). Ceiling % = (bytes read + written by all ranks / copy ceiling) / span, so every rank's time stands against every rank's bytes.");
        sb.AppendLine();
        bool seeds = rows.Select(r => r.Seed).Distinct().Count() > 1;
        sb.AppendLine($"| case |{(seeds ? " seed |" : string.Empty)} W | L | type | flags | max recv rows | dispatch GPU us | dispatch span us | ceiling % | combine GPU us | combine span us | ceiling % | dispatch call us | combine call us | max abs err | = CPU | ranks ok |");
        sb.AppendLine($"| --- |{(seeds ? " --- |" : string.Empty)} --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        foreach (GpuCheckRow r in rows)
        {
            string cpu = r.MatchesCpu switch { true => "yes", false => "NO", null => "-" };
            string seedCell = seeds ? string.Create(CultureInfo.InvariantCulture, $" {r.Seed} |") : string.Empty;
            sb.AppendLine(CultureInfo.InvariantCulture, $"| {r.Name} |{seedCell} {r.World} | {r.Local} | {r.Type} | {r.Flags} | {r.MaxRecvRows} | {r.DispatchGpuUs:0.0} | {r.DispatchSpanUs:0.0} | {Pct(r.DispatchBytes, r.DispatchSpanUs, bandwidth)} | {r.CombineGpuUs:0.0} | {r.CombineSpanUs:0.0} | {Pct(r.CombineBytes, r.CombineSpanUs, bandwidth)} | {r.DispatchCallUs:0.0} | {r.CombineCallUs:0.0} | {r.MaxAbsError:0.###e+0} | {cpu} | {r.RanksOk}/{r.Ranks} {(r.Pass ? "PASS" : "FAIL")} |");
        }

        sb.AppendLine();
        foreach (GpuCheckRow r in rows.Where(r => !string.IsNullOrEmpty(r.Message)))
        {
            sb.AppendLine(CultureInfo.InvariantCulture, $"- {r.Name} (W={r.World}): {r.Message}");
        }

        sb.AppendLine();
        sb.AppendLine(CultureInfo.InvariantCulture, $"{rows.Count(r => r.Pass)} passed, {rows.Count(r => !r.Pass)} failed");
        return sb.ToString();
    }
}

/// <summary>One case's outcome over all its ranks (a row of the table and of the JSON).</summary>
internal sealed record GpuCheckRow
{
    public required string Group { get; init; }

    /// <summary>The run's seed (each case draws from its own seed derived from it).</summary>
    public int Seed { get; init; }

    public required string Name { get; init; }

    public int World { get; init; }

    public int Local { get; init; }

    public required string Type { get; init; }

    public required string Flags { get; init; }

    public bool Pass { get; init; }

    public int RanksOk { get; init; }

    public int Ranks { get; init; }

    public int MaxRecvRows { get; init; }

    public double MaxAbsError { get; init; }

    public bool? MatchesCpu { get; init; }

    public double DispatchGpuUs { get; init; }

    public double CombineGpuUs { get; init; }

    public double PrepareGpuUs { get; init; }

    public double SizeWaitGpuUs { get; init; }

    public double SendFinishGpuUs { get; init; }

    public double DispatchCallUs { get; init; }

    public double CombineCallUs { get; init; }

    /// <summary>Median over timed steps of the dispatch's span over all ranks (earliest call start to latest return), µs.</summary>
    public double DispatchSpanUs { get; init; }

    /// <summary>Median over timed steps of the combine's span over all ranks, µs.</summary>
    public double CombineSpanUs { get; init; }

    public double DispatchBytes { get; init; }

    public double CombineBytes { get; init; }

    public string Message { get; init; } = string.Empty;
}

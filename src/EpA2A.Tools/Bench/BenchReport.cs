using System.Globalization;
using System.Text;

using EpA2A.Telemetry;

namespace EpA2A.Tools.Bench;

/// <summary>The markdown table and the PNG plot of a bench summary.</summary>
internal static class BenchReport
{
    public static string Markdown(BenchSummary s, string plotFile)
    {
        StringBuilder sb = new();
        CultureInfo ic = CultureInfo.InvariantCulture;
        sb.AppendLine(ic, $"# epa2a-tools bench: {s.Gpu}, {s.Date}");
        sb.AppendLine();
        sb.AppendLine(ic, $"Driver {s.Driver}; host {s.HostCores} cores. Device copy ceiling {s.CopyBytesPerSecond / 1e12:0.00} TB/s (read + write, this run). PyTorch peer: {s.PeerDevice ?? s.PeerMissing ?? "not run"}.");
        sb.AppendLine();
        foreach (string d in s.Definitions)
        {
            sb.AppendLine(ic, $"- {d}");
        }

        sb.AppendLine();
        if (s.Points.Any(p => p.Cuda is not null))
        {
            sb.AppendLine(ic, $"![bandwidth and latency against tokens]({plotFile})");
            sb.AppendLine();
            sb.AppendLine(ic, $"## CUDA backend (ranks as processes under MPS, in-process device API, libepa2a calls on the {s.Calls})");
            sb.AppendLine();
            sb.AppendLine("| point | rows | dispatch µs med / p99 | ceil % | algbw GB/s | combine µs med / p99 | ceil % | algbw GB/s | graph disp / comb µs | graph ceil % | PyTorch disp / comb µs | × PyTorch disp / comb | C# µs disp / comb | check |");
            sb.AppendLine("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
            foreach (BenchPointSummary p in s.Points)
            {
                BenchCudaSummary? c = p.Cuda;
                if (c?.DispatchGpu is null || c.CombineGpu is null)
                {
                    sb.AppendLine(ic, $"| {p.Name} | {p.RecvRows:0} | FAILED: {Cell(c?.Error ?? "no result")} | | | | | | | | | | | |");
                    continue;
                }

                string graph = c.Graph is { } g ? $"{g.DispatchGpu.Median:0.0} / {g.CombineGpu.Median:0.0}" : $"failed: {Cell(c.GraphError ?? "-")}";
                string graphPct = c.Graph is { } g2 ? $"{g2.CeilingPct:0}" : "-";
                string peer = p.Peer is { } pp ? $"{pp.DispatchMedianUs:0.0} / {pp.CombineMedianUs:0.0}" : "-";
                string ratio = p.Peer is { } pr ? $"{pr.DispatchSpeedup:0.00} / {pr.CombineSpeedup:0.00}" : "-";
                sb.AppendLine(ic, $"| {p.Name} | {p.RecvRows:0} | {c.DispatchGpu.Median:0.0} / {c.DispatchGpu.P99:0.0} | {c.DispatchCeilingPct:0} | {c.DispatchAlgbwGBps:0.0} | {c.CombineGpu.Median:0.0} / {c.CombineGpu.P99:0.0} | {c.CombineCeilingPct:0} | {c.CombineAlgbwGBps:0.0} | {graph} | {graphPct} | {peer} | {ratio} | {c.DispatchOrchestrationUs:0.0} / {c.CombineOrchestrationUs:0.0} | {(c.Checked ? "ok" : "NOT CHECKED")} |");
            }

            sb.AppendLine();
            sb.AppendLine("Inside the dispatch and on the host (medians, µs): the counting kernels on the GPU (count, the all-to-all of per-expert counts, row assignment); the GPU idle gap while the host polls sizes and launches the send; call wall time minus GPU time.");
            sb.AppendLine();
            sb.AppendLine("| point | dispatch counting (GPU) | dispatch host gap | dispatch wall - GPU | combine wall - GPU | C# µs disp / comb, GPU timing on | graph replay wall |");
            sb.AppendLine("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
            foreach (BenchPointSummary p in s.Points.Where(p => p.Cuda?.DispatchGpu is not null))
            {
                BenchCudaSummary c = p.Cuda!;
                sb.AppendLine(ic, $"| {p.Name} | {c.DispatchPrepareUs:0.0} | {c.DispatchHostGapUs:0.0} | {c.DispatchWallMinusGpuUs:0.0} | {c.CombineWallMinusGpuUs:0.0} | {c.DispatchOrchestrationTimedUs:0.0} / {c.CombineOrchestrationTimedUs:0.0} | {c.Graph?.ReplayWall.Median.ToString("0.0", ic) ?? "-"} |");
            }

            sb.AppendLine();
            sb.AppendLine(ic, $"Tails of the normal mode (cores pinned: {(s.PinCores ? "yes, each rank's launching thread on a core of its own" : "no")}): per iteration, the slowest rank's dispatch + combine wall time; slow = over 1.5x the median; preempted = some rank's launching thread was taken off its core (involuntary context switch) during the step.");
            sb.AppendLine();
            sb.AppendLine("| point | dispatch wall p99 / median | combine wall p99 / median | iterations | with a preemption | slow | slow with a preemption |");
            sb.AppendLine("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
            foreach (BenchPointSummary p in s.Points.Where(p => p.Cuda?.DispatchWall is not null))
            {
                BenchCudaSummary c = p.Cuda!;
                sb.AppendLine(ic, $"| {p.Name} | {c.DispatchWall!.P99 / Math.Max(c.DispatchWall.Median, 1e-9):0.00} | {c.CombineWall!.P99 / Math.Max(c.CombineWall.Median, 1e-9):0.00} | {c.Iterations} | {c.IterationsPreempted} | {c.SlowIterations} | {c.SlowIterationsPreempted} |");
            }

            sb.AppendLine();
            Spread(sb, s);
            Targets(sb, s);
        }

        if (s.Points.Any(p => p.Cpu is not null))
        {
            sb.AppendLine(ic, $"## CPU backend (one in-process group, {s.HostCores} cores)");
            sb.AppendLine();
            sb.AppendLine("| point | dispatch µs med / p99 | combine µs med / p99 | samples |");
            sb.AppendLine("| --- | ---: | ---: | ---: |");
            foreach (BenchPointSummary p in s.Points.Where(p => p.Cpu is not null))
            {
                BenchCpuSummary c = p.Cpu!;
                string row = c.Dispatch is { } d && c.Combine is { } cb
                    ? string.Create(ic, $"{d.Median:0} / {d.P99:0} | {cb.Median:0} / {cb.P99:0} | {d.Samples}")
                    : $"{Cell(c.Skipped ?? c.Error ?? "-")} | | ";
                sb.AppendLine(ic, $"| {p.Name} | {row} |");
            }

            sb.AppendLine();
        }

        if (s.Grains is { } gr)
        {
            sb.AppendLine(ic, $"## Grain path (CPU backend, {gr.World} silos in one process)");
            sb.AppendLine();
            sb.AppendLine("| tokens | hidden | grain step µs med / p99 | in-process step µs | grains add µs |");
            sb.AppendLine("| ---: | ---: | ---: | ---: | ---: |");
            foreach (BenchGrainSize g in gr.Sizes)
            {
                sb.AppendLine(ic, $"| {g.Tokens} | {g.Hidden} | {g.GrainStepMedianUs:0} / {g.GrainStepP99Us:0} | {g.InProcessStepMedianUs:0} | {g.OverheadUs:0} |");
            }

            sb.AppendLine();
        }

        if (s.Soak.Any(r => r.Count > 0) || s.SoakErrors.Count > 0)
        {
            sb.AppendLine("## GPU soak (one layer, random token counts up to 512, hidden 2048, every step's receive size checked)");
            sb.AppendLine();
            sb.AppendLine("| rank | steps | free device MiB after the first interval / last | managed MiB first / last | handles first / last | threads first / last | step µs median (last interval) |");
            sb.AppendLine("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
            for (int r = 0; r < s.Soak.Count; r++)
            {
                if (s.Soak[r] is not [_, .., var last])
                {
                    continue;
                }

                // The first interval includes the layer's first growth: compare from the end of it.
                BenchSoakSample first = s.Soak[r].Count > 2 ? s.Soak[r][1] : s.Soak[r][0];

                sb.AppendLine(ic, $"| {r} | {last.Step} | {first.DeviceFreeBytes / 1048576.0:0} / {last.DeviceFreeBytes / 1048576.0:0} | {first.ManagedBytes / 1048576.0:0.0} / {last.ManagedBytes / 1048576.0:0.0} | {first.Handles} / {last.Handles} | {first.Threads} / {last.Threads} | {last.StepMedianUs:0} |");
            }

            foreach (string e in s.SoakErrors)
            {
                sb.AppendLine(ic, $"- soak FAILED: {e}");
            }

            sb.AppendLine();
        }

        if (s.DeviceMemory.Count > 0)
        {
            sb.AppendLine("Device memory: " + string.Join("; ", s.DeviceMemory) + ".");
            sb.AppendLine();
        }

        return sb.ToString();
    }

    /// <summary>`epa2a-tools bench --from-json FILE`: the markdown and the plot of a saved summary, written next to it.</summary>
    public static async Task<int> RewriteAsync(string json, TextWriter console, CancellationToken ct)
    {
        BenchSummary summary = System.Text.Json.JsonSerializer.Deserialize<BenchSummary>(await File.ReadAllTextAsync(json, ct).ConfigureAwait(false))
            ?? throw new InvalidDataException($"{json} holds no bench summary");
        string stem = Path.Combine(Path.GetDirectoryName(Path.GetFullPath(json))!, Path.GetFileNameWithoutExtension(json));
        string markdown = Markdown(summary, Path.GetFileName(stem) + ".png");
        await File.WriteAllTextAsync(stem + ".md", markdown, ct).ConfigureAwait(false);
        await File.WriteAllBytesAsync(stem + ".png", Plot(summary), ct).ConfigureAwait(false);
        await console.WriteAsync(markdown).ConfigureAwait(false);
        return 0;
    }

    public static byte[] Plot(BenchSummary s)
    {
        List<BenchPointSummary> uniform = [.. s.Points.Where(p => p.Routing == "uniform" && p.Cuda?.DispatchGpu is not null)];
        List<ChartSeries> Series(Func<BenchPointSummary, double?> value, bool peer = false)
        {
            List<ChartSeries> list = [];
            foreach (IGrouping<(string Layout, int Hidden), BenchPointSummary> g in uniform.GroupBy(p => (p.Layout, p.Hidden)).OrderByDescending(g => g.Key.Hidden).ThenBy(g => g.Key.Layout))
            {
                List<(double X, double Y)> points = [.. g.OrderBy(p => p.Tokens).Select(p => ((double)p.Tokens, value(p) ?? 0)).Where(t => t.Item2 > 0)];
                list.Add(new ChartSeries($"{(peer ? "PyTorch " : string.Empty)}{g.Key.Layout} h{g.Key.Hidden}", points, peer));
            }

            return list;
        }

        // Latency for the largest hidden size only: ours, graph mode and the PyTorch peer per layout.
        int largest = uniform.Count == 0 ? 0 : uniform.Max(p => p.Hidden);
        List<ChartSeries> Latency(Func<BenchPointSummary, double> ours, Func<BenchPointSummary, double?> graph, Func<BenchPointSummary, double?> peer)
        {
            List<ChartSeries> list = [];
            foreach (IGrouping<string, BenchPointSummary> g in uniform.Where(p => p.Hidden == largest).GroupBy(p => p.Layout).OrderBy(g => g.Key))
            {
                BenchPointSummary[] ps = [.. g.OrderBy(p => p.Tokens)];
                list.Add(new ChartSeries($"{g.Key} h{largest}", [.. ps.Select(p => ((double)p.Tokens, ours(p)))]));
                list.Add(new ChartSeries($"graph {g.Key} h{largest}", [.. ps.Where(p => graph(p) is > 0).Select(p => ((double)p.Tokens, graph(p)!.Value))]));
                list.Add(new ChartSeries($"PyTorch {g.Key} h{largest}", [.. ps.Where(p => peer(p) is > 0).Select(p => ((double)p.Tokens, peer(p)!.Value))], Dashed: true));
            }

            return list;
        }

        List<ChartPanel> panels =
        [
            new("Dispatch algorithm bandwidth (uniform)", "tokens per rank", "GB/s per rank", Series(p => p.Cuda!.DispatchAlgbwGBps)),
            new("Combine algorithm bandwidth (uniform)", "tokens per rank", "GB/s per rank", Series(p => p.Cuda!.CombineAlgbwGBps)),
            new($"Dispatch latency (uniform, hidden {largest})", "tokens per rank", "us", Latency(p => p.Cuda!.DispatchGpu!.Median, p => p.Cuda!.Graph?.DispatchGpu.Median, p => p.Peer?.DispatchMedianUs)),
            new($"Combine latency (uniform, hidden {largest})", "tokens per rank", "us", Latency(p => p.Cuda!.CombineGpu!.Median, p => p.Cuda!.Graph?.CombineGpu.Median, p => p.Peer?.CombineMedianUs)),
        ];
        return BenchChart.Render($"epa2a-tools bench, {s.Gpu}, {s.Date[..10]}: 8 ranks, top-8 of 256 experts, bf16", panels);
    }

    /// <summary>The sweep run more than once in the same rank processes: every pass's GPU medians and their spread.</summary>
    private static void Spread(StringBuilder sb, BenchSummary s)
    {
        if (s.Spread.Count == 0)
        {
            return;
        }

        CultureInfo ic = CultureInfo.InvariantCulture;
        int passes = s.Spread[0].DispatchMedians.Length;
        List<BenchPassSpread> bounded = [.. s.Spread.Where(x => x.Bounded)];
        int within = bounded.Count(x => x.Within);
        sb.AppendLine(ic, $"### Reproducibility: the sweep run {passes} times in the same rank processes");
        sb.AppendLine();
        sb.AppendLine(ic, $"Spread = largest / smallest median of the passes - 1 (GPU time, slowest rank per iteration). Points of {BenchPassSpread.BoundFromTokens} tokens or more within {BenchPassSpread.BoundPct:0}%: {within} of {bounded.Count}.");
        sb.AppendLine();
        sb.AppendLine("| point | dispatch µs per pass | spread % | combine µs per pass | spread % | within |");
        sb.AppendLine("| --- | ---: | ---: | ---: | ---: | --- |");
        foreach (BenchPassSpread x in s.Spread)
        {
            string verdict = !x.Bounded ? "(not bounded)" : x.Within ? "yes" : "NO";
            sb.AppendLine(ic, $"| {x.Name} | {Join(x.DispatchMedians)} | {x.DispatchSpreadPct:0.0} | {Join(x.CombineMedians)} | {x.CombineSpreadPct:0.0} | {verdict} |");
        }

        sb.AppendLine();

        static string Join(double[] v) => string.Join(" / ", v.Select(m => m.ToString("0.0", CultureInfo.InvariantCulture)));
    }

    private static void Targets(StringBuilder sb, BenchSummary s)
    {
        CultureInfo ic = CultureInfo.InvariantCulture;
        BenchPointSummary? Find(int tokens) => s.Points.FirstOrDefault(p => p.Layout == "intra" && p.Routing == "uniform" && p.Hidden == 7168 && p.Tokens == tokens && p.Cuda?.DispatchGpu is not null);
        sb.AppendLine("### Targets (intra-node, uniform, hidden 7168)");
        sb.AppendLine();
        if (Find(4096) is { } big)
        {
            sb.AppendLine(ic, $"- 4096 tokens: dispatch {big.Cuda!.DispatchCeilingPct:0}% and combine {big.Cuda.CombineCeilingPct:0}% of the copy ceiling (target 70%); graph mode (one replay, dispatch + combine) {big.Cuda.Graph?.CeilingPct ?? 0:0}%.");
        }

        if (Find(128) is { } small)
        {
            sb.AppendLine(ic, $"- 128 tokens: dispatch {100 / Math.Max(small.Cuda!.DispatchCeilingPct, 1e-9):0.0}x and combine {100 / Math.Max(small.Cuda.CombineCeilingPct, 1e-9):0.0}x the byte floor (target within 2x); graph mode (one replay, dispatch + combine) {100 / Math.Max(small.Cuda.Graph?.CeilingPct ?? 1e-9, 1e-9):0.0}x.");
        }

        List<BenchPointSummary> all = [.. s.Points.Where(p => p.Cuda?.DispatchGpu is not null)];
        if (all.Count > 0)
        {
            sb.AppendLine(ic, $"- C# orchestration per call, median over points: dispatch {SampleStats.Median([.. all.Select(p => p.Cuda!.DispatchOrchestrationUs)]):0.0} µs, combine {SampleStats.Median([.. all.Select(p => p.Cuda!.CombineOrchestrationUs)]):0.0} µs (target under 10 µs).");
        }

        List<BenchPointSummary> peers = [.. all.Where(p => p.Peer is not null)];
        if (peers.Count > 0)
        {
            int faster = peers.Count(p => p.Peer!.DispatchSpeedup > 1 && p.Peer.CombineSpeedup > 1);
            sb.AppendLine(ic, $"- Faster than the PyTorch peer in dispatch and combine at {faster} of {peers.Count} points (slowest ratios: dispatch {peers.Min(p => p.Peer!.DispatchSpeedup):0.00}x, combine {peers.Min(p => p.Peer!.CombineSpeedup):0.00}x).");
        }

        sb.AppendLine();
    }

    private static string Cell(string text) => text.Replace('|', '/').Replace('\n', ' ')[..Math.Min(160, text.Length)];
}

using System.Diagnostics;
using System.Globalization;
using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Layer;
using EpA2A.Numerics;

namespace EpA2A.Tools.Bench;

/// <summary>The CPU backend's timings of one point (µs over the whole in-process group), or why it was skipped.</summary>
internal sealed record BenchCpuResult
{
    public required string Name { get; init; }

    public List<double> Dispatch { get; init; } = [];

    public List<double> Combine { get; init; } = [];

    public string? Skipped { get; init; }

    public string? Error { get; set; }
}

/// <summary>
/// The CPU backend on the same points and routing files: every rank a layer of one in-process group (message
/// passing between ranks in this process), host tensors in and out. Each point is checked once (identity experts:
/// the combine is TopK x token exactly) and timed for at most a few seconds.
/// </summary>
internal static class BenchCpu
{
    private static readonly TimeSpan PointBudget = TimeSpan.FromSeconds(3);

    public static async Task<Dictionary<string, BenchCpuResult>> RunAsync(string dir, BenchManifest manifest, double maxBytes, TextWriter console, CancellationToken ct)
    {
        Dictionary<string, BenchCpuResult> results = [];
        BenchProgress progress = new(console, manifest.Points.Count);
        int index = 0;
        await console.WriteLineAsync($"== CPU backend ({Environment.ProcessorCount} cores), points up to {maxBytes / 1e9:0.#} GB of received rows").ConfigureAwait(false);
        foreach (BenchPoint point in manifest.Points)
        {
            ct.ThrowIfCancellationRequested();
            progress.Report(string.Create(CultureInfo.InvariantCulture, $"{++index} {manifest.Points.Count} cpu {point.Name}"));
            double bytes = (double)point.RecvRows.Max(r => r.Sum()) * point.RowBytes;
            if (bytes > maxBytes)
            {
                results[point.Name] = new BenchCpuResult { Name = point.Name, Skipped = string.Create(CultureInfo.InvariantCulture, $"{bytes / 1e9:0.0} GB of received rows > --cpu-max-gb") };
                continue;
            }

            BenchCpuResult result = new() { Name = point.Name };
            try
            {
                await RunPointAsync(dir, manifest, point, result).ConfigureAwait(false);
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                result.Error = $"{e.GetType().Name}: {e.Message}";
                await console.WriteLineAsync($"bench cpu {point.Name}: FAILED {result.Error}").ConfigureAwait(false);
            }

            results[point.Name] = result;
        }

        progress.Done();
        return results;
    }

    private static async Task RunPointAsync(string dir, BenchManifest manifest, BenchPoint point, BenchCpuResult result)
    {
        EpConfig config = new(point.Tokens, point.Hidden, point.TopK, point.Experts, 0, point.World, point.Local);
        int n = point.Tokens;
        int h = point.Hidden;
        Random rng = new(unchecked((manifest.Seed * 1_000_003) + (point.Hidden * 31) + point.Tokens + 17)); // the same tokens in every run of a seed
        BFloat16[][] tokens = [.. Enumerable.Range(0, point.World).Select(_ => Enumerable.Range(0, n * h).Select(_ => BFloat16.FromSingle((float)((rng.NextDouble() * 4) - 2))).ToArray())];
        using InProcessGroup group = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromMinutes(2) });
        Stopwatch budget = Stopwatch.StartNew();
        for (int s = 0; s < point.Sets.Count; s++)
        {
            int[][] ids = [.. point.Sets[s].Select(f => BenchRouting.Read(Path.Combine(dir, f)))];
            int warm = s == 0 ? 1 : 0;
            for (int it = 0; it < warm + manifest.Iterations; it++)
            {
                long t0 = Stopwatch.GetTimestamp();
                DispatchResult<BFloat16>[] d = await group.RunAsync((l, r) => l.DispatchAsync(Tensor.Create(tokens[r], [n, h]), Tensor.Create(ids[r], [n, point.TopK]))).ConfigureAwait(false);
                long t1 = Stopwatch.GetTimestamp();
                Tensor<BFloat16>[] c = await group.RunAsync((l, r) => l.CombineAsync(d[r].Output, d[r].Layout)).ConfigureAwait(false);
                long t2 = Stopwatch.GetTimestamp();
                if (s == 0 && it == 0)
                {
                    Check(point, tokens, c);
                }

                if (it >= warm)
                {
                    result.Dispatch.Add(Stopwatch.GetElapsedTime(t0, t1).TotalMicroseconds);
                    result.Combine.Add(Stopwatch.GetElapsedTime(t1, t2).TotalMicroseconds);
                }

                if (budget.Elapsed > PointBudget && result.Dispatch.Count >= 2)
                {
                    return;
                }
            }
        }
    }

    private static void Check(BenchPoint point, BFloat16[][] tokens, Tensor<BFloat16>[] combined)
    {
        for (int r = 0; r < tokens.Length; r++)
        {
            BFloat16[] got = new BFloat16[(int)combined[r].FlattenedLength];
            combined[r].FlattenTo(got);
            for (int i = 0; i < got.Length; i++)
            {
                BFloat16 want = BFloat16.FromSingle(point.TopK * tokens[r][i].ToSingle());
                if (got[i] != want)
                {
                    throw new BenchCheckFailure($"CPU backend, rank {r}, {point.Name}: combine element {i} is {got[i].ToSingle()}, expected {want.ToSingle()}");
                }
            }
        }
    }
}

using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using EpA2A.Config;
using EpA2A.Cuda;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Telemetry;

namespace EpA2A.Tools.Bench;

/// <summary>
/// One rank process of `epa2a-tools bench` on the CUDA backend: joins the NVSHMEM job (unique id through a file), then
/// for every point of the manifest times dispatch and combine through the in-process device API (every step aligned
/// by a layer barrier first), the same step by direct libepa2a calls, and the fixed-capacity step captured in CUDA
/// graphs. Each point's result is checked once: every rank's receive size against the routing files, and the
/// combine of the in-place identity experts bit for bit (TopK copies of a bf16 token sum exactly to TopK x token).
/// Rank 0 prints progress lines and, at the end, measures the device copy bandwidth.
/// </summary>
internal sealed class BenchRank(int rank, int world, int gpus, string dir, TextWriter log)
{
    public const string ProgressPrefix = "bench-progress ";

    private string ResultPath => Path.Combine(dir, $"result_{rank}.json");

    public async Task<int> RunAsync(CancellationToken ct)
    {
        BenchManifest manifest = JsonSerializer.Deserialize<BenchManifest>(await File.ReadAllTextAsync(Path.Combine(dir, "manifest.json"), ct).ConfigureAwait(false))
            ?? throw new InvalidDataException("empty manifest");
        using NvshmemRuntime runtime = await RankProcesses.JoinNvshmemAsync(dir, rank, world, gpus, ct).ConfigureAwait(false);
        (long freeBefore, _) = await runtime.DeviceMemoryAsync().ConfigureAwait(false);
        List<BenchRankPoint> results = [];
        List<long> freeAfterPass = [];
        int index = 0;
        int total = manifest.Points.Count * manifest.Passes;
        for (int pass = 0; pass < manifest.Passes; pass++)
        {
            foreach (BenchPoint point in manifest.Points)
            {
                index++;
                if (rank == 0)
                {
                    string label = manifest.Passes > 1 ? $"{point.Name} (pass {pass + 1})" : point.Name;
                    await log.WriteLineAsync(string.Create(CultureInfo.InvariantCulture, $"{ProgressPrefix}{index} {total} {label}")).ConfigureAwait(false);
                    await log.FlushAsync(ct).ConfigureAwait(false);
                }

                BenchRankPoint result = new() { Name = point.Name, Pass = pass };
                try
                {
                    await RunPointAsync(manifest, point, runtime, result).ConfigureAwait(false);
                }
                catch (Exception e) when (e is not OutOfMemoryException && Report(result, e))
                {
                    throw; // not reached: Report writes the result first (a collective dispose may wait for a crashed rank)
                }

                results.Add(result);
                await WriteAsync(new BenchRankReport(rank, 0, results, freeBefore, 0) { DeviceFreeAfterPass = freeAfterPass }).ConfigureAwait(false);
            }

            (long free, _) = await runtime.DeviceMemoryAsync().ConfigureAwait(false);
            freeAfterPass.Add(free);
        }

        long freeAfter = freeAfterPass[^1];
        List<BenchSoakSample> soak = [];
        string? soakError = null;
        if (manifest.SoakSteps > 0)
        {
            try
            {
                await SoakAsync(manifest, runtime, soak).ConfigureAwait(false);
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                soakError = $"{e.GetType().Name}: {e.Message}";
                await log.WriteLineAsync($"[bench rank {rank}] soak FAILED {soakError}").ConfigureAwait(false);
            }
        }

        double bandwidth = rank == 0 ? await DeviceCopies.MeasureBandwidthAsync(runtime).ConfigureAwait(false) : 0;
        await WriteAsync(new BenchRankReport(rank, bandwidth, results, freeBefore, freeAfter) { Soak = soak, SoakError = soakError, DeviceFreeAfterPass = freeAfterPass }).ConfigureAwait(false);
        return 0;
    }

    /// <summary>
    /// The GPU soak: one layer (hidden 2048, top-8 of 256, up to 512 tokens), SoakSteps device-API steps with a fresh
    /// token count and uniform routing every step, each step's receive size checked against the count every rank
    /// derives from the shared seed. Samples free device memory, the managed heap, handles and threads ten times.
    /// </summary>
    private async Task SoakAsync(BenchManifest manifest, NvshmemRuntime runtime, List<BenchSoakSample> samples)
    {
        const int maxTokens = 512;
        const int hidden = 2048;
        const int topK = 8;
        const int experts = 256;
        EpConfig config = new(maxTokens, hidden, topK, experts, rank, world, world, numSms: 32);
        using DeviceBuffer<BFloat16> dTokens = DeviceBuffer.Allocate<BFloat16>(runtime, maxTokens, hidden);
        using DeviceBuffer<int> dIds = DeviceBuffer.Allocate<int>(runtime, maxTokens, topK);
        using EpAll2AllLayer layer = EpAll2AllLayer.CreateCuda(config, runtime, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(30), DeviceCallsOnCallerThread = manifest.CallerThread });
        Random shared = new(manifest.Seed + 7);
        int every = Math.Max(1, manifest.SoakSteps / 10);
        List<double> times = [];
        for (int step = 0; step <= manifest.SoakSteps; step++)
        {
            // Every rank draws every rank's routing from the shared seed: its own to send, all to check the receive size.
            int[] counts = [.. Enumerable.Range(0, world).Select(_ => shared.Next(0, maxTokens + 1))];
            int[][] ids = [.. counts.Select(n => BenchRouting.Draw(n, topK, experts, null, shared))];
            if (step % every == 0 || step == manifest.SoakSteps)
            {
                GC.Collect();
                GC.WaitForPendingFinalizers();
                (long free, _) = await runtime.DeviceMemoryAsync().ConfigureAwait(false);
                using Process self = Process.GetCurrentProcess();
                samples.Add(new BenchSoakSample(step, free, GC.GetTotalMemory(forceFullCollection: true), self.HandleCount, self.Threads.Count, SampleStats.Median(times)));
                times.Clear();
                if (step == manifest.SoakSteps)
                {
                    break;
                }
            }

            int n = counts[rank];
            DeviceTensor<BFloat16> tokens = new(dTokens.Tensor.Pointer, [n, hidden], dTokens);
            DeviceTensor<int> tensorIds = new(dIds.Tensor.Pointer, [n, topK], dIds);
            await DeviceCopies.UploadAsync(runtime, ids[rank], tensorIds).ConfigureAwait(false);
            (double dispatchUs, double combineUs, DeviceDispatchResult<BFloat16> d, _, _) = await StepAsync(layer, tokens, tensorIds).ConfigureAwait(false);
            times.Add(dispatchUs + combineUs);
            int want = BenchRouting.ReceivedRows(ids, world, experts)[rank];
            Require(d.Layout.RecvRows == want, $"soak step {step}: received {d.Layout.RecvRows} rows, expected {want}");
        }
    }

    /// <summary>
    /// One dispatch and an in-place combine (identity experts) through the device API, each timed on the host (µs),
    /// with the call start, the dispatch's return and the combine's return as timestamps (for the all-rank span).
    /// </summary>
    private static async Task<(double DispatchUs, double CombineUs, DeviceDispatchResult<BFloat16> Dispatch, DeviceTensor<BFloat16> Combined, (long Start, long Mid, long End) At)> StepAsync(EpAll2AllLayer layer, DeviceTensor<BFloat16> tokens, DeviceTensor<int> ids)
    {
        long t0 = Stopwatch.GetTimestamp();
        DeviceDispatchResult<BFloat16> d = await layer.DispatchOnDeviceAsync(tokens, ids).ConfigureAwait(false);
        long t1 = Stopwatch.GetTimestamp();
        DeviceTensor<BFloat16> combined = await layer.CombineOnDeviceAsync(d.Output, d.Layout).ConfigureAwait(false);
        long t2 = Stopwatch.GetTimestamp();
        return (Stopwatch.GetElapsedTime(t0, t1).TotalMicroseconds, Stopwatch.GetElapsedTime(t1, t2).TotalMicroseconds, d, combined, (t0, t1, t2));
    }

    /// <summary>Involuntary context switches of the thread that launches the kernels: the caller's, or the GPU worker's.</summary>
    private static long LaunchingThreadSwitches(NvshmemRuntime runtime, bool callerThread) =>
        callerThread ? CoreAffinity.CurrentThreadInvoluntarySwitches() : runtime.WorkerInvoluntarySwitches;

    private bool Report(BenchRankPoint result, Exception e)
    {
        result.Error = $"{e.GetType().Name}: {e.Message}";
        log.WriteLine($"[bench rank {rank}] {result.Name}: FAILED {result.Error}");
        log.Flush();
        return false;
    }

    private async Task RunPointAsync(BenchManifest manifest, BenchPoint point, NvshmemRuntime runtime, BenchRankPoint result)
    {
        EpConfig config = new(point.Tokens, point.Hidden, point.TopK, point.Experts, rank, point.World, point.Local, numSms: manifest.NumSms);
        int n = point.Tokens;
        Random rng = new(unchecked((manifest.Seed * 1_000_003) + (rank * 7919) + (point.Hidden * 31) + point.Tokens)); // the same tokens in every run of a seed
        BFloat16[] tokens = new BFloat16[n * point.Hidden];
        for (int i = 0; i < tokens.Length; i++)
        {
            tokens[i] = BFloat16.FromSingle((float)((rng.NextDouble() * 4) - 2));
        }

        int[][] ids = [.. point.Sets.Select(set => BenchRouting.Read(Path.Combine(dir, set[rank])))];
        using DeviceBuffer<BFloat16> dTokens = DeviceBuffer.Allocate<BFloat16>(runtime, n, point.Hidden);
        using DeviceBuffer<int> dIds = DeviceBuffer.Allocate<int>(runtime, n, point.TopK);
        await dTokens.UploadAsync(tokens).ConfigureAwait(false);
        TimeSpan timeout = TimeSpan.FromSeconds(30);

        // 1. The normal mode through the C# layer, then the same steps by direct libepa2a calls.
        GpuPhaseTimes times = new();
        using (EpAll2AllLayer layer = EpAll2AllLayer.CreateCuda(config, runtime, new EpLayerOptions { StepTimeout = timeout, Observer = times, DeviceCallsOnCallerThread = manifest.CallerThread }))
        {
            if (manifest.CallerThread)
            {
                runtime.PinCallingThreadToWorkerCore(); // the idle worker leaves its core to the thread that launches
            }

            for (int s = 0; s < ids.Length; s++)
            {
                await dIds.UploadAsync(ids[s]).ConfigureAwait(false);
                int warm = s == 0 ? manifest.Warmup : 1;
                for (int it = 0; it < warm + manifest.Iterations; it++)
                {
                    await layer.BarrierAllAsync().ConfigureAwait(false);
                    int thread = Environment.CurrentManagedThreadId;
                    long switches = LaunchingThreadSwitches(runtime, manifest.CallerThread);
                    (double dispatchUs, double combineUs, DeviceDispatchResult<BFloat16> d, DeviceTensor<BFloat16> combined, (long start, long mid, long end)) = await StepAsync(layer, dTokens.Tensor, dIds.Tensor).ConfigureAwait(false);
                    long preempted = thread == Environment.CurrentManagedThreadId && switches >= 0 ? LaunchingThreadSwitches(runtime, manifest.CallerThread) - switches : -1;
                    Require(d.Layout.RecvRows == point.RecvRows[s][rank], $"received {d.Layout.RecvRows} rows, the routing files say {point.RecvRows[s][rank]}");
                    if (it == warm - 1 || (warm == 0 && it == 0))
                    {
                        await CheckCombineAsync(runtime, combined, tokens, point).ConfigureAwait(false);
                    }

                    if (it >= warm)
                    {
                        result.DispatchWall.Add(dispatchUs);
                        result.CombineWall.Add(combineUs);
                        result.DispatchStarts.Add(start);
                        result.DispatchEnds.Add(mid);
                        result.CombineEnds.Add(end);
                        result.Preemptions.Add(preempted);
                        (double prepare, double gap, double send, double combine) = times.Last();
                        result.DispatchGpu.Add(prepare + gap + send);
                        result.DispatchHostGap.Add(gap);
                        result.DispatchPrepareGpu.Add(prepare);
                        result.CombineGpu.Add(combine);
                    }
                }

                times.WantsGpuTimes = false;
                for (int it = 0; it < manifest.Iterations; it++)
                {
                    await layer.BarrierAllAsync().ConfigureAwait(false);
                    (double dispatchUs, double combineUs, _, _, _) = await StepAsync(layer, dTokens.Tensor, dIds.Tensor).ConfigureAwait(false);
                    result.DispatchWallUntimed.Add(dispatchUs);
                    result.CombineWallUntimed.Add(combineUs);
                }

                times.WantsGpuTimes = true;
                for (int it = 0; it < manifest.Iterations; it++)
                {
                    (TimeSpan dd, TimeSpan dc) = await CudaLayerDiagnostics.DirectStepAsync(layer, dTokens.Tensor, dIds.Tensor).ConfigureAwait(false);
                    result.DirectDispatchWall.Add(dd.TotalMicroseconds);
                    result.DirectCombineWall.Add(dc.TotalMicroseconds);
                }
            }
        }

        result.Checked = true;

        // 2. The fixed-capacity mode: one dispatch and one combine captured as CUDA graphs, replayed.
        try
        {
            await RunGraphModeAsync(manifest, point, runtime, config, ids, dTokens, dIds, tokens, timeout, result).ConfigureAwait(false);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            // Reported, not rethrown: a failure every rank shares (the usual case) leaves the group usable for the
            // next point; one rank's alone makes the next collective step time out with its deadline.
            result.GraphError = $"{e.GetType().Name}: {e.Message}";
            await log.WriteLineAsync($"[bench rank {rank}] {point.Name}: graph mode FAILED {result.GraphError}").ConfigureAwait(false);
        }
    }

    private async Task RunGraphModeAsync(BenchManifest manifest, BenchPoint point, NvshmemRuntime runtime, EpConfig config, int[][] ids, DeviceBuffer<BFloat16> dTokens, DeviceBuffer<int> dIds, BFloat16[] tokens, TimeSpan timeout, BenchRankPoint result)
    {
        using EpAll2AllLayer layer = EpAll2AllLayer.CreateCuda(config, runtime, new EpLayerOptions { StepTimeout = timeout, FixedCapacity = true, Capacity = point.GraphCapacity });
        using EpStepGraph<BFloat16> graph = await layer.CaptureStepGraphAsync(dTokens.Tensor, dIds.Tensor).ConfigureAwait(false);
        for (int s = 0; s < ids.Length; s++)
        {
            await dIds.UploadAsync(ids[s]).ConfigureAwait(false);
            int warm = s == 0 ? manifest.Warmup : 1;
            for (int it = 0; it < warm + manifest.Iterations; it++)
            {
                await layer.BarrierAllAsync().ConfigureAwait(false);
                long t0 = Stopwatch.GetTimestamp();
                GraphReplay r = await graph.ReplayAsync().ConfigureAwait(false);
                long t1 = Stopwatch.GetTimestamp();
                double wall = Stopwatch.GetElapsedTime(t0, t1).TotalMicroseconds;
                Require(r.ReceivedRows == point.RecvRows[s][rank], $"graph mode received {r.ReceivedRows} rows, the routing files say {point.RecvRows[s][rank]}");
                if (it == 0)
                {
                    await CheckCombineAsync(runtime, graph.CombineOutput, tokens, point).ConfigureAwait(false);
                }

                if (it >= warm)
                {
                    result.GraphDispatchGpu.Add(r.DispatchGpu.TotalMicroseconds);
                    result.GraphCombineGpu.Add(r.CombineGpu.TotalMicroseconds);
                    result.GraphWall.Add(wall);
                    result.GraphStarts.Add(t0);
                    result.GraphEnds.Add(t1);
                }
            }
        }
    }

    /// <summary>Identity experts in place: each token's combine is TopK copies of it, exact in bf16 (a power-of-two multiple).</summary>
    private async Task CheckCombineAsync(NvshmemRuntime runtime, DeviceTensor<BFloat16> combined, BFloat16[] tokens, BenchPoint point)
    {
        BFloat16[] got = new BFloat16[tokens.Length];
        await DeviceCopies.DownloadAsync(runtime, combined, got).ConfigureAwait(false);
        for (int i = 0; i < got.Length; i++)
        {
            BFloat16 want = BFloat16.FromSingle(point.TopK * tokens[i].ToSingle());
            if (got[i] != want)
            {
                throw new BenchCheckFailure($"rank {rank}, {point.Name}: combine element {i} (token {i / point.Hidden}) is {got[i].ToSingle()}, expected {want.ToSingle()}");
            }
        }
    }

    private void Require(bool ok, string what)
    {
        if (!ok)
        {
            throw new BenchCheckFailure($"rank {rank}: {what}");
        }
    }

    private async Task WriteAsync(BenchRankReport report)
    {
        await File.WriteAllTextAsync(ResultPath + ".tmp", JsonSerializer.Serialize(report, BenchJson.Compact)).ConfigureAwait(false);
        File.Move(ResultPath + ".tmp", ResultPath, overwrite: true);
    }
}

/// <summary>A bench check failed (receive size or combine value).</summary>
internal sealed class BenchCheckFailure(string message) : Exception(message);

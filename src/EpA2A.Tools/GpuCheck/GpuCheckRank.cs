using System.Diagnostics;
using System.Globalization;
using System.Numerics.Tensors;
using System.Text.Json;
using EpA2A.Config;
using EpA2A.Cuda;
using EpA2A.Errors;
using EpA2A.Experts;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Reference;
using EpA2A.Telemetry;

namespace EpA2A.Tools.GpuCheck;

/// <summary>What one rank found in one case.</summary>
internal sealed record GpuCheckRankResult
{
    public required string Name { get; init; }

    public bool Pass { get; init; }

    public string Message { get; init; } = string.Empty;

    public int RecvRows { get; init; }

    public double MaxAbsError { get; init; }

    /// <summary>True when compared with the in-process CPU group and equal; null when not compared.</summary>
    public bool? MatchesCpu { get; init; }

    public double DispatchGpuUs { get; init; }

    public double CombineGpuUs { get; init; }

    public double PrepareGpuUs { get; init; }

    public double SizeWaitGpuUs { get; init; }

    public double SendFinishGpuUs { get; init; }

    public double DispatchCallUs { get; init; }

    public double CombineCallUs { get; init; }

    /// <summary>Bytes every rank together reads and writes in one dispatch (rows read once and written once).</summary>
    public double DispatchBytes { get; init; }

    /// <summary>Bytes every rank together reads and writes in one combine (expert rows copied in, read back, results written).</summary>
    public double CombineBytes { get; init; }

    /// <summary>Per timed step (warm-up left out): when this rank's dispatch call began, in <see cref="Stopwatch"/> timestamps (a clock the rank processes share).</summary>
    public List<long> DispatchStarts { get; init; } = [];

    /// <summary>Per timed step: when this rank's dispatch call returned (its GPU work done), which is also when its combine call began.</summary>
    public List<long> DispatchEnds { get; init; } = [];

    /// <summary>Per timed step: when this rank's combine call returned (its GPU work done).</summary>
    public List<long> CombineEnds { get; init; } = [];

    /// <summary>Where this rank's wall time went (inputs, reference, host API, device API, timed steps), for a slow case.</summary>
    public string Phases { get; init; } = string.Empty;
}

/// <summary>One rank's report of a group: its cases, and (rank 0) the copy bandwidth measured after them.</summary>
internal sealed record GpuCheckRankReport(int Rank, double CopyBytesPerSecond, List<GpuCheckRankResult> Cases);

/// <summary>
/// One rank process of `epa2a-tools gpu-check`: joins the NVSHMEM job (unique id through a file), then for each case of
/// its group draws every rank's inputs from the seed, runs its CUDA layer through the host API, the device API and
/// timed device steps, and checks its own rank exactly against the per-rank reference (and the CPU backend for the
/// small cases). Writes result_RANK.json into the group's folder.
/// </summary>
internal sealed class GpuCheckRank(string group, int rank, int world, int gpus, string dir, int seed, string? filter, TextWriter log)
{
    private readonly List<GpuCheckRankResult> results = [];

    private string ResultPath => Path.Combine(dir, $"result_{rank}.json");

    public async Task<int> RunAsync(CancellationToken ct)
    {
        using NvshmemRuntime runtime = await RankProcesses.JoinNvshmemAsync(dir, rank, world, gpus, ct).ConfigureAwait(false);
        string path = ResultPath;
        foreach (GpuCheckCase c in GpuCheckCase.Of(group, filter))
        {
            GpuCheckRankResult r;
            Stopwatch sw = Stopwatch.StartNew();
            try
            {
                r = c.LowLatency ? await new GpuCheckLowLatency(c, rank, world, dir, seed).RunAsync(runtime).ConfigureAwait(false) : c.Type switch
                {
                    TokenType.BFloat16 => await RunCaseAsync<BFloat16>(c, runtime).ConfigureAwait(false),
                    TokenType.Float16 => await RunCaseAsync<Half>(c, runtime).ConfigureAwait(false),
                    _ => await RunCaseAsync<float>(c, runtime).ConfigureAwait(false),
                };
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                r = new GpuCheckRankResult { Name = c.Name, Pass = false, Message = $"{e.GetType().Name}: {e.Message}" };
            }

            string phases = r.Phases.Length > 0 ? $" [{r.Phases}]" : string.Empty;
            await log.WriteLineAsync(string.Create(CultureInfo.InvariantCulture, $"[{group} rank {rank}] {c.Name}: {(r.Pass ? "pass" : "FAIL")} in {sw.Elapsed.TotalSeconds:0.0} s{phases} {r.Message}")).ConfigureAwait(false);
            results.Add(r);
            await WriteAsync(path, new GpuCheckRankReport(rank, 0, results)).ConfigureAwait(false);
        }

        double bandwidth = rank == 0 ? await DeviceCopies.MeasureBandwidthAsync(runtime).ConfigureAwait(false) : 0;
        await WriteAsync(path, new GpuCheckRankReport(rank, bandwidth, results)).ConfigureAwait(false);
        return 0;
    }

    private static async Task WriteAsync(string path, GpuCheckRankReport report)
    {
        await File.WriteAllTextAsync(path + ".tmp", JsonSerializer.Serialize(report)).ConfigureAwait(false);
        File.Move(path + ".tmp", path, overwrite: true);
    }

    private static T[] Flat<T>(Tensor<T> t) => DenseTensor.ToArray(t);

    private static double Median(List<double> v)
    {
        if (v.Count == 0)
        {
            return 0;
        }

        return SampleStats.Median(v.Count > 2 ? v.Skip(1) : v); // the first is warm-up
    }

    /// <summary>Scatter indices that place every row somewhere new: the packed placement permuted inside each rank's range.</summary>
    private static RankInput<T>[] WithShuffledScatter<T>(EpConfig config, RankInput<T>[] inputs, Random rng)
        where T : unmanaged
    {
        ReferencePlacement packed = ReferenceRankView.Place(config, inputs);
        int[] bases = new int[config.WorldSize + 1];
        for (int d = 0; d < config.WorldSize; d++)
        {
            bases[d + 1] = bases[d] + packed.RowsPerLocalExpert[d].Sum();
        }

        int[] permutation = new int[bases[^1]];
        for (int d = 0; d < config.WorldSize; d++)
        {
            int[] range = [.. Enumerable.Range(bases[d], bases[d + 1] - bases[d])];
            rng.Shuffle(range);
            range.CopyTo(permutation, bases[d]);
        }

        return [.. inputs.Select((input, r) => input with
        {
            ScatterIndices = [.. packed.GlobalRows[r].Select(g => g < 0 ? 0 : permutation[g])],
        })];
    }

    private static void Require(bool ok, string what)
    {
        if (!ok)
        {
            throw new GpuCheckFailure(what);
        }
    }

    private static void RequireBitwise<T>(ReadOnlySpan<T> want, ReadOnlySpan<T> got, string what)
        where T : unmanaged
    {
        Require(want.Length == got.Length, $"{what}: {got.Length} elements, expected {want.Length}");
        if (System.Runtime.InteropServices.MemoryMarshal.AsBytes(want).SequenceEqual(System.Runtime.InteropServices.MemoryMarshal.AsBytes(got)))
        {
            return;
        }

        for (int i = 0; i < want.Length; i++)
        {
            if (!EqualityComparer<T>.Default.Equals(want[i], got[i]))
            {
                throw new GpuCheckFailure($"{what}: element {i} is {got[i]}, expected {want[i]}");
            }
        }
    }

    /// <summary>
    /// Within one rounding of the token type (fp32 sums in another order may land on the neighbour). Returns the max
    /// error. Large outputs are compared in parallel chunks; the first bad element (lowest index) is reported.
    /// </summary>
    private static double RequireClose<T>(T[] want, T[] got, int topK, string what)
        where T : unmanaged
    {
        Require(want.Length == got.Length, $"{what}: {got.Length} elements, expected {want.Length}");
        const int Chunk = 1 << 18;
        int chunks = (want.Length + Chunk - 1) / Chunk;
        double[] maxes = new double[chunks];
        int[] bad = new int[chunks];
        Parallel.For(0, chunks, ch =>
        {
            double max = 0;
            bad[ch] = -1;
            int end = Math.Min(want.Length, (ch + 1) * Chunk);
            for (int i = ch * Chunk; i < end; i++)
            {
                (bool ok, double err, _) = Close(want[i], got[i], topK);
                if (!ok)
                {
                    bad[ch] = i;
                    return;
                }

                max = Math.Max(max, err);
            }

            maxes[ch] = max;
        });
        int first = bad.FirstOrDefault(i => i >= 0, -1);
        if (first >= 0)
        {
            float g = TokenConvert.ToSingle(got[first]);
            (_, _, float tolerance) = Close(want[first], got[first], topK);
            Require(!float.IsNaN(g), $"{what}: element {first} is NaN (never written?)");
            Require(false, $"{what}: element {first} is {g}, expected {TokenConvert.ToSingle(want[first])} (tolerance {tolerance})");
        }

        return maxes.Length == 0 ? 0 : maxes.Max();
    }

    private static (bool Ok, double Error, float Tolerance) Close<T>(T want, T got, int topK)
        where T : unmanaged
    {
        float w = TokenConvert.ToSingle(want);
        float g = TokenConvert.ToSingle(got);
        float magnitude = Math.Max(Math.Abs(w), 1e-3f);
        float ulp = typeof(T) == typeof(BFloat16) ? magnitude / 128f : typeof(T) == typeof(Half) ? magnitude / 1024f : magnitude * 2.4e-7f;
        float tolerance = ulp + (topK * 4 * 4e-7f * Math.Max(1f, Math.Abs(w)));
        double err = Math.Abs((double)w - g);
        return (!float.IsNaN(g) && err <= tolerance, err, tolerance);
    }

    private async Task<GpuCheckRankResult> RunCaseAsync<T>(GpuCheckCase c, NvshmemRuntime runtime)
        where T : unmanaged
    {
        EpConfig config = c.Config(rank);
        PhaseWatch phases = new();
        Random rng = new(c.Seed(seed));
        int[] counts = [.. Enumerable.Range(0, world).Select(r => c.Large && (!c.RandomTokens || r == 0) ? c.MaxTokens : rng.Next((c.MaxTokens / 2) + 1, c.MaxTokens + 1))];
        RankInput<T>[] inputs = RoutingGenerator.Draw<T>(config, counts, c.Drop, c.Skewed, c.Weights, rng);
        if (c.Scatter)
        {
            inputs = WithShuffledScatter(config, inputs, rng);
        }

        phases.Lap("inputs");
        ReferencePlacement place = ReferenceRankView.Place(config, inputs);
        ReferenceDispatch<T> want = ReferenceRankView.DispatchTo(config, inputs, place, rank);
        T[] wantCombine = ReferenceRankView.CombineFor(config, inputs, place, rank, DeterministicExperts.Apply, c.Weighted);
        phases.Lap("reference");
        double rowBytes = (double)c.Hidden * config.TokenBytes;
        double rows = place.RowsPerLocalExpert.Sum(r => r.Sum());
        double dispatchBytes = 2 * rows * rowBytes;
        double combineBytes = (3 * rows * rowBytes) + (counts.Sum() * rowBytes);

        GpuPhaseTimes times = new();
        EpLayerOptions options = new() { StepTimeout = c.Timeout, Capacity = c.Capacity, Observer = times };
        using EpAll2AllLayer layer = EpAll2AllLayer.CreateCuda(config, runtime, options);
        try
        {
            phases.Lap("layer create");
            return await RunStepsAsync(c, runtime, layer, times, phases, inputs, place, want, wantCombine, dispatchBytes, combineBytes).ConfigureAwait(false);
        }
        catch (Exception e) when (ReportBeforeDispose(c, e))
        {
            throw; // not reached: the filter reports and declines
        }
    }

    /// <summary>
    /// Writes a failure before the layer's collective dispose runs, which may wait forever for a rank that crashed;
    /// an exception filter runs before the stack unwinds.
    /// </summary>
    private bool ReportBeforeDispose(GpuCheckCase c, Exception e)
    {
        List<GpuCheckRankResult> now = [.. results, new GpuCheckRankResult { Name = c.Name, Pass = false, Message = $"{e.GetType().Name}: {e.Message}" }];
        File.WriteAllText(ResultPath, JsonSerializer.Serialize(new GpuCheckRankReport(rank, 0, now)));
        log.WriteLine($"[{group} rank {rank}] {c.Name}: FAIL (before dispose) {e.GetType().Name}: {e.Message}");
        log.Flush();
        return false;
    }

    private async Task<GpuCheckRankResult> RunStepsAsync<T>(
        GpuCheckCase c,
        NvshmemRuntime runtime,
        EpAll2AllLayer layer,
        GpuPhaseTimes times,
        PhaseWatch phases,
        RankInput<T>[] inputs,
        ReferencePlacement place,
        ReferenceDispatch<T> want,
        T[] wantCombine,
        double dispatchBytes,
        double combineBytes)
        where T : unmanaged
    {
        RankInput<T> mine = inputs[rank];
        int n = mine.Count;
        int h = c.Hidden;
        int k = c.TopK;
        int recv = want.Rows;
        EpConfig config = layer.Config;
        string message = string.Empty;
        if (c.Fault)
        {
            message = await StayAwayOrTimeOutAsync(c, layer, mine).ConfigureAwait(false);
            await layer.RecoverAsync().ConfigureAwait(false);
            message += "; recovered (collective reset), then ";
        }
        else if (c.Rejects)
        {
            message = await RejectOrFailAtOnceAsync(c, layer, mine).ConfigureAwait(false);
            message += "; no recovery, then ";
        }

        // 1. Host API (Tensor<T> in, host copies out), outputs poisoned first.
        await CudaLayerDiagnostics.PoisonReceiveBuffersAsync(layer).ConfigureAwait(false);
        DispatchResult<T> got = await layer.DispatchAsync(
            Tensor.Create(mine.Tokens, [n, h]),
            Tensor.Create(mine.ExpertIds, [n, k]),
            mine.Weights is { } w ? Tensor.Create(w, [n, k]) : null,
            mine.ScatterIndices is { } si ? Tensor.Create(si, [n, k]) : null).ConfigureAwait(false);
        T[] output = Flat(got.Output);
        float[]? weights = got.Weights is null ? null : Flat(got.Weights);
        CheckDispatch("host API", want, place, output, weights, got.Layout);
        CheckLayoutHostArrays(place, mine, got.Layout);
        T[] expertOut = DeterministicExperts.ApplyToBlocks<T>(output, h, rank * config.ExpertsPerRank, got.Layout.ExpertRowStarts, got.Layout.RowsPerLocalExpert);
        T[] combined = Flat(await layer.CombineAsync(Tensor.Create(expertOut, [recv, h]), got.Layout, new CombineOptions(c.Weighted)).ConfigureAwait(false));
        double maxErr = RequireClose(wantCombine, combined, k, "combine (host API) vs reference");
        phases.Lap("host API + checks");
        bool? matchesCpu = null;
        if (c.CompareWithCpu && !c.Fault)
        {
            await CompareWithCpuAsync(c, inputs, output, weights, got.Layout, combined).ConfigureAwait(false);
            matchesCpu = true;
            phases.Lap("CPU backend");
        }

        if (c.Fault)
        {
            return new GpuCheckRankResult { Name = c.Name, Pass = true, Message = message + "a checked step passed", RecvRows = recv, MaxAbsError = maxErr };
        }

        // 2. Device API (device buffers in and out, no host copies), outputs poisoned first.
        using DeviceBuffer<T> dTokens = DeviceBuffer.Allocate<T>(runtime, n, h);
        using DeviceBuffer<int> dIds = DeviceBuffer.Allocate<int>(runtime, n, k);
        using DeviceBuffer<float>? dWeights = mine.Weights is null ? null : DeviceBuffer.Allocate<float>(runtime, n, k);
        using DeviceBuffer<int>? dScatter = mine.ScatterIndices is null ? null : DeviceBuffer.Allocate<int>(runtime, n, k);
        using DeviceBuffer<T> dExpert = DeviceBuffer.Allocate<T>(runtime, recv, h);
        await dTokens.UploadAsync(mine.Tokens).ConfigureAwait(false);
        await dIds.UploadAsync(mine.ExpertIds).ConfigureAwait(false);
        if (dWeights is not null)
        {
            await dWeights.UploadAsync(mine.Weights).ConfigureAwait(false);
        }

        if (dScatter is not null)
        {
            await dScatter.UploadAsync(mine.ScatterIndices).ConfigureAwait(false);
        }

        await dExpert.UploadAsync(expertOut).ConfigureAwait(false);
        await CudaLayerDiagnostics.PoisonReceiveBuffersAsync(layer).ConfigureAwait(false);
        DeviceDispatchResult<T> dgot = await layer.DispatchOnDeviceAsync(dTokens.Tensor, dIds.Tensor, dWeights?.Tensor, dScatter?.Tensor).ConfigureAwait(false);
        T[] dOutput = new T[dgot.Output.FlattenedLength];
        await DeviceCopies.DownloadAsync(runtime, dgot.Output, dOutput).ConfigureAwait(false);
        float[]? dW = null;
        if (dgot.Weights is { } dwt)
        {
            dW = new float[dwt.FlattenedLength];
            await DeviceCopies.DownloadAsync(runtime, dwt, dW).ConfigureAwait(false);
        }

        CheckDispatch("device API", want, place, dOutput, dW, dgot.Layout);
        DeviceTensor<T> dCombined = await layer.CombineOnDeviceAsync(dExpert.Tensor, dgot.Layout, new CombineOptions(c.Weighted)).ConfigureAwait(false);
        T[] dComb = new T[dCombined.FlattenedLength];
        await DeviceCopies.DownloadAsync(runtime, dCombined, dComb).ConfigureAwait(false);
        RequireBitwise<T>(combined, dComb, "combine (device API) vs combine (host API): deterministic");

        phases.Lap("device API + checks");
        if (c.Graph)
        {
            message += await GraphChecksAsync(c, runtime, inputs, want, combined, dTokens, dIds, dWeights, dExpert).ConfigureAwait(false);
            phases.Lap("graphs");
        }

        // 3. Timed device steps, every one aligned by a layer barrier first; no garbage collection in between if it
        //    can be helped (a rank paused by the GC stalls every peer that waits for it).
        GC.Collect(2, GCCollectionMode.Forced, blocking: true, compacting: true);
        GC.WaitForPendingFinalizers();
        List<double> dispGpu = [], combGpu = [], prep = [], wait = [], send = [], dispCall = [], combCall = [];
        List<long> starts = [], mids = [], ends = [];
        DeviceTensor<T>? last = null;
        for (int it = 0; it < c.TimedSteps + 1; it++)
        {
            await layer.BarrierAllAsync().ConfigureAwait(false);
            long t0 = Stopwatch.GetTimestamp();
            DeviceDispatchResult<T> d = await layer.DispatchOnDeviceAsync(dTokens.Tensor, dIds.Tensor, dWeights?.Tensor, dScatter?.Tensor).ConfigureAwait(false);
            long t1 = Stopwatch.GetTimestamp();
            last = await layer.CombineOnDeviceAsync(dExpert.Tensor, d.Layout, new CombineOptions(c.Weighted)).ConfigureAwait(false);
            long t2 = Stopwatch.GetTimestamp();
            dispCall.Add(Stopwatch.GetElapsedTime(t0, t1).TotalMicroseconds);
            combCall.Add(Stopwatch.GetElapsedTime(t1, t2).TotalMicroseconds);
            if (it > 0)
            {
                starts.Add(t0);
                mids.Add(t1);
                ends.Add(t2);
            }
            (double p, double sz, double s, double cb) = times.Last();
            prep.Add(p);
            wait.Add(sz);
            send.Add(s);
            dispGpu.Add(p + sz + s);
            combGpu.Add(cb);
        }

        if (last is not null)
        {
            await DeviceCopies.DownloadAsync(runtime, last, dComb).ConfigureAwait(false);
            RequireBitwise<T>(combined, dComb, "combine of the last timed step vs the checked one");
        }

        phases.Lap("timed steps");
        return new GpuCheckRankResult
        {
            Name = c.Name,
            Pass = true,
            Message = message,
            RecvRows = recv,
            MaxAbsError = maxErr,
            MatchesCpu = matchesCpu,
            DispatchGpuUs = Median(dispGpu),
            CombineGpuUs = Median(combGpu),
            PrepareGpuUs = Median(prep),
            SizeWaitGpuUs = Median(wait),
            SendFinishGpuUs = Median(send),
            DispatchCallUs = Median(dispCall),
            CombineCallUs = Median(combCall),
            DispatchBytes = dispatchBytes,
            CombineBytes = combineBytes,
            DispatchStarts = starts,
            DispatchEnds = mids,
            CombineEnds = ends,
            Phases = phases.ToString(),
        };
    }

    /// <summary>
    /// Graph cases: (1) the same step through a layer with caller-thread calls, bit for bit; (2) a fixed-capacity
    /// layer (worst-case rows) with the step captured as CUDA graphs, replayed twice, dispatch rows and combine bit
    /// for bit against the reference and the device-API combine, outputs poisoned before each replay; (3) a
    /// fixed-capacity layer too small for a step that sends every token to rank 0: every rank fails together, all
    /// recover, and a step that fits is correct.
    /// </summary>
    private async Task<string> GraphChecksAsync<T>(
        GpuCheckCase c,
        NvshmemRuntime runtime,
        RankInput<T>[] inputs,
        ReferenceDispatch<T> want,
        T[] combined,
        DeviceBuffer<T> dTokens,
        DeviceBuffer<int> dIds,
        DeviceBuffer<float>? dWeights,
        DeviceBuffer<T> dExpert)
        where T : unmanaged
    {
        EpConfig config = c.Config(rank);
        int h = c.Hidden;
        CombineOptions how = new(c.Weighted);

        // 1. Caller-thread calls.
        using (EpAll2AllLayer inline = EpAll2AllLayer.CreateCuda(config, runtime, new EpLayerOptions { StepTimeout = c.Timeout, DeviceCallsOnCallerThread = true }))
        {
            DeviceDispatchResult<T> d = await inline.DispatchOnDeviceAsync(dTokens.Tensor, dIds.Tensor, dWeights?.Tensor).ConfigureAwait(false);
            T[] rows = new T[d.Output.FlattenedLength];
            await DeviceCopies.DownloadAsync(runtime, d.Output, rows).ConfigureAwait(false);
            RequireBitwise<T>(want.Output, rows, $"rank {rank}: dispatch rows with caller-thread calls vs the reference");
            DeviceTensor<T> back = await inline.CombineOnDeviceAsync(dExpert.Tensor, d.Layout, how).ConfigureAwait(false);
            T[] got = new T[back.FlattenedLength];
            await DeviceCopies.DownloadAsync(runtime, back, got).ConfigureAwait(false);
            RequireBitwise<T>(combined, got, $"rank {rank}: combine with caller-thread calls vs the worker-thread combine");
        }

        // 2. Fixed capacity (the true worst case), captured and replayed.
        using (EpAll2AllLayer fixedLayer = EpAll2AllLayer.CreateCuda(config, runtime, new EpLayerOptions { StepTimeout = c.Timeout, FixedCapacity = true, Capacity = c.World }))
        {
            using EpStepGraph<T> graph = await fixedLayer.CaptureStepGraphAsync(dTokens.Tensor, dIds.Tensor, dWeights?.Tensor, dExpert.Tensor, how).ConfigureAwait(false);
            for (int replay = 0; replay < 2; replay++)
            {
                await DeviceCopies.FillAsync(runtime, graph.DispatchOutput.Pointer, graph.DispatchOutput.ByteLength, 0xFF).ConfigureAwait(false);
                await DeviceCopies.FillAsync(runtime, graph.CombineOutput.Pointer, graph.CombineOutput.ByteLength, 0xFF).ConfigureAwait(false);
                await fixedLayer.BarrierAllAsync().ConfigureAwait(false);
                GraphReplay r = await graph.ReplayAsync().ConfigureAwait(false);
                Require(r.ReceivedRows == want.Rows, $"rank {rank}: graph replay {replay} received {r.ReceivedRows} rows, expected {want.Rows}");
                T[] rows = new T[(long)want.Rows * h];
                await DeviceCopies.DownloadAsync(runtime, new DeviceTensor<T>(graph.DispatchOutput.Pointer, [want.Rows, h]), rows).ConfigureAwait(false);

                // The experts' rows came from dExpert (copied in by the combine graph), so the dispatch rows are
                // overwritten by then: compare the combine, then the dispatch of a dispatch-only replay below.
                T[] got = new T[graph.CombineOutput.FlattenedLength];
                await DeviceCopies.DownloadAsync(runtime, graph.CombineOutput, got).ConfigureAwait(false);
                RequireBitwise<T>(combined, got, $"rank {rank}: graph replay {replay} combine vs the device-API combine");
            }

            await fixedLayer.BarrierAllAsync().ConfigureAwait(false);
            GraphReplay only = await graph.ReplayDispatchAsync().ConfigureAwait(false);
            T[] dispatched = new T[(long)want.Rows * h];
            await DeviceCopies.DownloadAsync(runtime, new DeviceTensor<T>(graph.DispatchOutput.Pointer, [want.Rows, h]), dispatched).ConfigureAwait(false);
            RequireBitwise<T>(want.Output, dispatched, $"rank {rank}: graph dispatch rows vs the reference");
            await graph.ReplayCombineAsync().ConfigureAwait(false);
            Require(only.ReceivedRows == want.Rows, $"rank {rank}: dispatch-only replay received {only.ReceivedRows} rows");
        }

        // 3. Too small: every token of every rank goes to rank 0's first expert... then a step that fits.
        using (EpAll2AllLayer small = EpAll2AllLayer.CreateCuda(config, runtime, new EpLayerOptions { StepTimeout = c.Timeout, FixedCapacity = true, Capacity = 1 }))
        {
            int n = c.MaxTokens;
            int[] hot = new int[n * c.TopK];
            for (int i = 0; i < hot.Length; i++)
            {
                hot[i] = i % c.TopK; // distinct per token, all on rank 0 (TopK <= experts per rank in these cases)
            }

            using DeviceBuffer<int> dHot = DeviceBuffer.Allocate<int>(runtime, n, c.TopK);
            await dHot.UploadAsync(hot).ConfigureAwait(false);
            using DeviceBuffer<T> dMany = DeviceBuffer.Allocate<T>(runtime, n, h);
            InvalidOperationException e = await RequireThrowsAsync<InvalidOperationException>(async () => await small.DispatchOnDeviceAsync(dMany.Tensor, dHot.Tensor).ConfigureAwait(false)).ConfigureAwait(false);
            Require(e.Message.Contains("fixed-capacity", StringComparison.Ordinal), $"rank {rank}: the overflow error does not say why: {e.Message}");
            await small.RecoverAsync().ConfigureAwait(false);
            int few = Math.Min(8, inputs[rank].Count);
            DeviceTensor<T> fewTokens = new(dTokens.Tensor.Pointer, [few, h]);
            DeviceTensor<int> fewIds = new(dIds.Tensor.Pointer, [few, c.TopK]);
            DeviceDispatchResult<T> ok = await small.DispatchOnDeviceAsync(fewTokens, fewIds).ConfigureAwait(false);
            int expect = inputs.Sum(inp => inp.ExpertIds.Take(Math.Min(8, inp.Count) * c.TopK).Count(x => x >= 0 && x < c.Experts && x / config.ExpertsPerRank == rank));
            Require(ok.Layout.RecvRows == expect, $"rank {rank}: after recovery a fitting step received {ok.Layout.RecvRows} rows, expected {expect}");
            await small.CombineOnDeviceAsync(ok.Output, ok.Layout).ConfigureAwait(false);
        }

        return "caller-thread calls, 3 graph replays and the capacity overflow + recovery checked";
    }

    private static async Task<TException> RequireThrowsAsync<TException>(Func<Task> action)
        where TException : Exception
    {
        try
        {
            await action().ConfigureAwait(false);
        }
        catch (TException e)
        {
            return e;
        }

        throw new GpuCheckFailure($"expected {typeof(TException).Name}, but the call succeeded");
    }

    /// <summary>
    /// A rejection case: rank <see cref="GpuCheckCase.RejectRank"/> passes bad input (an expert id of -6 at dispatch, or an
    /// expert output with a row too many at combine) and must get its <see cref="ArgumentException"/> at once; every other
    /// rank must fail with an <see cref="EpStepAbortedException"/> naming it within a second (the deadline is 10 s), and the
    /// step after it must pass with no recovery. The ranks meet at a layer barrier first, so the times start together.
    /// </summary>
    private async Task<string> RejectOrFailAtOnceAsync<T>(GpuCheckCase c, EpAll2AllLayer layer, RankInput<T> mine)
        where T : unmanaged
    {
        int bad = c.RejectRank;
        int n = mine.Count;
        int h = c.Hidden;
        int k = c.TopK;
        Tensor<float>? weights = mine.Weights is { } w ? Tensor.Create(w, [n, k]) : null;
        EpAllToAllLayout? layout = null;
        int recv = 0;
        if (c.RejectCombine)
        {
            DispatchResult<T> d = await layer.DispatchAsync(Tensor.Create(mine.Tokens, [n, h]), Tensor.Create(mine.ExpertIds, [n, k]), weights).ConfigureAwait(false);
            layout = d.Layout;
            recv = d.Layout.RecvRows;
        }
        else
        {
            await layer.BarrierAllAsync().ConfigureAwait(false);
        }

        Stopwatch sw = Stopwatch.StartNew();
        if (rank == bad)
        {
            ArgumentException e = c.RejectCombine
                ? await RequireThrowsAsync<ArgumentException>(async () => await layer.CombineAsync(Tensor.Create(new T[(recv + 1) * h], [recv + 1, h]), layout!, new CombineOptions(c.Weighted)).ConfigureAwait(false)).ConfigureAwait(false)
                : await RequireThrowsAsync<ArgumentException>(async () =>
                {
                    int[] ids = (int[])mine.ExpertIds.Clone();
                    ids[0] = -6;
                    await layer.DispatchAsync(Tensor.Create(mine.Tokens, [n, h]), Tensor.Create(ids, [n, k]), weights).ConfigureAwait(false);
                }).ConfigureAwait(false);
            double ms = sw.Elapsed.TotalMilliseconds;
            Require(ms < 1000, $"the rejecting rank's ArgumentException took {ms:0} ms");
            return string.Create(CultureInfo.InvariantCulture, $"rank {bad} rejected its {(c.RejectCombine ? "combine" : "dispatch")} input in {ms:0.0} ms: {e.Message[..Math.Min(160, e.Message.Length)]}");
        }

        EpStepAbortedException aborted = c.RejectCombine
            ? await RequireThrowsAsync<EpStepAbortedException>(async () => await layer.CombineAsync(Tensor.Create(new T[recv * h], [recv, h]), layout!, new CombineOptions(c.Weighted)).ConfigureAwait(false)).ConfigureAwait(false)
            : await RequireThrowsAsync<EpStepAbortedException>(async () => await layer.DispatchAsync(Tensor.Create(mine.Tokens, [n, h]), Tensor.Create(mine.ExpertIds, [n, k]), weights).ConfigureAwait(false)).ConfigureAwait(false);
        double waited = sw.Elapsed.TotalMilliseconds;
        Require(aborted.Rank == bad, $"the failure names rank {aborted.Rank?.ToString(CultureInfo.InvariantCulture) ?? "none"}, not rank {bad}: {aborted.Message}");
        Require(aborted.Message.Contains($"rank {bad}", StringComparison.Ordinal), $"the message does not name rank {bad}: {aborted.Message}");
        Require(waited < 1000, $"rank {rank} failed after {waited:0} ms, not at once (deadline {c.Timeout.TotalSeconds:0} s): {aborted.Message}");
        return string.Create(CultureInfo.InvariantCulture, $"failed in {waited:0.0} ms naming rank {bad}: {aborted.Message[..Math.Min(200, aborted.Message.Length)]}");
    }

    /// <summary>The fault case: the last rank never arrives at the step; every other rank must time out within the deadline naming it.</summary>
    private async Task<string> StayAwayOrTimeOutAsync<T>(GpuCheckCase c, EpAll2AllLayer layer, RankInput<T> mine)
        where T : unmanaged
    {
        int late = world - 1;
        if (rank == late)
        {
            Stopwatch wait = Stopwatch.StartNew();
            for (int r = 0; r < late; r++)
            {
                while (!File.Exists(Path.Combine(dir, $"fault_{r}")))
                {
                    Require(wait.Elapsed < TimeSpan.FromSeconds(60), $"rank {r} never reported its timeout");
                    await Task.Delay(20).ConfigureAwait(false);
                }
            }

            return "stayed away";
        }

        Stopwatch sw = Stopwatch.StartNew();
        string message;
        try
        {
            await layer.DispatchAsync(Tensor.Create(mine.Tokens, [mine.Count, c.Hidden]), Tensor.Create(mine.ExpertIds, [mine.Count, c.TopK])).ConfigureAwait(false);
            throw new GpuCheckFailure($"dispatch succeeded although rank {late} never arrived");
        }
        catch (EpStepTimeoutException e)
        {
            double ms = sw.Elapsed.TotalMilliseconds;
            Require(e.Rank == late, $"the timeout names rank {e.Rank?.ToString(CultureInfo.InvariantCulture) ?? "none"}, not rank {late}: {e.Message}");
            Require(e.Message.Contains($"rank {late}", StringComparison.Ordinal), $"the message does not name rank {late}: {e.Message}");
            Require(ms < c.Timeout.TotalMilliseconds + 1500, $"the timeout took {ms:0} ms (deadline {c.Timeout.TotalMilliseconds:0} ms)");
            message = string.Create(CultureInfo.InvariantCulture, $"timed out in {ms:0} ms naming rank {e.Rank}: {e.Message[..Math.Min(200, e.Message.Length)]}");
        }

        await File.WriteAllTextAsync(Path.Combine(dir, $"fault_{rank}"), "1").ConfigureAwait(false);
        return message;
    }

    private void CheckDispatch<T>(string api, ReferenceDispatch<T> want, ReferencePlacement place, T[] output, float[]? weights, EpAllToAllLayout layout)
        where T : unmanaged
    {
        string where = $"rank {rank}, {api}";
        Require(layout.RecvRows == want.Rows, $"{where}: received {layout.RecvRows} rows, expected {want.Rows}");
        RequireBitwise<T>(want.Output, output, $"dispatch output, {where}");
        if (want.Weights is not null)
        {
            Require(weights is not null, $"{where}: no weights returned");
            RequireBitwise<float>(want.Weights, weights, $"dispatch weights, {where}");
        }
        else
        {
            Require(weights is null, $"{where}: weights returned although dispatch had none");
        }

        RequireBitwise<int>(want.RowsPerLocalExpert, layout.RowsPerLocalExpert, $"rows per local expert, {where}");
        RequireBitwise<int>(want.PaddedRowsPerLocalExpert, layout.PaddedRowsPerLocalExpert, $"padded rows per local expert, {where}");
        RequireBitwise<int>(want.ExpertRowStarts, layout.ExpertRowStarts, $"expert row starts, {where}");
        RequireBitwise<int>(place.TokensPerRank, layout.TokensPerSourceRank, $"tokens per source rank, {where}");
    }

    private void CheckLayoutHostArrays<T>(ReferencePlacement place, RankInput<T> mine, EpAllToAllLayout layout)
        where T : unmanaged
    {
        RequireBitwise<int>(place.GlobalRows[rank], layout.ScatterIndices, $"scatter indices (global rows) of rank {rank}'s slots");
        RequireBitwise<int>(mine.ExpertIds, layout.TopKIds, $"top-k ids of rank {rank}");
        Require(layout.NumDispatchTokens == mine.Count, $"layout has {layout.NumDispatchTokens} tokens, rank {rank} dispatched {mine.Count}");
    }

    /// <summary>The same step on every rank of an in-process CPU group: this rank's results must match.</summary>
    private async Task CompareWithCpuAsync<T>(GpuCheckCase c, RankInput<T>[] inputs, T[] output, float[]? weights, EpAllToAllLayout layout, T[] combined)
        where T : unmanaged
    {
        EpConfig config = c.Config(0);
        using InProcessGroup cpu = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(30), Capacity = c.Capacity });
        DispatchResult<T>[] got = await cpu.RunAsync((l, r) => l.DispatchAsync(
            Tensor.Create(inputs[r].Tokens, [inputs[r].Count, c.Hidden]),
            Tensor.Create(inputs[r].ExpertIds, [inputs[r].Count, c.TopK]),
            inputs[r].Weights is { } w ? Tensor.Create(w, [inputs[r].Count, c.TopK]) : null,
            inputs[r].ScatterIndices is { } s ? Tensor.Create(s, [inputs[r].Count, c.TopK]) : null)).ConfigureAwait(false);
        DispatchResult<T> mineCpu = got[rank];
        RequireBitwise<T>(Flat(mineCpu.Output), output, $"rank {rank}: CUDA dispatch output vs CPU backend");
        if (mineCpu.Weights is not null)
        {
            RequireBitwise<float>(Flat(mineCpu.Weights), weights, $"rank {rank}: CUDA weights vs CPU backend");
        }

        RequireBitwise<int>(mineCpu.Layout.ScatterIndices, layout.ScatterIndices, $"rank {rank}: CUDA scatter rows vs CPU backend");
        RequireBitwise<int>(mineCpu.Layout.ExpertRowStarts, layout.ExpertRowStarts, $"rank {rank}: CUDA expert starts vs CPU backend");
        T[][] expertOut = [.. got.Select((g, r) => DeterministicExperts.ApplyToBlocks<T>(Flat(g.Output), c.Hidden, r * config.ExpertsPerRank, g.Layout.ExpertRowStarts, g.Layout.RowsPerLocalExpert))];
        Tensor<T>[] back = await cpu.RunAsync((l, r) => l.CombineAsync(Tensor.Create(expertOut[r], [got[r].Layout.RecvRows, c.Hidden]), got[r].Layout, new CombineOptions(c.Weighted))).ConfigureAwait(false);
        RequireClose(Flat(back[rank]), combined, c.TopK, $"rank {rank}: CUDA combine vs CPU backend");
    }
}

/// <summary>A check of `epa2a-tools gpu-check` failed; the message says what differed where.</summary>
internal sealed class GpuCheckFailure(string message) : Exception(message);

/// <summary>Wall time per phase of one case on one rank ("inputs 1.2 s, reference 0.8 s, ...").</summary>
internal sealed class PhaseWatch
{
    private readonly Stopwatch watch = Stopwatch.StartNew();
    private readonly List<string> laps = [];

    public void Lap(string phase)
    {
        laps.Add(string.Create(CultureInfo.InvariantCulture, $"{phase} {watch.Elapsed.TotalSeconds:0.0} s"));
        watch.Restart();
    }

    public override string ToString() => string.Join(", ", laps);
}

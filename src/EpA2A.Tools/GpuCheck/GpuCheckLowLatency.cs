using System.Diagnostics;
using System.Globalization;
using System.Numerics.Tensors;
using System.Runtime.InteropServices;
using EpA2A.Config;
using EpA2A.Cuda;
using EpA2A.Errors;
using EpA2A.Layer;
using EpA2A.LowLatency;
using EpA2A.Numerics;
using EpA2A.Reference;

namespace EpA2A.Tools.GpuCheck;

/// <summary>
/// One rank of a low-latency case of `epa2a-tools gpu-check` (groups ll2, ll4, ll8): every rank's inputs drawn from
/// the seed, the whole group's expected exchange from <see cref="ReferenceLowLatency"/> (its own FP8 quantizer), then
/// this rank's CUDA layer through the host API, the device API (outputs poisoned first, rows past RowsPerExpert must
/// stay poisoned) and CUDA graph replays of the four split phases, each checked: dispatch rows and scales bit for bit,
/// rows per expert exact, combine within one bf16 rounding. Fault cases: the last rank never sends and every other
/// rank must time out naming it, then all recover. A bad id on the device API is dropped, the step completes on every
/// rank and the rank that sent it is told.
/// </summary>
internal sealed class GpuCheckLowLatency(GpuCheckCase c, int rank, int world, string dir, int seed)
{
    private const int WarmupReplays = 20;
    private const int TimedReplays = 300;

    private readonly int h = c.Hidden;
    private readonly int k = c.TopK;

    public async Task<GpuCheckRankResult> RunAsync(NvshmemRuntime runtime)
    {
        EpConfig config = c.Config(rank);
        if (c.Local < c.World)
        {
            return Refused(config, runtime);
        }

        Random rng = new(c.Seed(seed));
        RankInput<BFloat16>[] inputs = Draw(config, rng);
        LowLatencyDispatchOptions format = c.Fp8 ? (c.PowerOfTwo ? LowLatencyDispatchOptions.Fp8PowerOfTwo : LowLatencyDispatchOptions.Fp8) : LowLatencyDispatchOptions.Bf16;
        Expected want = Expect(config, inputs);
        using EpLowLatencyLayer layer = EpLowLatencyLayer.CreateCuda(config, runtime, new EpLowLatencyOptions { StepTimeout = c.Timeout });
        string message = string.Empty;
        if (c.Fault)
        {
            message = await StayAwayOrTimeOutAsync(layer, inputs[rank]).ConfigureAwait(false) + "; recovered (collective reset), then ";
            await layer.RecoverAsync().ConfigureAwait(false);
        }

        // 1. Host API.
        RankInput<BFloat16> mine = inputs[rank];
        int n = mine.Count;
        LowLatencyDispatchResult got = await layer.DispatchAsync(
            Tensor.Create(mine.Tokens, [n, h]),
            Tensor.Create(mine.ExpertIds, [n, k]),
            mine.Weights is { } w ? Tensor.Create(w, [n, k]) : null,
            format).ConfigureAwait(false);
        CheckRows("host API", want.Mine, Flat(got.RowsPerExpert), got.Tokens is null ? null : Flat(got.Tokens), got.Fp8Tokens is null ? null : Flat(got.Fp8Tokens), got.Scales is null ? null : Flat(got.Scales), poisoned: false);
        BFloat16[] hostCombined = Flat(await layer.CombineAsync(Tensor.Create(want.ExpertRows, [config.ExpertsPerRank, config.WorldSize * config.MaxTokens, h]), got.Handle, c.Weighted).ConfigureAwait(false));
        double maxErr = RequireClose(want.Combined, hostCombined, "combine (host API) vs reference");
        if (c.Fault)
        {
            return new GpuCheckRankResult { Name = c.Name, Pass = true, Message = message + "a checked host-API step passed", RecvRows = want.Mine.RowsPerExpert.Sum(), MaxAbsError = maxErr };
        }

        // 2. Device API, outputs poisoned first.
        using DeviceBuffer<BFloat16> dx = DeviceBuffer.Allocate<BFloat16>(runtime, Math.Max(n, 1), h);
        using DeviceBuffer<int> dIds = DeviceBuffer.Allocate<int>(runtime, Math.Max(n, 1), k);
        using DeviceBuffer<float> dW = DeviceBuffer.Allocate<float>(runtime, Math.Max(n, 1), k);
        using DeviceBuffer<BFloat16> dExpert = DeviceBuffer.Allocate<BFloat16>(runtime, config.ExpertsPerRank, config.WorldSize * config.MaxTokens, h);
        DeviceTensor<BFloat16> x = Rows(dx, n, h);
        DeviceTensor<int> ids = Rows(dIds, n, k);
        DeviceTensor<float>? weights = mine.Weights is null ? null : Rows(dW, n, k);
        await Upload(runtime, dx, mine.Tokens).ConfigureAwait(false);
        await Upload(runtime, dIds, mine.ExpertIds).ConfigureAwait(false);
        if (mine.Weights is { } mw)
        {
            await Upload(runtime, dW, mw).ConfigureAwait(false);
        }

        BFloat16[] deviceCombined = await DeviceStepAsync(runtime, layer, want, x, ids, weights, format, dExpert, "device API").ConfigureAwait(false);
        RequireBitwise(hostCombined, deviceCombined, "combine (device API) vs combine (host API)");

        // 3. A bad expert id on one rank (device data: the kernels drop it, the step completes everywhere).
        if (c.BadIdRank >= 0)
        {
            message += await BadIdStepAsync(runtime, layer, config, inputs, format, x, ids, weights, dExpert, dIds).ConfigureAwait(false);
            await Upload(runtime, dIds, mine.ExpertIds).ConfigureAwait(false);
        }

        // 4. CUDA graphs of the four phases: replays checked, then timed.
        (double dispatchUs, double combineUs, string timing) = await GraphReplaysAsync(runtime, layer, want, x, ids, weights, format, dExpert, hostCombined).ConfigureAwait(false);
        message += timing;
        double rows = want.All.Sum(r => r.RowsPerExpert.Sum());
        double wire = c.Fp8 ? h + (4.0 * h / LowLatencyDispatchOptions.ScaleGroup) : 2.0 * h;
        double slots = inputs.Sum(i => i.ExpertIds.Count(e => e < config.NumExperts));
        return new GpuCheckRankResult
        {
            Name = c.Name,
            Pass = true,
            Message = message,
            RecvRows = want.Mine.RowsPerExpert.Sum(),
            MaxAbsError = maxErr,
            DispatchGpuUs = dispatchUs,
            CombineGpuUs = combineUs,
            DispatchBytes = 2 * rows * wire,
            CombineBytes = (slots * 2 * h) + (inputs.Sum(i => i.Count) * 2.0 * h) + (c.ZeroCopy ? 0 : 2 * rows * 2 * h),
        };
    }

    private static DeviceTensor<T> Rows<T>(DeviceBuffer<T> buffer, int n, int width)
        where T : unmanaged => new(buffer.Tensor.Pointer, [n, width], buffer);

    private static Task Upload<T>(NvshmemRuntime runtime, DeviceBuffer<T> buffer, T[] data)
        where T : unmanaged => data.Length == 0 ? Task.CompletedTask : DeviceCopies.UploadAsync(runtime, data, new DeviceTensor<T>(buffer.Tensor.Pointer, [data.Length], buffer));

    private static async Task<T[]> DownloadAsync<T>(NvshmemRuntime runtime, DeviceTensor<T> t)
        where T : unmanaged
    {
        T[] a = new T[t.FlattenedLength];
        await DeviceCopies.DownloadAsync(runtime, t, a).ConfigureAwait(false);
        return a;
    }

    private static T[] Flat<T>(Tensor<T> t)
    {
        T[] a = new T[(int)t.FlattenedLength];
        t.FlattenTo(a);
        return a;
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
        ReadOnlySpan<byte> a = MemoryMarshal.AsBytes(want);
        ReadOnlySpan<byte> b = MemoryMarshal.AsBytes(got);
        int i = a.CommonPrefixLength(b);
        Require(i == a.Length, $"{what}: byte {i} is 0x{(i < b.Length ? b[i] : 0):x2}, expected 0x{(i < a.Length ? a[i] : 0):x2}");
    }

    /// <summary>Every element within one bf16 rounding (an ulp of the expected value); returns the largest error.</summary>
    private static double RequireClose(BFloat16[] want, BFloat16[] got, string what)
    {
        Require(want.Length == got.Length, $"{what}: {got.Length} elements, expected {want.Length}");
        double max = 0;
        for (int i = 0; i < want.Length; i++)
        {
            float wv = want[i].ToSingle();
            float gv = got[i].ToSingle();
            Require(!float.IsNaN(gv), $"{what}: element {i} is NaN (never written?)");
            float ulp = wv == 0 ? 0 : MathF.Pow(2, MathF.ILogB(wv) - 7);
            double err = Math.Abs((double)wv - gv);
            Require(err <= ulp, $"{what}: element {i} is {gv}, expected {wv} (one rounding: {ulp})");
            max = Math.Max(max, err);
        }

        return max;
    }

    private GpuCheckRankResult Refused(EpConfig config, NvshmemRuntime runtime)
    {
        try
        {
            using EpLowLatencyLayer layer = EpLowLatencyLayer.CreateCuda(config, runtime);
        }
        catch (ArgumentException e) when (e.Message.Contains("intra-node", StringComparison.Ordinal))
        {
            return new GpuCheckRankResult { Name = c.Name, Pass = true, Message = $"refused before any allocation: {e.Message[..Math.Min(160, e.Message.Length)]}" };
        }

        throw new GpuCheckFailure($"a low-latency layer with LocalWorldSize {config.LocalWorldSize} < WorldSize {config.WorldSize} was created");
    }

    private RankInput<BFloat16>[] Draw(EpConfig config, Random rng)
    {
        int[] counts = [.. Enumerable.Range(0, world).Select(_ => rng.Next(1, c.MaxTokens + 1))];
        return RoutingGenerator.Draw<BFloat16>(config, counts, c.Drop, c.Skewed, c.Weights, rng);
    }

    /// <summary>The reference exchange of the whole group, the experts' rows of every rank, and this rank's combine.</summary>
    private Expected Expect(EpConfig config, RankInput<BFloat16>[] inputs)
    {
        ReferenceLowLatencyStep step = ReferenceLowLatency.Dispatch(config, inputs, c.Fp8, c.PowerOfTwo);
        BFloat16[][] experts = [.. step.PerRank.Select((p, d) => ExpertRows(config, p, d))];
        BFloat16[] combined = ReferenceLowLatency.Combine(config, inputs, step, experts, c.Weighted)[rank];
        return new Expected(step.PerRank, step.PerRank[rank], experts[rank], combined);
    }

    /// <summary>
    /// What the test's experts return: each received row (dequantized for FP8) times a factor of its expert, in bf16;
    /// rows past RowsPerExpert stay zero (combine must not read them).
    /// </summary>
    private BFloat16[] ExpertRows(EpConfig config, ReferenceLowLatencyRank p, int d)
    {
        int block = config.WorldSize * config.MaxTokens;
        int groups = h / LowLatencyDispatchOptions.ScaleGroup;
        BFloat16[] rows = new BFloat16[config.ExpertsPerRank * block * h];
        for (int j = 0; j < config.ExpertsPerRank; j++)
        {
            float factor = 1f + (((d * config.ExpertsPerRank) + j) % 5 * 0.25f);
            for (int r = 0; r < p.RowsPerExpert[j]; r++)
            {
                int row = (j * block) + r;
                for (int e = 0; e < h; e++)
                {
                    float v = p.Fp8Tokens is { } codes
                        ? (float)ReferenceFp8.Decode(codes[(row * h) + e]) * p.Scales![(row * groups) + (e / LowLatencyDispatchOptions.ScaleGroup)]
                        : p.Tokens![(row * h) + e].ToSingle();
                    rows[(row * h) + e] = BFloat16.FromSingle(v * factor);
                }
            }
        }

        return rows;
    }

    /// <summary>Received rows against the reference: rows per expert exact, rows and scales bit for bit, the rest untouched.</summary>
    private void CheckRows(string api, ReferenceLowLatencyRank want, int[] rows, BFloat16[]? tokens, byte[]? codes, float[]? scales, bool poisoned)
    {
        string where = $"rank {rank}, {api}";
        RequireBitwise<int>(want.RowsPerExpert, rows, $"{where}: rows per expert");
        int block = c.World * c.MaxTokens;
        int groups = h / LowLatencyDispatchOptions.ScaleGroup;
        for (int j = 0; j < rows.Length; j++)
        {
            int first = j * block;
            int used = rows[j];
            if (c.Fp8)
            {
                if (codes is null || scales is null || tokens is not null)
                {
                    throw new GpuCheckFailure($"{where}: an FP8 dispatch must return FP8 rows and scales only");
                }

                RequireBitwise<byte>(want.Fp8Tokens.AsSpan(first * h, used * h), codes.AsSpan(first * h, used * h), $"{where}: FP8 rows of local expert {j}");
                RequireBitwise<float>(want.Scales.AsSpan(first * groups, used * groups), scales.AsSpan(first * groups, used * groups), $"{where}: scales of local expert {j}");
                if (poisoned && used < block)
                {
                    Require(codes.AsSpan((first + used) * h, (block - used) * h).IndexOfAnyExcept((byte)0xFF) < 0, $"{where}: a row of local expert {j} past its {used} rows was written");
                }
            }
            else
            {
                if (tokens is null || codes is not null)
                {
                    throw new GpuCheckFailure($"{where}: a bf16 dispatch must return bf16 rows only");
                }

                RequireBitwise<BFloat16>(want.Tokens.AsSpan(first * h, used * h), tokens.AsSpan(first * h, used * h), $"{where}: rows of local expert {j}");
                if (poisoned && used < block)
                {
                    Require(MemoryMarshal.AsBytes(tokens.AsSpan((first + used) * h, (block - used) * h)).IndexOfAnyExcept((byte)0xFF) < 0, $"{where}: a row of local expert {j} past its {used} rows was written");
                }
            }
        }
    }

    private static async Task<(BFloat16[]? Tokens, byte[]? Codes, float[]? Scales, int[] Rows)> DownloadReceivedAsync(NvshmemRuntime runtime, LowLatencyDeviceDispatchResult d)
    {
        int[] rows = await DownloadAsync(runtime, d.RowsPerExpert).ConfigureAwait(false);
        BFloat16[]? tokens = d.Tokens is null ? null : await DownloadAsync(runtime, d.Tokens).ConfigureAwait(false);
        byte[]? codes = d.Fp8Tokens is null ? null : await DownloadAsync(runtime, d.Fp8Tokens).ConfigureAwait(false);
        float[]? scales = d.Scales is null ? null : await DownloadAsync(runtime, d.Scales).ConfigureAwait(false);
        return (tokens, codes, scales, rows);
    }

    /// <summary>One device-API step (poisoned outputs, synchronised reads), checked against <paramref name="want"/>; returns its combine.</summary>
    private async Task<BFloat16[]> DeviceStepAsync(
        NvshmemRuntime runtime,
        EpLowLatencyLayer layer,
        Expected want,
        DeviceTensor<BFloat16> x,
        DeviceTensor<int> ids,
        DeviceTensor<float>? weights,
        LowLatencyDispatchOptions format,
        DeviceBuffer<BFloat16> dExpert,
        string api)
    {
        await CudaLowLatencyDiagnostics.PoisonReceiveBuffersAsync(layer).ConfigureAwait(false);
        LowLatencyDeviceDispatchResult d = await layer.DispatchOnDeviceAsync(x, ids, weights, format).ConfigureAwait(false);
        await CudaLowLatencyDiagnostics.SynchronizeAsync(layer).ConfigureAwait(false);
        (BFloat16[]? tokens, byte[]? codes, float[]? scales, int[] rows) = await DownloadReceivedAsync(runtime, d).ConfigureAwait(false);
        CheckRows(api, want.Mine, rows, tokens, codes, scales, poisoned: true);

        // The experts' rows: only now (this rank's dispatch receive has completed) may the combine buffer be rewritten.
        await DeviceCopies.UploadAsync(runtime, want.ExpertRows, c.ZeroCopy ? layer.DeviceCombineBuffer : dExpert.Tensor).ConfigureAwait(false);
        DeviceTensor<BFloat16> back = await layer.CombineOnDeviceAsync(c.ZeroCopy ? null : dExpert.Tensor, d.Handle, c.Weighted).ConfigureAwait(false);
        await CudaLowLatencyDiagnostics.SynchronizeAsync(layer).ConfigureAwait(false);
        BFloat16[] combined = await DownloadAsync(runtime, back).ConfigureAwait(false);
        RequireClose(want.Combined, combined, $"rank {rank}, {api}: combine vs reference");
        return combined;
    }

    /// <summary>Rank <see cref="GpuCheckCase.BadIdRank"/> sends one id outside [0, NumExperts] from the device: it is told, once; every rank's step is the reference's with that entry dropped.</summary>
    private async Task<string> BadIdStepAsync(
        NvshmemRuntime runtime,
        EpLowLatencyLayer layer,
        EpConfig config,
        RankInput<BFloat16>[] inputs,
        LowLatencyDispatchOptions format,
        DeviceTensor<BFloat16> x,
        DeviceTensor<int> ids,
        DeviceTensor<float>? weights,
        DeviceBuffer<BFloat16> dExpert,
        DeviceBuffer<int> dIds)
    {
        RankInput<BFloat16>[] bad = [.. inputs.Select((input, r) =>
        {
            if (r != c.BadIdRank || input.Count == 0)
            {
                return input;
            }

            int[] changed = [.. input.ExpertIds];
            changed[changed.Length / 2] = config.NumExperts + 3;
            return input with { ExpertIds = changed };
        })];
        Expected want = Expect(config, bad);
        await Upload(runtime, dIds, bad[rank].ExpertIds).ConfigureAwait(false);
        int told = 0;
        string said = string.Empty;
        await CudaLowLatencyDiagnostics.PoisonReceiveBuffersAsync(layer).ConfigureAwait(false);
        LowLatencyDeviceDispatchResult d = await layer.DispatchOnDeviceAsync(x, ids, weights, format).ConfigureAwait(false);
        try
        {
            await CudaLowLatencyDiagnostics.SynchronizeAsync(layer).ConfigureAwait(false);
        }
        catch (ArgumentException e) when (e.ParamName == "expertIds")
        {
            told++;
            said = e.Message;
        }

        (BFloat16[]? tokens, byte[]? codes, float[]? scales, int[] rows) = await DownloadReceivedAsync(runtime, d).ConfigureAwait(false);
        CheckRows("device API, bad id", want.Mine, rows, tokens, codes, scales, poisoned: true);
        await DeviceCopies.UploadAsync(runtime, want.ExpertRows, c.ZeroCopy ? layer.DeviceCombineBuffer : dExpert.Tensor).ConfigureAwait(false);
        DeviceTensor<BFloat16> back;
        try
        {
            back = await layer.CombineOnDeviceAsync(c.ZeroCopy ? null : dExpert.Tensor, d.Handle, c.Weighted).ConfigureAwait(false);
        }
        catch (ArgumentException e) when (e.ParamName == "expertIds")
        {
            // Reported after the combine was enqueued: the step completed; its output is where the layer keeps it.
            told++;
            said = e.Message;
            back = CudaLowLatencyDiagnostics.CombineOutput(layer, inputs[rank].Count);
        }

        await CudaLowLatencyDiagnostics.SynchronizeAsync(layer).ConfigureAwait(false);
        RequireClose(want.Combined, await DownloadAsync(runtime, back).ConfigureAwait(false), $"rank {rank}: combine with a dropped entry vs reference");
        int expected = rank == c.BadIdRank ? 1 : 0;
        Require(told == expected, $"rank {rank} was told of a bad expert id {told} times, expected {expected} ({said})");
        Require(expected == 0 || said.Contains("expertIds[", StringComparison.Ordinal), $"the message does not say which entry: {said}");
        return rank == c.BadIdRank ? $"bad id reported: {said[..Math.Min(140, said.Length)]}; " : "a peer's bad id dropped, step complete; ";
    }

    /// <summary>Replays of the four captured phases: three checked (outputs poisoned first), then timed ones after a device barrier each.</summary>
    private async Task<(double DispatchUs, double CombineUs, string Message)> GraphReplaysAsync(
        NvshmemRuntime runtime,
        EpLowLatencyLayer layer,
        Expected want,
        DeviceTensor<BFloat16> x,
        DeviceTensor<int> ids,
        DeviceTensor<float>? weights,
        LowLatencyDispatchOptions format,
        DeviceBuffer<BFloat16> dExpert,
        BFloat16[] combined)
    {
        using EpLowLatencyGraph graph = await EpLowLatencyGraph.CaptureAsync(layer, x, ids, weights, format, c.ZeroCopy ? null : dExpert.Tensor, c.Weighted).ConfigureAwait(false);
        await DeviceCopies.UploadAsync(runtime, want.ExpertRows, c.ZeroCopy ? layer.DeviceCombineBuffer : dExpert.Tensor).ConfigureAwait(false);
        for (int i = 0; i < 3; i++)
        {
            await CudaLowLatencyDiagnostics.PoisonReceiveBuffersAsync(layer).ConfigureAwait(false);
            _ = await graph.ReplayStepAsync().ConfigureAwait(false);
            (BFloat16[]? tokens, byte[]? codes, float[]? scales, int[] rows) = await DownloadReceivedAsync(runtime, graph.Dispatch).ConfigureAwait(false);
            CheckRows($"graph replay {i}", want.Mine, rows, tokens, codes, scales, poisoned: true);
            BFloat16[] replayed = await DownloadAsync(runtime, graph.CombineOutput).ConfigureAwait(false);
            RequireBitwise<BFloat16>(combined, replayed, $"rank {rank}: graph replay {i} combine vs the host API's");
        }

        GC.Collect(2, GCCollectionMode.Forced, blocking: true, compacting: true);
        GC.WaitForPendingFinalizers();
        List<double> dispatch = [], combine = [];
        for (int i = 0; i < WarmupReplays + TimedReplays; i++)
        {
            LowLatencyGraphReplay r = await graph.ReplayStepAsync().ConfigureAwait(false);
            if (i >= WarmupReplays)
            {
                dispatch.Add(r.Dispatch.TotalMicroseconds);
                combine.Add(r.Combine.TotalMicroseconds);
            }
        }

        BFloat16[] last = await DownloadAsync(runtime, graph.CombineOutput).ConfigureAwait(false);
        RequireBitwise<BFloat16>(combined, last, $"rank {rank}: the last timed replay's combine vs the host API's");
        static double Q(List<double> v, double q) => v.Order().ElementAt((int)Math.Round(q * (v.Count - 1)));
        string timing = string.Create(CultureInfo.InvariantCulture, $"graph replays: dispatch median {Q(dispatch, 0.5):0.0} us p99 {Q(dispatch, 0.99):0.0}, combine median {Q(combine, 0.5):0.0} us p99 {Q(combine, 0.99):0.0} ({TimedReplays} replays)");

        // The one-kernel forms (send and receive in one launch) leave the same rows and combine.
        graph.Dispose();
        using EpLowLatencyGraph single = await EpLowLatencyGraph.CaptureAsync(layer, x, ids, weights, format, c.ZeroCopy ? null : dExpert.Tensor, c.Weighted, oneKernel: true).ConfigureAwait(false);
        List<double> oneDispatch = [], oneCombine = [];
        for (int i = 0; i < 3 + WarmupReplays + TimedReplays; i++)
        {
            if (i < 3)
            {
                await CudaLowLatencyDiagnostics.PoisonReceiveBuffersAsync(layer).ConfigureAwait(false);
            }

            LowLatencyGraphReplay r = await single.ReplayStepAsync().ConfigureAwait(false);
            if (i < 3)
            {
                (BFloat16[]? tokens, byte[]? codes, float[]? scales, int[] rows) = await DownloadReceivedAsync(runtime, single.Dispatch).ConfigureAwait(false);
                CheckRows($"one-kernel graph replay {i}", want.Mine, rows, tokens, codes, scales, poisoned: true);
                BFloat16[] replayed = await DownloadAsync(runtime, single.CombineOutput).ConfigureAwait(false);
                RequireBitwise<BFloat16>(combined, replayed, $"rank {rank}: one-kernel graph replay {i} combine vs the host API's");
            }
            else if (i >= 3 + WarmupReplays)
            {
                oneDispatch.Add(r.Dispatch.TotalMicroseconds);
                oneCombine.Add(r.Combine.TotalMicroseconds);
            }
        }

        timing += string.Create(CultureInfo.InvariantCulture, $"; one kernel a phase: dispatch median {Q(oneDispatch, 0.5):0.0} us p99 {Q(oneDispatch, 0.99):0.0}, combine median {Q(oneCombine, 0.5):0.0} us p99 {Q(oneCombine, 0.99):0.0}");
        return (Q(dispatch, 0.5), Q(combine, 0.5), timing);
    }

    /// <summary>The fault case: the last rank never sends; every other rank must time out within the deadline naming it.</summary>
    private async Task<string> StayAwayOrTimeOutAsync(EpLowLatencyLayer layer, RankInput<BFloat16> mine)
    {
        int late = world - 1;
        string Flag(int r) => Path.Combine(dir, $"llfault_{c.Seed(seed)}_{r}");
        if (rank == late)
        {
            Stopwatch wait = Stopwatch.StartNew();
            for (int r = 0; r < late; r++)
            {
                while (!File.Exists(Flag(r)))
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
            _ = await layer.DispatchAsync(Tensor.Create(mine.Tokens, [mine.Count, h]), Tensor.Create(mine.ExpertIds, [mine.Count, k])).ConfigureAwait(false);
            throw new GpuCheckFailure($"dispatch succeeded although rank {late} never sent");
        }
        catch (EpStepTimeoutException e)
        {
            double ms = sw.Elapsed.TotalMilliseconds;
            Require(e.Rank == late, $"the timeout names rank {e.Rank?.ToString(CultureInfo.InvariantCulture) ?? "none"}, not rank {late}: {e.Message}");
            Require(e.Message.Contains($"rank {late}", StringComparison.Ordinal), $"the message does not name rank {late}: {e.Message}");
            Require(ms < c.Timeout.TotalMilliseconds + 1500, $"the timeout took {ms:0} ms (deadline {c.Timeout.TotalMilliseconds:0} ms)");
            message = string.Create(CultureInfo.InvariantCulture, $"timed out in {ms:0} ms naming rank {e.Rank}: {e.Message[..Math.Min(200, e.Message.Length)]}");
        }

        await File.WriteAllTextAsync(Flag(rank), "1").ConfigureAwait(false);
        return message;
    }

    /// <summary>The reference's view: every destination's rows, this rank's, its experts' rows and its combine.</summary>
    private sealed record Expected(ReferenceLowLatencyRank[] All, ReferenceLowLatencyRank Mine, BFloat16[] ExpertRows, BFloat16[] Combined);
}

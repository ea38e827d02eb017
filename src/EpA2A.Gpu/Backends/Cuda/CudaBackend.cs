using System.Runtime.InteropServices;
using EpA2A.Config;
using EpA2A.Layer;
using EpA2A.Telemetry;
using static EpA2A.Backends.Cuda.NativeMethods;

namespace EpA2A.Backends.Cuda;

/// <summary>
/// The CUDA + NVSHMEM backend: each phase of the layer's flow is a libepa2a call on the process's
/// <see cref="GpuWorker"/>. Copy-in uploads host inputs into device staging sized for MaxTokens (allocated once);
/// preprocess launches the counting kernels and polls the pinned receive sizes with the operation's deadline;
/// growth is libepa2a's collective grow; the dispatch kernel sends, finishes and (host path) downloads rows,
/// weights, scatter rows and row origins; combine runs on the device and rounds there. A cancelled or expired
/// operation aborts the layer's device waits. After a failed step (timeout, abort) the layer refuses new steps
/// until every rank has called <see cref="RecoverAsync"/> together (libepa2a's collective reset).
/// </summary>
internal sealed partial class CudaBackend : IDispatchCombineBackend, IDeviceDispatchCombineBackend, IGraphCaptureBackend
{
    /// <summary>The host poll of receive sizes ends this long after the step deadline, so a device wait (which names the peer) reports first.</summary>
    private const long HostPollGraceNs = 100_000_000;

    private const int EvPrepareStart = 0;
    private const int EvPrepareEnd = 1;
    private const int EvSendStart = 2;
    private const int EvFinishEnd = 3;
    private const int EvCombineStart = 4;
    private const int EvCombineEnd = 5;

    private readonly EpConfig config;
    private readonly GpuWorker worker;
    private readonly IGpuPhaseObserver? gpuObserver;
    private readonly string? layerName;
    private readonly bool fixedCapacity;
    private readonly bool callerThread;
    private readonly int device;

    /// <summary>The CUDA device selected on this thread for caller-thread calls, plus one (0: none yet).</summary>
    [ThreadStatic]
    private static int threadDevice;
    private readonly CudaStreamHandle stream;
    private readonly CudaEventHandle[] events;
    private readonly DeviceMemoryHandle stagedTokens;
    private readonly DeviceMemoryHandle stagedIds;
    private readonly DeviceMemoryHandle stagedWeights;
    private readonly DeviceMemoryHandle stagedScatter;
    private readonly DeviceMemoryHandle combined;
    private readonly CudaLayerHandle layer;
    private NativeLayerBuffers buffers;
    private volatile bool needsRecovery;
    private bool combineReady;
    private bool stepTimed;
    private int abortRequested;
    private ArgumentException? pendingInputError;
    private bool disposed;

    private CudaBackend(EpConfig config, NvshmemRuntime runtime, EpLayerOptions options)
    {
        this.config = config;
        worker = runtime.Worker;
        gpuObserver = options.Observer as IGpuPhaseObserver;
        layerName = options.LayerName;
        fixedCapacity = options.FixedCapacity;
        callerThread = options.DeviceCallsOnCallerThread;
        device = runtime.Device;
        NativeLibraryVersion.EnsureCompatible();
        long rowBytes = (long)config.Hidden * config.TokenBytes;
        long slots = (long)config.MaxTokens * config.TopK;

        // Everything local first: a rank that fails here must not leave its peers holding a collective layer.
        List<GpuHandle> made = [];
        try
        {
            stream = Keep(made, CudaStreamHandle.Create(worker));
            events = [.. Enumerable.Range(0, 6).Select(_ => Keep(made, CudaEventHandle.Create(worker)))];
            stagedTokens = Keep(made, DeviceMemoryHandle.Allocate(worker, config.MaxTokens * rowBytes));
            stagedIds = Keep(made, DeviceMemoryHandle.Allocate(worker, slots * 4));
            stagedWeights = Keep(made, DeviceMemoryHandle.Allocate(worker, slots * 4));
            stagedScatter = Keep(made, DeviceMemoryHandle.Allocate(worker, slots * 4));
            combined = Keep(made, DeviceMemoryHandle.Allocate(worker, config.MaxTokens * rowBytes));
            NativeLayerConfig native = new()
            {
                TimeoutNs = options.StepTimeout.Ticks * 100,
                MaxTokens = config.MaxTokens,
                Hidden = config.Hidden,
                TopK = config.TopK,
                NumExperts = config.NumExperts,
                Rank = config.Rank,
                WorldSize = config.WorldSize,
                LocalWorldSize = config.LocalWorldSize,
                TokenBytes = config.TokenBytes,
                TokenType = (int)config.TokenType,
                NumSms = config.NumSms,
                EnableLocalCombine = config.EnableLocalCombine ? 1 : 0,
                ExpertAlignment = config.ExpertAlignment,
                Capacity = options.Capacity,
                Flags = options.FixedCapacity ? (int)NativeLayerFlags.FixedCapacity : 0,
            };
            layer = CudaLayerHandle.Create(worker, native);
        }
        catch
        {
            foreach (GpuHandle h in made)
            {
                h.Dispose();
            }

            throw;
        }

        Check(epa2a_layer_get_buffers(layer.Pointer, out buffers), "epa2a_layer_get_buffers");
    }

    public string Name => "cuda";

    public nint DeviceOutput => buffers.Output;

    public nint DeviceWeights => buffers.Weights;

    public int OutputRows => buffers.OutputRows;

    /// <summary>Creates the layer's device state on the worker (collective: every rank calls it together).</summary>
    public static CudaBackend Create(EpConfig config, NvshmemRuntime runtime, EpLayerOptions options)
    {
        runtime.ThrowIfDisposed();
        return runtime.Worker.Run(() => new CudaBackend(config, runtime, options));
    }

    public async ValueTask CopyInAsync(DispatchStep step)
    {
        ThrowIfUnusable();
        if (step.Inputs is not DispatchInputs.Host host)
        {
            return; // the kernels read the caller's device buffers directly
        }

        int n = host.TokenCount;
        int slots = n * config.TopK;
        await OnWorkerAsync(step.Operation, () =>
        {
            Upload(stagedTokens.Pointer, host.Tokens.AsSpan(0, n * RowBytes));
            Upload(stagedIds.Pointer, MemoryMarshal.AsBytes(host.ExpertIds.AsSpan(0, slots)));
            if (host.Weights is { } w)
            {
                Upload(stagedWeights.Pointer, MemoryMarshal.AsBytes(w.AsSpan(0, slots)));
            }

            if (host.ScatterIndices is { } s)
            {
                Upload(stagedScatter.Pointer, MemoryMarshal.AsBytes(s.AsSpan(0, slots)));
            }

            Check(epa2a_stream_sync(stream.Pointer), "epa2a_stream_sync");
            return true;
        }).ConfigureAwait(false);
    }

    public async ValueTask<ExchangedCounts> ExchangeCountsAsync(DispatchStep step)
    {
        ThrowIfUnusable();
        OperationContext op = step.Operation;
        ThrowIfCancelledBeforeStart(op);
        combineReady = false;
        pendingInputError = null;
        DispatchInputs.Device inputs = step.Inputs as DispatchInputs.Device ?? new DispatchInputs.Device(
            step.TokenCount,
            stagedTokens.Pointer,
            stagedIds.Pointer,
            step.Inputs.HasWeights ? stagedWeights.Pointer : 0,
            step.Inputs.HasScatterIndices ? stagedScatter.Pointer : 0);
        int n = step.TokenCount;
        IRoutingPlan plan = await OnWorkerAsync(op, () =>
        {
            stepTimed = TimeOnGpu;
            RecordIfTimed(EvPrepareStart);
            Check(epa2a_dispatch_prepare(layer.Pointer, inputs.Tokens, inputs.ExpertIds, inputs.Weights, inputs.ScatterIndices, n, stream.Pointer), "epa2a_dispatch_prepare");
            RecordIfTimed(EvPrepareEnd);
            long remainingNs = Math.Max(1, op.Remaining.Ticks * 100);
            int status = epa2a_dispatch_wait_sizes(layer.Pointer, remainingNs + HostPollGraceNs, out _);
            if (status is (int)NativeCode.BadExpertId or (int)NativeCode.BadScatterIndex)
            {
                // The bad entries were dropped and every rank is sized: finish the step with the others (so no
                // peer waits for this rank), then report the input error.
                pendingInputError = InputError(new NativeCallException("epa2a_dispatch_wait_sizes", (NativeCode)status, LastError()));
            }
            else
            {
                Check(status, "epa2a_dispatch_wait_sizes");
            }

            int w = config.WorldSize;
            int epr = config.ExpertsPerRank;
            int[] recv = new int[w];
            int[] tokens = new int[w];
            int[] rows = new int[epr];
            int[] padded = new int[epr];
            int[] starts = new int[epr];
            unsafe
            {
                fixed (int* pr = recv, pt = tokens, pe = rows, pp = padded, ps = starts)
                {
                    Check(epa2a_dispatch_get_layout(layer.Pointer, pr, pt, pe, pp, ps), "epa2a_dispatch_get_layout");
                }
            }

            return (IRoutingPlan)new DeviceRoutingPlan(config, recv, tokens, rows, starts);
        }).ConfigureAwait(false);

        // The symmetric buffers have one size on every rank.
        return new ExchangedCounts(plan, buffers.OutputRows);
    }

    /// <summary>libepa2a's collective grow to the rows the layer's growth policy chose (the same on every rank).</summary>
    public async ValueTask GrowOutputAsync(DispatchStep step, int rows)
    {
        if (rows <= buffers.OutputRows)
        {
            return;
        }

        await OnWorkerAsync(step.Operation, () =>
        {
            Check(epa2a_layer_grow_output(layer.Pointer, rows), "epa2a_layer_grow_output");
            Check(epa2a_layer_get_buffers(layer.Pointer, out buffers), "epa2a_layer_get_buffers");
            return true;
        }, callerThreadAllowed: false).ConfigureAwait(false); // NVSHMEM host collectives stay on the thread that initialized it
    }

    public async ValueTask<DispatchedRows> DispatchTokensAsync(DispatchStep step, IRoutingPlan plan)
    {
        int recv = plan.RecvRows(config.Rank);
        int slots = step.TokenCount * config.TopK;
        bool host = step.Inputs is DispatchInputs.Host;
        DispatchedRows dispatched = await OnWorkerAsync(step.Operation, () =>
        {
            RecordIfTimed(EvSendStart);
            Check(epa2a_dispatch_send(layer.Pointer, stream.Pointer), "epa2a_dispatch_send");
            Check(epa2a_dispatch_finish(layer.Pointer, stream.Pointer), "epa2a_dispatch_finish");
            RecordIfTimed(EvFinishEnd);
            Check(epa2a_layer_sync(layer.Pointer, stream.Pointer), "epa2a_layer_sync");
            ReportDispatchGpuTimes(step.TokenCount);
            if (!host)
            {
                return new DispatchedRows([], new RowOrigins(0));
            }

            Download(MemoryMarshal.CreateSpan(ref MemoryMarshal.GetArrayDataReference(step.Context.OutputBuffer), recv * RowBytes), buffers.Output);
            if (step.Inputs.HasWeights)
            {
                Download(MemoryMarshal.AsBytes(step.Context.WeightBuffer.AsSpan(0, recv)), buffers.Weights);
            }

            int[] origin = new int[recv * 4];
            Download(MemoryMarshal.AsBytes(origin.AsSpan()), buffers.RowOrigin);
            int[] global = new int[slots];
            Download(MemoryMarshal.AsBytes(global.AsSpan()), buffers.ScatterRows);
            RowOrigins o = new(recv);
            for (int r = 0; r < recv; r++)
            {
                o.Source[r] = origin[4 * r];
                o.Token[r] = origin[(4 * r) + 1];
                o.K[r] = origin[(4 * r) + 2];
            }

            return new DispatchedRows(global, o);
        }).ConfigureAwait(false);

        combineReady = true;
        if (pendingInputError is { } bad)
        {
            pendingInputError = null;
            throw bad;
        }

        return dispatched;
    }

    public async ValueTask CopyInAsync(CombineStep step)
    {
        ThrowIfUnusable();
        ThrowIfCancelledBeforeStart(step.Operation);
        if (!combineReady)
        {
            throw new InvalidOperationException(
                $"rank {config.Rank}: the CUDA backend runs one combine per dispatch (libepa2a keeps the dispatch's routing on the device until its combine); dispatch again before the next combine");
        }

        if (step.Inputs is not CombineInputs.Host host)
        {
            return; // epa2a_combine copies the caller's rows in on the stream
        }

        int bytes = step.Layout.RecvRows * RowBytes;
        await OnWorkerAsync(step.Operation, () =>
        {
            Upload(buffers.Output, host.ExpertOutput.AsSpan(0, bytes));
            Check(epa2a_stream_sync(stream.Pointer), "epa2a_stream_sync");
            return true;
        }).ConfigureAwait(false);
    }

    public async ValueTask<CombinedRows> CombineWithinNodeAsync(CombineStep step)
    {
        int n = step.Layout.NumDispatchTokens;
        nint deviceRows = step.Inputs is CombineInputs.Device device ? device.ExpertOutput : 0; // 0: the rows copy-in uploaded
        combineReady = false; // consumed even if it fails: libepa2a leaves the dispatch state behind
        return await OnWorkerAsync(step.Operation, () =>
        {
            stepTimed = TimeOnGpu;
            RecordIfTimed(EvCombineStart);
            Check(epa2a_combine(layer.Pointer, deviceRows, combined.Pointer, step.Weighted ? 1 : 0, stream.Pointer), "epa2a_combine");
            RecordIfTimed(EvCombineEnd);
            Check(epa2a_layer_sync(layer.Pointer, stream.Pointer), "epa2a_layer_sync");
            ReportGpuTime(Phase.CombineKernel, EvCombineStart, EvCombineEnd, n);
            if (deviceRows != 0)
            {
                return (CombinedRows)new CombinedRows.Device(combined.Pointer);
            }

            byte[] result = new byte[n * RowBytes];
            Download(result, combined.Pointer);
            return new CombinedRows.HostRounded(result);
        }).ConfigureAwait(false);
    }

    /// <summary>libepa2a's combine already summed across nodes (proxy partials) and rounded once.</summary>
    public ValueTask<CombinedRows> CombineAcrossNodesAsync(CombineStep step, CombinedRows withinNode) => ValueTask.FromResult(withinNode);

    public async ValueTask BarrierAsync(OperationContext operation, bool intraNodeOnly)
    {
        ThrowIfUnusable();
        ThrowIfCancelledBeforeStart(operation);
        await OnWorkerAsync(operation, () =>
        {
            Check(epa2a_layer_barrier(layer.Pointer, intraNodeOnly ? 1 : 0, stream.Pointer), "epa2a_layer_barrier");
            Check(epa2a_layer_sync(layer.Pointer, stream.Pointer), "epa2a_layer_sync");
            return true;
        }).ConfigureAwait(false);
    }

    /// <summary>Operations are ordered by libepa2a's own epochs: nothing to drop per operation.</summary>
    public void Reset(long epoch, long sequence)
    {
    }

    /// <summary>
    /// libepa2a's collective reset: waits for every rank's kernels to end, clears signals, status and the abort
    /// flag everywhere. Every rank of the group must call it (its barriers have the collective deadline: a rank missing there fails the others, naming it).
    /// </summary>
    public async ValueTask RecoverAsync()
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        await worker.RunAsync(() => Check(epa2a_layer_reset(layer.Pointer), "epa2a_layer_reset")).ConfigureAwait(false);
        Volatile.Write(ref abortRequested, 0);
        needsRecovery = false;
        combineReady = false;
        pendingInputError = null;
    }

    /// <summary>Fills the receive buffers (device output rows and weights, and their host copies) with NaN bytes.</summary>
    public async Task PoisonReceiveBuffersAsync(DispatchCombineContext context)
    {
        ThrowIfUnusable();
        MemoryMarshal.CreateSpan(ref MemoryMarshal.GetArrayDataReference(context.OutputBuffer), context.OutputBuffer.Length * config.TokenBytes).Fill(0xFF);
        context.WeightBuffer.AsSpan().Fill(float.NaN);
        await worker.RunAsync(() =>
        {
            Check(epa2a_memset_async(buffers.Output, 0xFF, (nuint)((long)buffers.OutputRows * RowBytes), stream.Pointer), "epa2a_memset_async");
            Check(epa2a_memset_async(buffers.Weights, 0xFF, (nuint)((long)buffers.OutputRows * 4), stream.Pointer), "epa2a_memset_async");
            Check(epa2a_stream_sync(stream.Pointer), "epa2a_stream_sync");
        }).ConfigureAwait(false);
    }

    public async ValueTask<CapturedStep> CaptureAsync(DispatchInputs.Device inputs, nint expertOutput, bool weighted, OperationContext operation)
    {
        ThrowIfUnusable();
        combineReady = false;
        return await OnWorkerAsync(operation, () =>
        {
            nint dispatchGraph = 0;
            nint combineGraph = 0;
            try
            {
                dispatchGraph = Capture(() => epa2a_dispatch_enqueue(layer.Pointer, inputs.Tokens, inputs.ExpertIds, inputs.Weights, inputs.ScatterIndices, inputs.TokenCount, stream.Pointer), "epa2a_dispatch_enqueue");
                combineGraph = Capture(() => epa2a_combine(layer.Pointer, expertOutput, combined.Pointer, weighted ? 1 : 0, stream.Pointer), "epa2a_combine");
                return new CapturedStep(dispatchGraph, combineGraph, combined.Pointer);
            }
            catch
            {
                _ = epa2a_graph_destroy(dispatchGraph);
                _ = epa2a_graph_destroy(combineGraph);
                throw;
            }
        }).ConfigureAwait(false);
    }

    public async ValueTask<GraphReplay> ReplayAsync(CapturedStep step, bool dispatch, bool combine, OperationContext operation)
    {
        ThrowIfUnusable();
        ThrowIfCancelledBeforeStart(operation);
        return await OnWorkerAsync(operation, () =>
        {
            // A layer barrier on the device first, enqueued with the graphs (no host wait in between): every rank's
            // graphs start when the last rank's barrier kernel runs, so the times below are the kernels', not the
            // skew between the ranks' host threads.
            Check(epa2a_layer_barrier(layer.Pointer, 0, stream.Pointer), "epa2a_layer_barrier");
            Record(EvSendStart);
            if (dispatch)
            {
                Check(epa2a_graph_launch(step.DispatchGraph, stream.Pointer), "epa2a_graph_launch");
            }

            Record(EvFinishEnd);
            if (combine)
            {
                Check(epa2a_graph_launch(step.CombineGraph, stream.Pointer), "epa2a_graph_launch");
            }

            Record(EvCombineEnd);
            Check(epa2a_layer_sync(layer.Pointer, stream.Pointer), "epa2a_layer_sync");
            int[] recv = new int[config.WorldSize];
            unsafe
            {
                fixed (int* pr = recv)
                {
                    Check(epa2a_dispatch_get_layout(layer.Pointer, pr, null, null, null, null), "epa2a_dispatch_get_layout");
                }
            }

            Check(epa2a_event_elapsed_ms(events[EvSendStart].Pointer, events[EvFinishEnd].Pointer, out float d), "epa2a_event_elapsed_ms");
            Check(epa2a_event_elapsed_ms(events[EvFinishEnd].Pointer, events[EvCombineEnd].Pointer, out float c), "epa2a_event_elapsed_ms");
            return new GraphReplay(recv[config.Rank], TimeSpan.FromTicks((long)(d * TimeSpan.TicksPerMillisecond)), TimeSpan.FromTicks((long)(c * TimeSpan.TicksPerMillisecond)));
        }).ConfigureAwait(false);
    }

    /// <summary>The diagnostics baseline: a step by direct libepa2a calls on the worker, timed there (see CudaLayerDiagnostics).</summary>
    public Task<(TimeSpan Dispatch, TimeSpan Combine)> DirectStepAsync(nint tokens, nint ids, int n, TimeSpan timeout)
    {
        ThrowIfUnusable();
        combineReady = false;
        long timeoutNs = timeout.Ticks * 100;
        return worker.RunAsync(() =>
        {
            Check(epa2a_layer_barrier(layer.Pointer, 0, stream.Pointer), "epa2a_layer_barrier");
            Check(epa2a_layer_sync(layer.Pointer, stream.Pointer), "epa2a_layer_sync");
            int[] recv = new int[config.WorldSize];
            long t0 = System.Diagnostics.Stopwatch.GetTimestamp();
            Check(epa2a_dispatch_prepare(layer.Pointer, tokens, ids, 0, 0, n, stream.Pointer), "epa2a_dispatch_prepare");
            Check(epa2a_dispatch_wait_sizes(layer.Pointer, timeoutNs, out int max), "epa2a_dispatch_wait_sizes");
            if (max > buffers.OutputRows)
            {
                Check(epa2a_layer_grow_output(layer.Pointer, max), "epa2a_layer_grow_output");
                Check(epa2a_layer_get_buffers(layer.Pointer, out buffers), "epa2a_layer_get_buffers");
            }

            unsafe
            {
                fixed (int* pr = recv)
                {
                    Check(epa2a_dispatch_get_layout(layer.Pointer, pr, null, null, null, null), "epa2a_dispatch_get_layout");
                }
            }

            Check(epa2a_dispatch_send(layer.Pointer, stream.Pointer), "epa2a_dispatch_send");
            Check(epa2a_dispatch_finish(layer.Pointer, stream.Pointer), "epa2a_dispatch_finish");
            Check(epa2a_layer_sync(layer.Pointer, stream.Pointer), "epa2a_layer_sync");
            long t1 = System.Diagnostics.Stopwatch.GetTimestamp();
            Check(epa2a_combine(layer.Pointer, 0, combined.Pointer, 0, stream.Pointer), "epa2a_combine");
            Check(epa2a_layer_sync(layer.Pointer, stream.Pointer), "epa2a_layer_sync");
            long t2 = System.Diagnostics.Stopwatch.GetTimestamp();
            return (System.Diagnostics.Stopwatch.GetElapsedTime(t0, t1), System.Diagnostics.Stopwatch.GetElapsedTime(t1, t2));
        });
    }

    public void Release(CapturedStep step)
    {
        _ = worker.Post(() =>
        {
            _ = epa2a_graph_destroy(step.DispatchGraph);
            _ = epa2a_graph_destroy(step.CombineGraph);
        });
    }

    /// <summary>Collective: every rank disposes its layer together (libepa2a's destroy is an NVSHMEM barrier).</summary>
    public void Dispose()
    {
        if (disposed)
        {
            return;
        }

        disposed = true;
        layer.MarkCollectiveRelease();
        layer.Dispose();
        foreach (GpuHandle h in new GpuHandle[] { stagedTokens, stagedIds, stagedWeights, stagedScatter, combined })
        {
            h.Dispose();
        }

        foreach (CudaEventHandle e in events)
        {
            e.Dispose();
        }

        stream.Dispose();
    }

    private int RowBytes => config.Hidden * config.TokenBytes;

    private static T Keep<T>(List<GpuHandle> made, T handle)
        where T : GpuHandle
    {
        made.Add(handle);
        return handle;
    }

    private void ThrowIfUnusable()
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        if (needsRecovery)
        {
            throw new InvalidOperationException(
                $"rank {config.Rank}: an earlier step failed on the device; every rank must call RecoverAsync together before the next step");
        }
    }

    /// <summary>On the worker: captures what <paramref name="enqueue"/> puts on the stream; ends the capture on failure too.</summary>
    private nint Capture(Func<int> enqueue, string call)
    {
        Check(epa2a_graph_begin(stream.Pointer), "epa2a_graph_begin");
        int status = enqueue();
        string error = status == 0 ? string.Empty : LastError();
        int ended = epa2a_graph_end(stream.Pointer, out nint graph);
        if (status != 0)
        {
            _ = epa2a_graph_destroy(graph);
            throw new NativeCallException(call, (NativeCode)status, error);
        }

        Check(ended, "epa2a_graph_end");
        return graph;
    }

    /// <summary>The kernels are timed when an observer wants GPU times or the GPU-duration metric is listened to.</summary>
    private bool TimeOnGpu => gpuObserver?.WantsGpuTimes == true || EpTelemetry.PhaseGpuDuration.Enabled;

    /// <summary>Records the event when this dispatch or combine is timed (decided once at its start).</summary>
    private void RecordIfTimed(int ev)
    {
        if (stepTimed)
        {
            Record(ev);
        }
    }

    private void Record(int ev) => Check(epa2a_event_record(events[ev].Pointer, stream.Pointer), "epa2a_event_record");

    private void ReportDispatchGpuTimes(int tokens)
    {
        ReportGpuTime(Phase.DispatchPreprocess, EvPrepareStart, EvPrepareEnd, tokens);
        ReportGpuTime(Phase.DispatchOutputSizeWait, EvPrepareEnd, EvSendStart, tokens);
        ReportGpuTime(Phase.DispatchKernel, EvSendStart, EvFinishEnd, tokens);
    }

    private void ReportGpuTime(Phase phase, int from, int to, int tokens)
    {
        if (!stepTimed)
        {
            return;
        }

        Check(epa2a_event_elapsed_ms(events[from].Pointer, events[to].Pointer, out float ms), "epa2a_event_elapsed_ms");
        TimeSpan gpu = TimeSpan.FromTicks((long)(ms * TimeSpan.TicksPerMillisecond));
        EpTelemetry.RecordGpuPhase(config.Rank, layerName, Name, phase, gpu);
        gpuObserver?.OnGpuPhase(config.Rank, phase, gpu, tokens);
    }

    private unsafe void Upload(nint device, ReadOnlySpan<byte> host)
    {
        if (host.IsEmpty)
        {
            return;
        }

        fixed (byte* p = host)
        {
            Check(epa2a_memcpy_async(device, (nint)p, (nuint)host.Length, stream.Pointer), "epa2a_memcpy_async");

            // The copy reads pageable memory that stays pinned only inside this block.
            Check(epa2a_stream_sync(stream.Pointer), "epa2a_stream_sync");
        }
    }

    private unsafe void Download(Span<byte> host, nint device)
    {
        if (host.IsEmpty)
        {
            return;
        }

        fixed (byte* p = host)
        {
            Check(epa2a_memcpy_async((nint)p, device, (nuint)host.Length, stream.Pointer), "epa2a_memcpy_async");
            Check(epa2a_stream_sync(stream.Pointer), "epa2a_stream_sync");
        }
    }
}

using System.Runtime.InteropServices;
using EpA2A.Cuda;
using EpA2A.Layer;
using EpA2A.Telemetry;
using static EpA2A.Backends.Cuda.NativeMethods;

namespace EpA2A.Backends.Cuda;

/// <summary>The phases of the layer's flow, each a libepa2a call on the worker, and their GPU timing.</summary>
internal sealed partial class CudaBackend
{
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
            Upload(stagedTokens.Pointer, host.Tokens.Span[..(n * RowBytes)]);
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

    /// <summary>
    /// This rank rejected its input: it still takes its part in the step's first exchange, as a rejection, so that every
    /// peer fails at once naming it (libepa2a: a dispatch joins the counts exchange with -1 tokens; a combine marks the
    /// rejection on every rank before its combine barrier). Only enqueues: the caller gets its
    /// <see cref="ArgumentException"/> at once, and the kernels wait for the peers on the stream with the layer's
    /// deadline. A combine with no dispatch before it tells nobody (the peers are not in a combine either).
    /// </summary>
    public async ValueTask RejectAsync(OperationContext operation, bool dispatch, string reason)
    {
        ThrowIfUnusable();
        if (!dispatch && !combineReady)
        {
            return;
        }

        combineReady = false;
        pendingInputError = null;
        await OnWorkerAsync(operation, () =>
        {
            Check(dispatch ? epa2a_dispatch_reject(layer.Pointer, stream.Pointer) : epa2a_combine_reject(layer.Pointer, stream.Pointer), dispatch ? "epa2a_dispatch_reject" : "epa2a_combine_reject");
            return true;
        }).ConfigureAwait(false);

        // Fixed capacity: the peers' rejection record is fatal (no host stood between their kernels), so they recover
        // collectively, and this rank must join them.
        needsRecovery |= dispatch && fixedCapacity;
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
}

using EpA2A.Cuda;
using EpA2A.Errors;
using EpA2A.Layer;
using static EpA2A.Backends.Cuda.NativeMethods;

namespace EpA2A.Backends.Cuda;

/// <summary>How native failures become the layer's exceptions, and how cancellation reaches the device.</summary>
internal sealed partial class CudaBackend
{
    /// <summary>
    /// Runs <paramref name="work"/> on the worker while the operation's token (deadline or caller) aborts the layer's
    /// device waits. Native failures are translated on the worker, where libepa2a's last error and status live.
    /// </summary>
    private ValueTask<T> OnWorkerAsync<T>(OperationContext op, Func<T> work) => OnWorkerAsync(op, work, callerThreadAllowed: true);

    /// <summary>
    /// As above; with <see cref="EpLayerOptions.DeviceCallsOnCallerThread"/> and <paramref name="callerThreadAllowed"/>
    /// the work runs right here and the returned task is already complete (no thread hand-off at all).
    /// </summary>
    private async ValueTask<T> OnWorkerAsync<T>(OperationContext op, Func<T> work, bool callerThreadAllowed)
    {
        T result;
        T Translated()
        {
            try
            {
                return work();
            }
            catch (NativeCallException e)
            {
                throw Translate(e, op);
            }
        }

        using (op.Token.UnsafeRegister(static self => ((CudaBackend)self!).Abort(), this))
        {
            if (callerThreadAllowed && callerThread && !worker.IsCurrentThread)
            {
                UseDeviceOnThisThread();
                result = Translated();
            }
            else
            {
                result = await worker.RunAsync(Translated).ConfigureAwait(false);
            }
        }

        if (Volatile.Read(ref abortRequested) != 0)
        {
            // The abort landed after the device work was done: the step completed, but the flag now stops every
            // later wait, so the layer needs the collective reset like any failed step.
            needsRecovery = true;
            throw Cancelled(op, null, -1, "the step was cancelled as it completed");
        }

        return result;
    }

    /// <summary>Selects the runtime's CUDA device on the calling thread once (CUDA's current device is per thread).</summary>
    private void UseDeviceOnThisThread()
    {
        if (threadDevice != device + 1)
        {
            Check(epa2a_use_device(device), "epa2a_use_device");
            threadDevice = device + 1;
        }
    }

    /// <summary>Any thread: makes every device wait of the layer give up now.</summary>
    private void Abort()
    {
        if (disposed || layer.IsClosed)
        {
            return;
        }

        Volatile.Write(ref abortRequested, 1);
        _ = epa2a_layer_abort(layer.Pointer);
    }

    /// <summary>
    /// A step that fails before touching the device (cancelled or out of time on arrival) fails like a missing
    /// rank on the CPU backend, and leaves this rank's layer clean.
    /// </summary>
    private void ThrowIfCancelledBeforeStart(OperationContext op)
    {
        if (op.Token.IsCancellationRequested)
        {
            throw Cancelled(op, null, -1, "cancelled before it started on the device");
        }
    }

    private Exception Cancelled(OperationContext op, Exception? inner, int peer, string detail)
    {
        if (op.Deadline.IsCancellationRequested)
        {
            return new EpStepTimeoutException($"rank {config.Rank}: operation {op.Sequence} passed its {op.Timeout.TotalSeconds:0.###} s deadline: {detail}", peer);
        }

        return new OperationCanceledException($"rank {config.Rank}: operation {op.Sequence} {detail}", inner, op.Token);
    }

    /// <summary>On the worker: turns a native failure into the exception the layer's callers expect.</summary>
    private Exception Translate(NativeCallException e, OperationContext op)
    {
        switch ((NativeCode)e.Code)
        {
            case NativeCode.Timeout:
            case NativeCode.Aborted:
            case NativeCode.BadRow:
                {
                    needsRecovery = true;

                    // The host poll may give up before a device wait records whom it waited for: let the aborted kernels
                    // end (they observe the abort flag), then read the device's record.
                    _ = epa2a_layer_sync(layer.Pointer, stream.Pointer);
                    int peer = epa2a_layer_status(layer.Pointer, out NativeStatus status) == 0 && status.Code != 0 ? status.Peer : -1;
                    string who = peer >= 0 ? $"rank {peer}" : "a peer";
                    string detail = $"{e.Message}; every rank must call RecoverAsync together before the next step";
                    if ((NativeCode)e.Code == NativeCode.Timeout || op.Deadline.IsCancellationRequested)
                    {
                        return new EpStepTimeoutException($"rank {config.Rank}: {who} did not arrive within {op.Timeout.TotalSeconds:0.###} s (operation {op.Sequence}): {detail}", peer);
                    }

                    if (op.Token.IsCancellationRequested)
                    {
                        return Cancelled(op, e, peer, $"was cancelled while waiting for {who}: {detail}");
                    }

                    if ((NativeCode)e.Code == NativeCode.BadRow)
                    {
                        return new EpStepFailedException($"rank {config.Rank}: a row index failed its bounds check: {detail}", peer, e);
                    }

                    return new EpStepAbortedException($"rank {config.Rank}: the step was aborted while waiting for {who}: {detail}", peer);
                }

            case NativeCode.PeerRejected:
                {
                    // Not fatal: the rejecting rank told every rank through the step's own exchange (counts, or the
                    // combine barrier), and every rank is ready for the next step. Fixed capacity: the exchange kernel
                    // stopped the step's later kernels with the fatal flag, and every rank needs the collective reset.
                    needsRecovery |= fixedCapacity;
                    int peer = epa2a_layer_status(layer.Pointer, out NativeStatus status) == 0 && status.Code == e.Code ? status.Peer : -1;
                    string who = peer >= 0 ? $"rank {peer}" : "a peer";
                    return new EpStepAbortedException($"rank {config.Rank}: {who} rejected its input for operation {op.Sequence} and told every rank at once: {e.Message}", peer);
                }

            case NativeCode.BadExpertId:
            case NativeCode.BadScatterIndex:
                return InputError(e);
            case NativeCode.InvalidArgument:
                return new ArgumentException($"rank {config.Rank}: {e.Message}", e);
            case NativeCode.State:
                needsRecovery |= e.Message.Contains("epa2a_layer_reset", StringComparison.Ordinal);
                return new InvalidOperationException($"rank {config.Rank}: {e.Message}", e);
            case NativeCode.Capacity:
                // Fixed capacity: the device stopped every rank's step (a fatal record); the layer needs the reset.
                needsRecovery |= fixedCapacity;
                return new InvalidOperationException($"rank {config.Rank}: {e.Message}{(fixedCapacity ? "; every rank must call RecoverAsync together before the next step" : string.Empty)}", e);
            default:
                return e;
        }
    }

    /// <summary>A bad expert id or scatter index the kernels found (device inputs are only checked there).</summary>
    private ArgumentException InputError(NativeCallException e)
    {
        string param = (NativeCode)e.Code == NativeCode.BadExpertId ? "expertIds" : "scatterIndices";
        string where = string.Empty;
        if (epa2a_layer_status(layer.Pointer, out NativeStatus s) == 0 && s.Code == e.Code && s.Index >= 0)
        {
            where = $" ({param}[{s.Index / config.TopK}, {s.Index % config.TopK}] = {s.Value})";
        }

        return new ArgumentException($"rank {config.Rank}: {e.Message}{where}; the entry was dropped", param, e);
    }
}

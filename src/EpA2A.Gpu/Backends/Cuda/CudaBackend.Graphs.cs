using EpA2A.Cuda;
using EpA2A.Layer;
using static EpA2A.Backends.Cuda.NativeMethods;

namespace EpA2A.Backends.Cuda;

/// <summary>Graph capture: a fixed-capacity step captured as two CUDA graphs, replayed with no host wait between its kernels.</summary>
internal sealed partial class CudaBackend
{
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

    public void Release(CapturedStep step)
    {
        _ = worker.Post(() =>
        {
            _ = epa2a_graph_destroy(step.DispatchGraph);
            _ = epa2a_graph_destroy(step.CombineGraph);
        });
    }

    /// <summary>On the worker: captures what <paramref name="enqueue"/> puts on this backend's stream.</summary>
    private nint Capture(Func<int> enqueue, string call) => StreamCapture.Capture(stream.Pointer, enqueue, call);
}

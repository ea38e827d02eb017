using System.Runtime.InteropServices;
using EpA2A.Layer;
using static EpA2A.Backends.Cuda.NativeMethods;

namespace EpA2A.Backends.Cuda;

/// <summary>
/// Diagnostics, not part of the flow: reached only through <see cref="CudaLayerDiagnostics"/> (the GPU suite's
/// buffer poisoning and the benchmark's direct-call baseline).
/// </summary>
internal sealed partial class CudaBackend
{
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
}

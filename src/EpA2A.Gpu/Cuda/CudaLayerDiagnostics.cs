using EpA2A.Backends.Cuda;
using EpA2A.Layer;

namespace EpA2A.Cuda;

/// <summary>Test hooks for CUDA layers (the GPU suite poisons outputs before each checked step).</summary>
public static class CudaLayerDiagnostics
{
    /// <summary>
    /// Fills a CUDA layer's receive buffers (the symmetric output rows and weights, and the host copies the
    /// Tensor API returns) with 0xFF bytes, a NaN in bf16, fp16 and fp32, so that a check can tell every row and
    /// weight a step wrote from a stale one. Call it between steps only.
    /// </summary>
    /// <exception cref="ArgumentException">The layer is not on the CUDA backend.</exception>
    public static Task PoisonReceiveBuffersAsync(EpAll2AllLayer layer)
    {
        ArgumentNullException.ThrowIfNull(layer);
        return layer.CudaBackendOrThrow(nameof(layer)).PoisonReceiveBuffersAsync(layer.Context);
    }

    /// <summary>
    /// One step of a CUDA layer driven by direct libepa2a calls on the GPU worker, with no C# orchestration: a layer
    /// barrier, then prepare, the size poll, the layout read, send, finish and a sync (the dispatch), then an in-place
    /// combine and a sync. Returns the host wall time of each, measured on the worker: the baseline that the C# path's
    /// wall time is compared with. Collective like a step.
    /// </summary>
    /// <exception cref="ArgumentException">The layer is not on the CUDA backend.</exception>
    public static Task<(TimeSpan Dispatch, TimeSpan Combine)> DirectStepAsync<T>(EpAll2AllLayer layer, DeviceTensor<T> input, DeviceTensor<int> expertIds)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(layer);
        ArgumentNullException.ThrowIfNull(input);
        ArgumentNullException.ThrowIfNull(expertIds);
        CudaBackend cuda = layer.CudaBackendOrThrow(nameof(layer));
        DeviceTensorValidator.Dispatch(layer.Config, input, expertIds, null, null);
        return cuda.DirectStepAsync(input.Pointer, expertIds.Pointer, input.Lengths[0], layer.Options.StepTimeout);
    }
}

using EpA2A.Backends.Cuda;
using EpA2A.Layer;
using EpA2A.LowLatency;
using EpA2A.Numerics;

namespace EpA2A.Cuda;

/// <summary>Synchronisation and test hooks for CUDA low-latency layers (the device API itself never waits on the host).</summary>
public static class CudaLowLatencyDiagnostics
{
    /// <summary>
    /// Waits until the layer's stream has run everything enqueued so far (the device API's results are then readable
    /// from any stream), then reports what the device recorded since: a peer that never arrived
    /// (<see cref="Errors.EpStepTimeoutException"/>; every rank must then call RecoverAsync together) or a dropped input
    /// (<see cref="ArgumentException"/> naming expertIds; the step itself completed).
    /// </summary>
    /// <exception cref="ArgumentException">The layer is not on the CUDA backend, or the device dropped an input.</exception>
    public static Task SynchronizeAsync(EpLowLatencyLayer layer) => Cuda(layer).SynchronizeAsync();

    /// <summary>
    /// Fills the layer's receive buffers, rows per expert and device combine result with 0xFF bytes (NaN in bf16, fp8 and
    /// fp32; -1 rows), so that a check can tell what a step wrote from what it left. Between steps only.
    /// </summary>
    /// <exception cref="ArgumentException">The layer is not on the CUDA backend.</exception>
    public static Task PoisonReceiveBuffersAsync(EpLowLatencyLayer layer) => Cuda(layer).PoisonReceiveBuffersAsync();

    /// <summary>
    /// The device combine result of the layer's latest step, [tokens, Hidden] bf16: where a device-API combine receive
    /// left it even when the call reported a dropped input afterwards.
    /// </summary>
    /// <exception cref="ArgumentException">The layer is not on the CUDA backend, or tokens is outside [0, MaxTokens].</exception>
    public static DeviceTensor<BFloat16> CombineOutput(EpLowLatencyLayer layer, int tokens)
    {
        CudaLowLatencyBackend cuda = Cuda(layer);
        if (tokens < 0 || tokens > layer.Config.MaxTokens)
        {
            throw new ArgumentException($"tokens = {tokens} must be in [0, MaxTokens = {layer.Config.MaxTokens}]", nameof(tokens));
        }

        return new DeviceTensor<BFloat16>(cuda.CombineOutputPointer, [tokens, layer.Config.Hidden], layer);
    }

    /// <summary>
    /// The blocks each of the layer's kernels launches with: <see cref="EpLowLatencyOptions.NumSms"/>, capped at creation
    /// so that the grids of every rank on this GPU are resident at once (ranks that share a GPU wait for each other's
    /// sends; a sender queued behind waiting receivers would otherwise never run).
    /// </summary>
    /// <exception cref="ArgumentException">The layer is not on the CUDA backend.</exception>
    public static int KernelBlocks(EpLowLatencyLayer layer) => Cuda(layer).KernelBlocks;

    private static CudaLowLatencyBackend Cuda(EpLowLatencyLayer layer)
    {
        ArgumentNullException.ThrowIfNull(layer);
        return layer.CudaBackendOrThrow(nameof(layer));
    }
}

using EpA2A.Config;
using EpA2A.Cuda;
using EpA2A.Layer;
using EpA2A.LowLatency;

namespace EpA2A.Backends.Cuda;

/// <summary>
/// The CUDA + NVSHMEM backends on <paramref name="runtime"/>. Creating either is collective: every rank of the
/// group calls it together (symmetric buffers).
/// </summary>
internal sealed class CudaBackendFactory(NvshmemRuntime runtime) : IEpBackendFactory
{
    public IDispatchCombineBackend CreateDispatchCombine(EpConfig config, EpLayerOptions options)
    {
        ThrowIfOtherRank(config);
        return CudaBackend.Create(config, runtime, options);
    }

    public ILowLatencyBackend CreateLowLatency(EpConfig config, EpLowLatencyOptions options)
    {
        if (options.PoisonReceiveBuffers)
        {
            throw new ArgumentException("EpLowLatencyOptions.PoisonReceiveBuffers is a CPU-backend option: the CUDA backend's dispatch send is one native call (epa2a_ll_dispatch_send, which CUDA graphs capture as is) and it does not poison; call CudaLowLatencyDiagnostics.PoisonReceiveBuffersAsync between steps", nameof(options));
        }

        ThrowIfOtherRank(config);
        return CudaLowLatencyBackend.Create(config, runtime, options);
    }

    private void ThrowIfOtherRank(EpConfig config)
    {
        if (config.Rank != runtime.Rank || config.WorldSize != runtime.WorldSize)
        {
            throw new ArgumentException($"EpConfig is rank {config.Rank} of {config.WorldSize}, but the NVSHMEM runtime is rank {runtime.Rank} of {runtime.WorldSize}", nameof(config));
        }
    }
}

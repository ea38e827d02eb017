using EpA2A.Config;
using EpA2A.LowLatency;

namespace EpA2A.Backends.Cuda;

/// <summary>
/// Creates the CUDA low-latency backend for <see cref="EpLowLatencyLayer.CreateCuda"/>. Collective like the normal
/// backend's creation: every rank calls it together (symmetric buffers).
/// </summary>
internal static class CudaLowLatencyBackendFactory
{
    public static ILowLatencyBackend Create(EpConfig config, NvshmemRuntime runtime, EpLowLatencyOptions options)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(runtime);
        ArgumentNullException.ThrowIfNull(options);
        return CudaLowLatencyBackend.Create(config, runtime, options);
    }
}

using EpA2A.Config;
using EpA2A.LowLatency;

namespace EpA2A.Backends.Cuda;

/// <summary>
/// Creates the CUDA low-latency backend for <see cref="EpLowLatencyLayer.CreateCuda"/>. A hook: the CUDA data plane
/// (helper ll-cuda, issue 11) replaces this body with its <c>CudaLowLatencyBackend</c>. Collective like the normal
/// backend's creation: every rank calls it together (symmetric buffers).
/// </summary>
internal static class CudaLowLatencyBackendFactory
{
    public static ILowLatencyBackend Create(EpConfig config, NvshmemRuntime runtime, EpLowLatencyOptions options)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(runtime);
        ArgumentNullException.ThrowIfNull(options);
        throw new NotSupportedException("the CUDA low-latency backend is not built in this version (issue 11): use EpLowLatencyLayer.CreateCpu, or the normal EpAll2AllLayer on CUDA");
    }
}

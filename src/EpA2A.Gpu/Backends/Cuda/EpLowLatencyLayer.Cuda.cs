using EpA2A.Backends.Cuda;
using EpA2A.Config;
using EpA2A.Cuda;

namespace EpA2A.LowLatency;

/// <summary>The CUDA backend's entry point (beside the backend, so the layer imports none).</summary>
public sealed partial class EpLowLatencyLayer
{
    /// <summary>
    /// A low-latency layer on the CUDA + NVSHMEM backend. Collective: every rank of the group calls it at the same time
    /// (it allocates the symmetric buffers once). Dispose is collective too.
    /// </summary>
    /// <exception cref="ArgumentException">The config is not bf16 or not intra-node, or differs from the runtime's rank and world.</exception>
    public static EpLowLatencyLayer CreateCuda(EpConfig config, NvshmemRuntime runtime, EpLowLatencyOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(runtime);
        return Create(config, new CudaBackendFactory(runtime), options);
    }

    /// <summary>The layer's CUDA backend, for <see cref="CudaLowLatencyDiagnostics"/>.</summary>
    /// <exception cref="ArgumentException">The layer is on another backend (named as <paramref name="paramName"/>).</exception>
    internal CudaLowLatencyBackend CudaBackendOrThrow(string paramName) => backend as CudaLowLatencyBackend
        ?? throw new ArgumentException($"layer is on the {BackendName} backend, not cuda", paramName);
}

using EpA2A.Backends.Cuda;
using EpA2A.Config;
using EpA2A.Cuda;

namespace EpA2A.Layer;

/// <summary>The CUDA backend's entry point (beside the backend, so the layer imports none).</summary>
public sealed partial class EpAll2AllLayer
{
    /// <summary>
    /// A layer on the CUDA + NVSHMEM backend (libepa2a). Collective: every rank of the group calls it at the same time
    /// (it creates the symmetric buffers), and blocks until all have. Dispose is collective too.
    /// </summary>
    /// <exception cref="ArgumentException">The config's rank or world size differs from the runtime's.</exception>
    public static EpAll2AllLayer CreateCuda(EpConfig config, NvshmemRuntime runtime, EpLayerOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(runtime);
        return Create(config, new CudaBackendFactory(runtime), options);
    }

    /// <summary>The layer's CUDA backend, for <see cref="CudaLayerDiagnostics"/>.</summary>
    /// <exception cref="ArgumentException">The layer is on another backend (named as <paramref name="paramName"/>).</exception>
    internal CudaBackend CudaBackendOrThrow(string paramName) => backend as CudaBackend
        ?? throw new ArgumentException($"layer is on the {BackendName} backend, not cuda", paramName);
}

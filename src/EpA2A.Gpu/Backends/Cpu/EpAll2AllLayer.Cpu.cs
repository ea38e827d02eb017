using EpA2A.Backends.Cpu;
using EpA2A.Config;
using EpA2A.Transport;

namespace EpA2A.Layer;

/// <summary>The CPU backend's entry point (beside the backend, so the layer imports none).</summary>
public sealed partial class EpAll2AllLayer
{
    /// <summary>A layer on the managed CPU backend whose ranks exchange messages over <paramref name="transport"/>.</summary>
    public static EpAll2AllLayer CreateCpu(EpConfig config, IRankTransport transport, EpLayerOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(transport);
        return Create(config, new CpuBackendFactory(transport), options);
    }
}

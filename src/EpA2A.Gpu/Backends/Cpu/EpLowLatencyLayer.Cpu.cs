using EpA2A.Backends.Cpu;
using EpA2A.Config;
using EpA2A.Transport;

namespace EpA2A.LowLatency;

/// <summary>The CPU backend's entry point (beside the backend, so the layer imports none).</summary>
public sealed partial class EpLowLatencyLayer
{
    /// <summary>A low-latency layer on the managed CPU backend whose ranks exchange messages over <paramref name="transport"/>.</summary>
    /// <exception cref="ArgumentException">The config is not bf16 or not intra-node, or an option is out of range.</exception>
    public static EpLowLatencyLayer CreateCpu(EpConfig config, IRankTransport transport, EpLowLatencyOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(transport);
        return Create(config, new CpuBackendFactory(transport), options);
    }
}

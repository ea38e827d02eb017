using EpA2A.Config;
using EpA2A.Layer;
using EpA2A.LowLatency;
using EpA2A.Transport;

namespace EpA2A.Backends.Cpu;

/// <summary>The managed backends, whose ranks exchange messages over <paramref name="transport"/>.</summary>
internal sealed class CpuBackendFactory(IRankTransport transport) : IEpBackendFactory
{
    public IDispatchCombineBackend CreateDispatchCombine(EpConfig config, EpLayerOptions options)
    {
        if (options.FixedCapacity)
        {
            throw new ArgumentException("EpLayerOptions.FixedCapacity is a CUDA-backend option (it exists for CUDA graph capture); the CPU backend grows its buffers", nameof(options));
        }

        return new CpuBackend(config, transport);
    }

    public ILowLatencyBackend CreateLowLatency(EpConfig config, EpLowLatencyOptions options) =>
        new CpuLowLatencyBackend(config, transport, options.PoisonReceiveBuffers);
}

using EpA2A.Config;
using EpA2A.Layer;
using EpA2A.LowLatency;

namespace EpA2A.Backends;

/// <summary>
/// Makes one kind of backend for the layers, which import no backend: <see cref="EpAll2AllLayer"/> and
/// <see cref="EpLowLatencyLayer"/> check their own options, the factory the backend's rules (an
/// <see cref="ArgumentException"/> that names the option), and then creates it.
/// </summary>
internal interface IEpBackendFactory
{
    /// <summary>The backend of a normal layer.</summary>
    IDispatchCombineBackend CreateDispatchCombine(EpConfig config, EpLayerOptions options);

    /// <summary>The backend of a low-latency layer.</summary>
    ILowLatencyBackend CreateLowLatency(EpConfig config, EpLowLatencyOptions options);
}

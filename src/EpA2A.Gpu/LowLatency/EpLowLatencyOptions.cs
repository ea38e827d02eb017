using EpA2A.Layer;

namespace EpA2A.LowLatency;

/// <summary>Per-layer behaviour of an <see cref="EpLowLatencyLayer"/> that is not part of the collective configuration.</summary>
public sealed record EpLowLatencyOptions
{
    /// <summary>Every wait (host or device) must finish within this, or it fails naming the rank it waited for.</summary>
    public TimeSpan StepTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>The layer's incarnation; a re-formed group uses a new epoch so stale messages never match.</summary>
    public long Epoch { get; init; }

    /// <summary>
    /// CUDA backend: the SM budget, as the number of thread blocks each low-latency kernel may use; null for
    /// <see cref="Config.EpConfig.NumSms"/>. Has no effect on results (and none on the CPU backend).
    /// </summary>
    public int? NumSms { get; init; }

    /// <summary>
    /// Debugging, CPU backend: every dispatch send first fills this rank's receive buffers with NaN (FP8: the e4m3 NaN code
    /// 0x7F, and NaN scales), so that an expert or a check that reads a row past RowsPerExpert[j] meets NaN instead of a
    /// plausible row left by an earlier step. Costs one pass over the receive buffers per step. The CUDA backend refuses it
    /// with an <see cref="ArgumentException"/> at creation (its dispatch send is one native call, which CUDA graphs capture
    /// as is, and it does not poison): call <see cref="Cuda.CudaLowLatencyDiagnostics.PoisonReceiveBuffersAsync"/> between
    /// steps instead.
    /// </summary>
    public bool PoisonReceiveBuffers { get; init; }

    /// <summary>Receives phase timings; null for none.</summary>
    public IPhaseObserver? Observer { get; init; }

    /// <summary>The layer's name in metrics and spans (the `layer` tag); null for "layer".</summary>
    public string? LayerName { get; init; }

    /// <summary>The defaults.</summary>
    public static EpLowLatencyOptions Default { get; } = new();
}

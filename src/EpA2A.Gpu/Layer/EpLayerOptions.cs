namespace EpA2A.Layer;

/// <summary>Per-layer behaviour that is not part of the collective configuration.</summary>
public sealed record EpLayerOptions
{
    /// <summary>Every collective operation must finish within this, or it fails naming the rank it waited for.</summary>
    public TimeSpan StepTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>The layer's incarnation; a re-formed group uses a new epoch so stale messages never match.</summary>
    public long Epoch { get; init; }

    /// <summary>Growth factor of the dispatch output (the original's `capacity`).</summary>
    public int Capacity { get; init; } = 2;

    /// <summary>
    /// CUDA backend: the dispatch output rows are fixed at creation (<see cref="Capacity"/> x MaxTokens x TopK, plus
    /// alignment padding; Capacity = WorldSize is the true worst case) and never grow. A step then needs no host wait,
    /// so it can be captured in a CUDA graph (<see cref="EpAll2AllLayer.CaptureStepGraphAsync{T}"/>). A step whose
    /// largest receive would exceed the rows fails on every rank together (the layer then needs
    /// <see cref="EpAll2AllLayer.RecoverAsync"/> on every rank).
    /// </summary>
    public bool FixedCapacity { get; init; }

    /// <summary>
    /// CUDA backend: run the libepa2a calls of dispatch, combine and barrier on the calling thread instead of handing
    /// them to the process's GPU worker thread. Saves two thread hand-offs per call (tens of µs); the call then
    /// completes synchronously and blocks its caller for the whole step (host size poll and stream sync included),
    /// so use it from a thread of your own (an in-process serving loop), never from an Orleans grain or the thread
    /// pool. Buffer growth, creation and disposal stay on the GPU worker.
    /// </summary>
    public bool DeviceCallsOnCallerThread { get; init; }

    /// <summary>Receives phase timings; null for none.</summary>
    public IPhaseObserver? Observer { get; init; }

    /// <summary>The layer's name in metrics and spans (the `layer` tag); null for "layer".</summary>
    public string? LayerName { get; init; }

    /// <summary>The defaults.</summary>
    public static EpLayerOptions Default { get; } = new();
}

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

    /// <summary>Receives phase timings; null for none.</summary>
    public IPhaseObserver? Observer { get; init; }

    /// <summary>The layer's name in metrics and spans (the `layer` tag); null for "layer".</summary>
    public string? LayerName { get; init; }

    /// <summary>The defaults.</summary>
    public static EpLayerOptions Default { get; } = new();
}

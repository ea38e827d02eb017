namespace EpA2A.LowLatency;

/// <summary>
/// Names one low-latency dispatch of one layer: combine takes it to prove it belongs to the layer's latest
/// dispatch. Carries no data; what combine needs stays in the layer (on the device, on CUDA).
/// </summary>
public sealed class LowLatencyHandle
{
    internal LowLatencyHandle(object owner, long epoch, long sequence, int tokenCount, bool hasWeights, LowLatencyDispatchOptions options)
    {
        Owner = owner;
        Epoch = epoch;
        Sequence = sequence;
        TokenCount = tokenCount;
        HasWeights = hasWeights;
        Options = options;
    }

    /// <summary>Tokens this rank dispatched; combine returns as many rows.</summary>
    public int TokenCount { get; }

    /// <summary>Whether the dispatch carried routing weights (a weighted combine needs them).</summary>
    public bool HasWeights { get; }

    /// <summary>The dispatch's format.</summary>
    public LowLatencyDispatchOptions Options { get; }

    /// <summary>The step's number on its layer (1, 2, ...).</summary>
    public long Sequence { get; }

    internal object Owner { get; }

    internal long Epoch { get; }
}

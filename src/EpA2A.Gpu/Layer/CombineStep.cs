using EpA2A.Config;

namespace EpA2A.Layer;

/// <summary>A combine in flight, as the backend sees it: its operation, the dispatch's layout and the expert outputs.</summary>
internal sealed class CombineStep
{
    private float[]? accumulator;

    public required OperationContext Operation { get; init; }

    /// <summary>The layer's buffers (the host combine's scratch lives there).</summary>
    public required DispatchCombineContext Context { get; init; }

    public required EpAllToAllLayout Layout { get; init; }

    public required CombineInputs Inputs { get; init; }

    public required bool Weighted { get; init; }

    /// <summary>This rank's dispatch weights [TokenCount, TopK] (weighted combine), or null.</summary>
    public float[]? SourceWeights => Layout.SourceWeights;

    /// <summary>
    /// The host inputs, for a backend that has only the host path (CPU): the layer gives such a backend no
    /// device inputs (it refuses the device API first), so reaching the other case here is a bug in the layer.
    /// </summary>
    public CombineInputs.Host Host => Inputs as CombineInputs.Host
        ?? throw new InvalidOperationException($"rank {Config.Rank}: a host-only backend was given device inputs");

    /// <summary>
    /// [TokenCount, Hidden] fp32 sums a host backend accumulates into (returned as <see cref="Backends.CombinedRows.HostSums"/>):
    /// the front of the layer's sum buffer, reused by every combine and zeroed here on first use; a backend that rounds on
    /// the device (CUDA) never touches it.
    /// </summary>
    public Memory<float> Accumulator
    {
        get
        {
            int elements = Layout.NumDispatchTokens * Config.Hidden;
            if (accumulator is null)
            {
                accumulator = Context.CombineSums(elements);
                Array.Clear(accumulator, 0, elements);
            }

            return accumulator.AsMemory(0, elements);
        }
    }

    public EpConfig Config => Operation.Config;
}

/// <summary>What a combine brings back: the experts' rows as host bytes, or on the device (CUDA, in process).</summary>
internal abstract record CombineInputs
{
    /// <summary>Host copies of the expert outputs.</summary>
    /// <param name="ExpertOutput">[RecvRows, Hidden] of the token type, as bytes, at the start of the array (which may be longer).</param>
    /// <param name="RowWeights">The received weights, one per row (the layer's weight buffer).</param>
    internal sealed record Host(byte[] ExpertOutput, float[] RowWeights) : CombineInputs;

    /// <summary>The expert outputs' device pointer.</summary>
    /// <param name="ExpertOutput">[RecvRows, Hidden] on the device.</param>
    internal sealed record Device(nint ExpertOutput) : CombineInputs;
}

using EpA2A.Config;

namespace EpA2A.Layer;

/// <summary>A dispatch in flight, as the backend sees it: its operation, the layer's buffers and the inputs. Read only.</summary>
internal sealed class DispatchStep
{
    public required OperationContext Operation { get; init; }

    /// <summary>The layer's host buffers (the CPU backend receives into them; the CUDA backend downloads into them on the host path).</summary>
    public required DispatchCombineContext Context { get; init; }

    public required DispatchInputs Inputs { get; init; }

    public int TokenCount => Inputs.TokenCount;

    /// <summary>
    /// The host inputs, for a backend that has only the host path (CPU): the layer gives such a backend no
    /// device inputs (it refuses the device API first), so reaching the other case here is a bug in the layer.
    /// </summary>
    public DispatchInputs.Host Host => Inputs as DispatchInputs.Host
        ?? throw new InvalidOperationException($"rank {Config.Rank}: a host-only backend was given device inputs");

    public EpConfig Config => Operation.Config;
}

/// <summary>What a dispatch sends: host arrays the layer copied, or the caller's device buffers (CUDA, in process).</summary>
/// <param name="TokenCount">Tokens this rank dispatches.</param>
/// <param name="HasWeights">Routing weights were given.</param>
/// <param name="HasScatterIndices">Scatter indices were given.</param>
internal abstract record DispatchInputs(int TokenCount, bool HasWeights, bool HasScatterIndices)
{
    /// <summary>The caller's tensors on the host (the token rows where the caller has them, the rest copied).</summary>
    /// <param name="TokenCount">Tokens this rank dispatches.</param>
    /// <param name="Tokens">[TokenCount, Hidden] of the token type, as bytes.</param>
    /// <param name="ExpertIds">[TokenCount, TopK].</param>
    /// <param name="Weights">[TokenCount, TopK] or null.</param>
    /// <param name="ScatterIndices">[TokenCount, TopK] global rows or null.</param>
    internal sealed record Host(int TokenCount, ReadOnlyMemory<byte> Tokens, int[] ExpertIds, float[]? Weights, int[]? ScatterIndices)
        : DispatchInputs(TokenCount, Weights is not null, ScatterIndices is not null);

    /// <summary>Device pointers of the caller's buffers (0 for an absent optional one, as libepa2a takes them).</summary>
    /// <param name="TokenCount">Tokens this rank dispatches.</param>
    /// <param name="Tokens">[TokenCount, Hidden] on the device.</param>
    /// <param name="ExpertIds">[TokenCount, TopK] on the device.</param>
    /// <param name="Weights">[TokenCount, TopK] on the device, or 0.</param>
    /// <param name="ScatterIndices">[TokenCount, TopK] on the device, or 0.</param>
    internal sealed record Device(int TokenCount, nint Tokens, nint ExpertIds, nint Weights, nint ScatterIndices)
        : DispatchInputs(TokenCount, Weights != 0, ScatterIndices != 0);
}

namespace EpA2A.Transport;

/// <summary>What a message belongs to: the layer's incarnation, the collective operation and its phase.</summary>
/// <param name="Epoch">Incarnation of the layer: a re-formed group starts a new epoch, so stale messages never match.</param>
/// <param name="Sequence">The collective operation's number on this layer (dispatch, combine, barrier all count).</param>
/// <param name="Phase">The exchange inside the operation.</param>
public readonly record struct MessageTag(long Epoch, long Sequence, ExchangePhase Phase)
{
    /// <inheritdoc />
    public override string ToString() => $"{Phase} of operation {Sequence} (epoch {Epoch})";
}

/// <summary>The exchanges of the flow; each has its own tag so messages of different phases never mix.</summary>
public enum ExchangePhase
{
    /// <summary>Per-expert counts, all-gathered.</summary>
    Counts = 1,

    /// <summary>Tokens to the ranks (intra-node) or to the node gateways (inter-node).</summary>
    DispatchTokens = 2,

    /// <summary>Inter-node: tokens forwarded from the gateway to ranks of its node.</summary>
    DispatchForward = 3,

    /// <summary>Expert outputs (or their per-rank partial sums) back towards the source.</summary>
    CombineRows = 4,

    /// <summary>Inter-node: one fp32 partial per token and node, gateway to source.</summary>
    CombineCrossNode = 5,

    /// <summary>A barrier's empty messages.</summary>
    Barrier = 6,

    /// <summary>Low-latency dispatch: one message per destination, its counts, entries and rows together.</summary>
    LowLatencyDispatch = 7,

    /// <summary>Low-latency combine: the expert outputs of one source's entries, in the order it sent them.</summary>
    LowLatencyCombine = 8,
}

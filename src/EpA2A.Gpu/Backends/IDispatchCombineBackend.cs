using EpA2A.Layer;

namespace EpA2A.Backends;

/// <summary>
/// The seams of the flow that differ between backends. <see cref="EpAll2AllLayer"/> validates, sequences,
/// times, sizes the buffers and shapes the results; a backend moves and sums the data and returns what it
/// produced. Every method honours the operation's deadline and names the rank it waited for when it passes.
/// </summary>
internal interface IDispatchCombineBackend : IDisposable
{
    /// <summary>A short name for logs and tables ("cpu", "cuda").</summary>
    string Name { get; }

    /// <summary>Copy-in: the step's inputs into the backend's send buffers (the CPU backend keeps the host copies).</summary>
    ValueTask CopyInAsync(DispatchStep step);

    /// <summary>Preprocess: bincount this rank's ids, all-gather the counts; returns the plan every rank agrees on and the group's smallest output.</summary>
    ValueTask<ExchangedCounts> ExchangeCountsAsync(DispatchStep step);

    /// <summary>
    /// Output-size wait: grows the output buffers the backend owns (CUDA: the symmetric device buffers) to
    /// <paramref name="rows"/>, which the layer's growth policy chose (collective: the same value on every rank, after
    /// every rank confirmed it is in the step). The host buffers are the layer's, grown by the layer; a backend
    /// without buffers of its own (CPU) does nothing.
    /// </summary>
    ValueTask GrowOutputAsync(DispatchStep step, int rows);

    /// <summary>The dispatch kernel: move the tokens (and weights) into every destination's output rows, and say where they went.</summary>
    ValueTask<DispatchedRows> DispatchTokensAsync(DispatchStep step, IRoutingPlan plan);

    /// <summary>Combine copy-in: the expert outputs into the backend's combine buffer.</summary>
    ValueTask CopyInAsync(CombineStep step);

    /// <summary>The combine kernel: bring rows back and sum them (inside the node for the inter-node algorithm); returns what it has so far.</summary>
    ValueTask<CombinedRows> CombineWithinNodeAsync(CombineStep step);

    /// <summary>Inter-node only: sum the per-node fp32 partials into <paramref name="withinNode"/>; the intra-node algorithm returns it as it is.</summary>
    ValueTask<CombinedRows> CombineAcrossNodesAsync(CombineStep step, CombinedRows withinNode);

    /// <summary>Every rank (or every rank of this node) arrives before any leaves.</summary>
    ValueTask BarrierAsync(OperationContext operation, bool intraNodeOnly);

    /// <summary>Drops per-operation state of operations before <paramref name="sequence"/> (the resets of postprocess).</summary>
    void Reset(long epoch, long sequence);

    /// <summary>
    /// This rank rejected its input for <paramref name="operation"/> (a dispatch, or else a combine): tell the peers
    /// where they wait for this rank, so they fail at once naming it (CPU: an abort message in the operation's exchange;
    /// CUDA: libepa2a's rejection in the counts exchange or at the combine barrier). The group needs no recovery after it.
    /// </summary>
    ValueTask RejectAsync(OperationContext operation, bool dispatch, string reason) => ValueTask.CompletedTask;

    /// <summary>After a failed operation, brings this rank back to a clean state; collective where the backend needs it (CUDA).</summary>
    ValueTask RecoverAsync() => ValueTask.CompletedTask;
}

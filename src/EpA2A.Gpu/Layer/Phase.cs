namespace EpA2A.Layer;

/// <summary>The phases of the flow, as the spec names them; timed on every backend.</summary>
public enum Phase
{
    /// <summary>Dispatch: inputs into the send buffers.</summary>
    DispatchCopyIn = 0,

    /// <summary>Dispatch: bincount, counts exchange, offsets.</summary>
    DispatchPreprocess = 1,

    /// <summary>Dispatch: learning the output size and growing buffers collectively.</summary>
    DispatchOutputSizeWait = 2,

    /// <summary>Dispatch: moving the tokens.</summary>
    DispatchKernel = 3,

    /// <summary>Dispatch: layout and resets.</summary>
    DispatchPostprocess = 4,

    /// <summary>Combine: expert outputs into the combine buffer.</summary>
    CombineCopyIn = 5,

    /// <summary>Combine: rows back and summed (inside the node for the inter-node algorithm).</summary>
    CombineKernel = 6,

    /// <summary>Combine: per-node partials summed across nodes (inter-node only).</summary>
    CombineCrossNodeReduce = 7,

    /// <summary>A barrier.</summary>
    Barrier = 8,

    /// <summary>Low-latency dispatch send: tokens quantized (or copied) and issued to every destination with their counts.</summary>
    LowLatencyDispatchSend = 9,

    /// <summary>Low-latency dispatch receive: every source's rows placed in the expert-major output.</summary>
    LowLatencyDispatchReceive = 10,

    /// <summary>Low-latency combine send: expert outputs issued back to their sources.</summary>
    LowLatencyCombineSend = 11,

    /// <summary>Low-latency combine receive: each token's rows weighted, summed in fp32 and rounded once.</summary>
    LowLatencyCombineReceive = 12,
}

/// <summary>Receives each phase's duration as it ends (telemetry hooks in here).</summary>
public interface IPhaseObserver
{
    /// <summary>Called once per phase per operation, on the thread that ran it.</summary>
    void OnPhase(int rank, Phase phase, TimeSpan elapsed, long tokens, long bytes);
}

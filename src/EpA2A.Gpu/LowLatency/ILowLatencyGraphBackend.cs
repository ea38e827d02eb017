using EpA2A.Layer;

namespace EpA2A.LowLatency;

/// <summary>A low-latency backend whose four split phases can be captured as CUDA graphs and replayed.</summary>
internal interface ILowLatencyGraphBackend
{
    /// <summary>
    /// Captures dispatch send, dispatch receive, combine send (from <paramref name="expertOutput"/>, or the combine
    /// buffer itself when 0) and combine receive, one graph each; nothing runs. With <paramref name="oneKernel"/> the
    /// dispatch and the combine are one kernel each (graphs 0 and 2; graphs 1 and 3 are empty, 0). Native failures
    /// become the layer's exceptions.
    /// </summary>
    ValueTask<LowLatencyCapturedStep> CaptureAsync(DeviceDispatchInput input, LowLatencyDispatchOptions options, nint expertOutput, bool weighted, bool oneKernel, OperationContext operation);

    /// <summary>
    /// Replays the chosen graphs in phase order (after a device barrier of all ranks when <paramref name="alignRanks"/>),
    /// then waits (bounded by the device deadline) for the stream and returns the GPU time of each phase.
    /// </summary>
    ValueTask<LowLatencyGraphReplay> ReplayAsync(LowLatencyCapturedStep step, LowLatencyGraphPhases phases, bool alignRanks, OperationContext operation);

    /// <summary>Destroys the graphs (on the GPU worker).</summary>
    void Release(LowLatencyCapturedStep step);
}

/// <summary>Four instantiated graphs (dispatch send, dispatch receive, combine send, combine receive) and where they write.</summary>
internal sealed record LowLatencyCapturedStep(nint[] Graphs, int TokenCount, DeviceReceived Received, nint CombineOutput);

using EpA2A.Layer;

namespace EpA2A.Backends;

/// <summary>A backend whose fixed-capacity steps can be captured in CUDA graphs and replayed.</summary>
internal interface IGraphCaptureBackend
{
    /// <summary>The dispatch output rows the graphs write, [OutputRows, Hidden].</summary>
    nint DeviceOutput { get; }

    /// <summary>Rows the fixed-capacity buffers hold.</summary>
    int OutputRows { get; }

    /// <summary>Captures one dispatch (enqueue, no host wait) and one combine into the layer's result buffer; native failures become the layer's exceptions.</summary>
    ValueTask<CapturedStep> CaptureAsync(DispatchInputs.Device inputs, nint expertOutput, bool weighted, OperationContext operation);

    /// <summary>Replays the dispatch graph, the combine graph or both back to back, then waits (bounded) for the stream.</summary>
    ValueTask<GraphReplay> ReplayAsync(CapturedStep step, bool dispatch, bool combine, OperationContext operation);

    /// <summary>Destroys the graphs (on the GPU worker).</summary>
    void Release(CapturedStep step);
}

/// <summary>Two instantiated graphs and where the combine writes.</summary>
internal sealed record CapturedStep(nint DispatchGraph, nint CombineGraph, nint CombineOutput);

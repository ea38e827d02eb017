using EpA2A.Cuda;
using static EpA2A.Backends.Cuda.NativeMethods;

namespace EpA2A.Backends.Cuda;

/// <summary>CUDA graph capture of one stream, shared by both CUDA backends.</summary>
internal static class StreamCapture
{
    /// <summary>On the stream's worker: captures what <paramref name="enqueue"/> puts on <paramref name="stream"/>; ends the capture on failure too.</summary>
    public static nint Capture(nint stream, Func<int> enqueue, string call)
    {
        Check(epa2a_graph_begin(stream), "epa2a_graph_begin");
        int status = enqueue();
        string error = status == 0 ? string.Empty : LastError();
        int ended = epa2a_graph_end(stream, out nint graph);
        if (status != 0)
        {
            _ = epa2a_graph_destroy(graph);
            throw new NativeCallException(call, (NativeCode)status, error);
        }

        Check(ended, "epa2a_graph_end");
        return graph;
    }
}

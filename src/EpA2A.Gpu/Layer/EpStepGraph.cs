using EpA2A.Backends;

namespace EpA2A.Layer;

/// <summary>What one replay of a captured step did: the rows this rank received and the GPU time of each graph.</summary>
/// <param name="ReceivedRows">Rows this rank received (read from the device after the replay).</param>
/// <param name="DispatchGpu">GPU time of the dispatch graph (CUDA events), zero when it was not replayed.</param>
/// <param name="CombineGpu">GPU time of the combine graph (CUDA events), zero when it was not replayed.</param>
public sealed record GraphReplay(int ReceivedRows, TimeSpan DispatchGpu, TimeSpan CombineGpu);

/// <summary>
/// A dispatch and a combine captured as CUDA graphs on a fixed-capacity layer
/// (<see cref="EpAll2AllLayer.CaptureStepGraphAsync{T}"/>). Replays are collective like steps: every rank replays
/// the same graphs in the same order. The graphs read the buffers given at capture, so refill those buffers
/// between replays; the outputs stay where <see cref="DispatchOutput"/> and <see cref="CombineOutput"/> say.
/// </summary>
/// <typeparam name="T">The token element type.</typeparam>
public sealed class EpStepGraph<T> : IDisposable
    where T : unmanaged
{
    private readonly EpAll2AllLayer layer;
    private readonly IGraphCaptureBackend backend;
    private readonly CapturedStep step;
    private bool disposed;

    internal EpStepGraph(EpAll2AllLayer layer, IGraphCaptureBackend backend, CapturedStep step, int tokens)
    {
        this.layer = layer;
        this.backend = backend;
        this.step = step;
        DispatchOutput = new DeviceTensor<T>(backend.DeviceOutput, [backend.OutputRows, layer.Config.Hidden], layer);
        CombineOutput = new DeviceTensor<T>(step.CombineOutput, [tokens, layer.Config.Hidden], layer);
    }

    /// <summary>The dispatch output rows (all fixed-capacity rows; a replay reports how many it filled).</summary>
    public DeviceTensor<T> DispatchOutput { get; }

    /// <summary>The combine result [tokens, Hidden].</summary>
    public DeviceTensor<T> CombineOutput { get; }

    /// <summary>
    /// Replays dispatch and combine back to back (no host wait between them), then waits for the stream. Each replay
    /// starts with a layer barrier on the device (enqueued with the graphs), so the reported GPU times are the
    /// kernels' own and not the skew between the ranks' host threads.
    /// </summary>
    public ValueTask<GraphReplay> ReplayAsync() => Replay(dispatch: true, combine: true);

    /// <summary>Replays the dispatch graph only, then waits for the stream (experts may run before the combine).</summary>
    public ValueTask<GraphReplay> ReplayDispatchAsync() => Replay(dispatch: true, combine: false);

    /// <summary>Replays the combine graph only (after a dispatch replay), then waits for the stream.</summary>
    public ValueTask<GraphReplay> ReplayCombineAsync() => Replay(dispatch: false, combine: true);

    /// <summary>Destroys the graphs.</summary>
    public void Dispose()
    {
        if (disposed)
        {
            return;
        }

        disposed = true;
        backend.Release(step);
    }

    private ValueTask<GraphReplay> Replay(bool dispatch, bool combine)
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        return layer.ReplayAsync(backend, step, dispatch, combine);
    }
}

using EpA2A.Layer;

namespace EpA2A.LowLatency;

/// <summary>Which split phases of a captured low-latency step a replay runs (in phase order).</summary>
[Flags]
public enum LowLatencyGraphPhases
{
    /// <summary>Nothing.</summary>
    None = 0,

    /// <summary>The dispatch send kernel.</summary>
    DispatchSend = 1,

    /// <summary>The dispatch receive kernel.</summary>
    DispatchReceive = 2,

    /// <summary>The combine send kernel.</summary>
    CombineSend = 4,

    /// <summary>The combine receive kernel.</summary>
    CombineReceive = 8,

    /// <summary>Dispatch send and receive.</summary>
    Dispatch = DispatchSend | DispatchReceive,

    /// <summary>Combine send and receive.</summary>
    Combine = CombineSend | CombineReceive,

    /// <summary>The whole step.</summary>
    Step = Dispatch | Combine,
}

/// <summary>GPU times (CUDA events) of one replay; zero for a phase that did not run.</summary>
/// <param name="Dispatch">Dispatch send + receive.</param>
/// <param name="Combine">Combine send + receive.</param>
/// <param name="DispatchSend">The dispatch send graph.</param>
/// <param name="DispatchReceive">The dispatch receive graph (includes waiting for the slowest peer).</param>
/// <param name="CombineSend">The combine send graph.</param>
/// <param name="CombineReceive">The combine receive graph (includes waiting for the slowest peer).</param>
public sealed record LowLatencyGraphReplay(
    TimeSpan Dispatch,
    TimeSpan Combine,
    TimeSpan DispatchSend,
    TimeSpan DispatchReceive,
    TimeSpan CombineSend,
    TimeSpan CombineReceive);

/// <summary>
/// The four split phases of a low-latency step captured as CUDA graphs (<see cref="CaptureAsync"/>). Replays are
/// collective like steps: every rank replays the same phases in the same order (a whole step, or dispatch then
/// combine with the experts in between), and the device epochs make each replay a fresh step. The graphs read the
/// buffers given at capture: refill them between replays; the results stay where <see cref="Dispatch"/> and
/// <see cref="CombineOutput"/> say.
/// </summary>
public sealed class EpLowLatencyGraph : IDisposable
{
    private readonly EpLowLatencyLayer layer;
    private readonly ILowLatencyGraphBackend backend;
    private readonly LowLatencyCapturedStep step;
    private LowLatencyGraphPhases next = LowLatencyGraphPhases.DispatchSend;
    private bool oneKernelPhases;
    private bool disposed;

    private EpLowLatencyGraph(EpLowLatencyLayer layer, ILowLatencyGraphBackend backend, LowLatencyCapturedStep step, LowLatencyDeviceDispatchResult dispatch)
    {
        this.layer = layer;
        this.backend = backend;
        this.step = step;
        Dispatch = dispatch;
        CombineOutput = new DeviceTensor<Numerics.BFloat16>(step.CombineOutput, [step.TokenCount, layer.Config.Hidden], layer);
    }

    /// <summary>Where the dispatch receive graph leaves its rows (device views of the layer's buffers).</summary>
    public LowLatencyDeviceDispatchResult Dispatch { get; }

    /// <summary>The combine result [tokens, Hidden] bf16 on the device.</summary>
    public DeviceTensor<Numerics.BFloat16> CombineOutput { get; }

    /// <summary>
    /// Captures a step of <paramref name="layer"/> (CUDA backend, between steps): dispatch of the given device inputs,
    /// combine from <paramref name="expertOutput"/> (null: the experts write <see cref="EpLowLatencyLayer.DeviceCombineBuffer"/>).
    /// Nothing runs until a replay. With <paramref name="oneKernel"/> dispatch and combine are one kernel each (send and
    /// receive in one launch): a replay must then take a phase's send and receive together.
    /// </summary>
    /// <exception cref="NotSupportedException">The layer's backend cannot capture graphs (CPU).</exception>
    /// <exception cref="ArgumentException">A shape, alignment or format is wrong (checked before anything is captured).</exception>
    public static async ValueTask<EpLowLatencyGraph> CaptureAsync(
        EpLowLatencyLayer layer,
        DeviceTensor<Numerics.BFloat16> x,
        DeviceTensor<int> expertIds,
        DeviceTensor<float>? weights = null,
        LowLatencyDispatchOptions? options = null,
        DeviceTensor<Numerics.BFloat16>? expertOutput = null,
        bool weighted = true,
        bool oneKernel = false)
    {
        ArgumentNullException.ThrowIfNull(layer);
        options ??= LowLatencyDispatchOptions.Bf16;
        ILowLatencyGraphBackend graphs = layer.GraphBackend
            ?? throw new NotSupportedException($"the {layer.BackendName} backend cannot capture CUDA graphs");
        DeviceDispatchInput input = LowLatencyValidator.Dispatch(layer.Config, x, expertIds, weights, options);
        if (weighted && weights is null)
        {
            throw new ArgumentException("a weighted combine needs routing weights at dispatch", nameof(weighted));
        }

        if (expertOutput is not null)
        {
            LowLatencyValidator.ExpertOutput(layer.Config, LowLatencyValidator.Lengths(expertOutput.Lengths), nameof(expertOutput));
            if (expertOutput.Pointer % 16 != 0)
            {
                throw new ArgumentException($"expertOutput must be 16-byte aligned; it is at 0x{expertOutput.Pointer:x}", nameof(expertOutput));
            }
        }

        LowLatencyCapturedStep step = await layer.BetweenStepsAsync("EpLowLatencyGraph.CaptureAsync", op =>
            graphs.CaptureAsync(input, options, expertOutput?.Pointer ?? 0, weighted, oneKernel, op)).ConfigureAwait(false);
        if (oneKernel)
        {
            return new EpLowLatencyGraph(layer, graphs, step, layer.DeviceView(step.Received, step.TokenCount, options, weights is not null)) { oneKernelPhases = true };
        }

        LowLatencyDeviceDispatchResult dispatch = layer.DeviceView(step.Received, step.TokenCount, options, weights is not null);
        return new EpLowLatencyGraph(layer, graphs, step, dispatch);
    }

    /// <summary>
    /// Replays the whole step after a device barrier of all ranks (so the times are the kernels', not the skew between
    /// the ranks' host threads), then waits for the stream.
    /// </summary>
    public ValueTask<LowLatencyGraphReplay> ReplayStepAsync() => ReplayAsync(LowLatencyGraphPhases.Step, alignRanks: true);

    /// <summary>Replays dispatch send and receive, then waits for the stream (the experts run before <see cref="ReplayCombineAsync"/>).</summary>
    public ValueTask<LowLatencyGraphReplay> ReplayDispatchAsync() => ReplayAsync(LowLatencyGraphPhases.Dispatch, alignRanks: false);

    /// <summary>Replays combine send and receive (after <see cref="ReplayDispatchAsync"/>), then waits for the stream.</summary>
    public ValueTask<LowLatencyGraphReplay> ReplayCombineAsync() => ReplayAsync(LowLatencyGraphPhases.Combine, alignRanks: false);

    /// <summary>
    /// Replays the given phases in order. The phases of consecutive replays must continue the step order (dispatch
    /// send, dispatch receive, combine send, combine receive, dispatch send, ...), or the ranks would wait for each other
    /// forever; a replay that breaks it is refused before anything is launched.
    /// </summary>
    /// <exception cref="InvalidOperationException">The phases do not continue the step order.</exception>
    public async ValueTask<LowLatencyGraphReplay> ReplayAsync(LowLatencyGraphPhases phases, bool alignRanks)
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        LowLatencyGraphPhases after = Continue(phases);
        if (oneKernelPhases && ((phases & LowLatencyGraphPhases.Dispatch) is LowLatencyGraphPhases.DispatchSend or LowLatencyGraphPhases.DispatchReceive || (phases & LowLatencyGraphPhases.Combine) is LowLatencyGraphPhases.CombineSend or LowLatencyGraphPhases.CombineReceive))
        {
            throw new InvalidOperationException($"a graph captured with one kernel a phase replays a phase's send and receive together, not {phases}");
        }

        LowLatencyGraphReplay replay = await layer.BetweenStepsAsync("EpLowLatencyGraph.ReplayAsync", op =>
            backend.ReplayAsync(step, phases, alignRanks, op)).ConfigureAwait(false);
        next = after;
        return replay;
    }

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

    /// <summary>The phase after <paramref name="phases"/>, when they are a contiguous run starting at the expected one.</summary>
    private LowLatencyGraphPhases Continue(LowLatencyGraphPhases phases)
    {
        int bits = (int)phases;
        int first = (int)next;
        if (bits == 0 || bits > (int)LowLatencyGraphPhases.Step || (bits & first) == 0 || (bits & (first - 1)) != 0 || ((bits / first) & ((bits / first) + 1)) != 0)
        {
            throw new InvalidOperationException($"a replay of {phases} does not continue the step order: the next phase is {next}");
        }

        int last = bits / first;
        int shift = 0;
        while ((last >> shift) > 1)
        {
            shift++;
        }

        int following = first << (shift + 1);
        return following > (int)LowLatencyGraphPhases.CombineReceive ? LowLatencyGraphPhases.DispatchSend : (LowLatencyGraphPhases)following;
    }
}

using System.Numerics.Tensors;
using EpA2A.Backends;
using EpA2A.Config;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Telemetry;
using EpA2A.Transport;

namespace EpA2A.LowLatency;

/// <summary>
/// One rank's low-latency (decode) expert-parallel exchange: capacity fixed at creation (MaxTokens per rank), counts
/// carried with the data, results in the expert-major layout [ExpertsPerRank, WorldSize*MaxTokens, Hidden] that grouped
/// GEMMs read, bf16 or FP8 (e4m3, one fp32 scale per 128 channels) on the wire. Every rank calls, per step and in this
/// order: <see cref="DispatchSendAsync"/>, <see cref="DispatchReceiveAsync"/>, <see cref="CombineSendAsync"/>,
/// <see cref="CombineReceiveAsync"/> (or the one-call <see cref="DispatchAsync"/> and <see cref="CombineAsync"/>), so a
/// model runner can compute between a send and its receive. Input is validated before anything is sent; every wait has
/// <see cref="EpLowLatencyOptions.StepTimeout"/>; a failed call ends the step on this rank and leaves the layer usable
/// for the next DispatchSend. Intra-node only: the inter-node algorithm is the normal layer's.
/// </summary>
public sealed partial class EpLowLatencyLayer : IDisposable
{
    private readonly ILowLatencyBackend backend;
    private readonly EpLowLatencyOptions options;
    private readonly LayerTelemetry telemetry;
    private readonly object identity = new();
    private readonly int[] outputLengths;
    private long sequence;
    private StepState state = StepState.Idle;
    private LowLatencyHandle? current;
    private int busy;
    private bool disposed;

    private EpLowLatencyLayer(EpConfig config, ILowLatencyBackend backend, EpLowLatencyOptions options)
    {
        Config = config;
        this.backend = backend;
        this.options = options;
        telemetry = new LayerTelemetry(config, backend.Name, options.LayerName, context: null);
        outputLengths = [config.ExpertsPerRank, config.WorldSize * config.MaxTokens, config.Hidden];
    }

    /// <summary>Where the layer is in its step.</summary>
    private enum StepState
    {
        Idle = 0,
        DispatchSent = 1,
        DispatchReceived = 2,
        CombineSent = 3,
    }

    /// <summary>The layer's configuration.</summary>
    public EpConfig Config { get; }

    /// <summary>The layer's options.</summary>
    public EpLowLatencyOptions Options => options;

    /// <summary>The backend's name ("cpu", "cuda").</summary>
    public string BackendName => backend.Name;

    /// <summary>Rows of each local expert's block: WorldSize * MaxTokens.</summary>
    public int RowsPerExpertBlock => Config.WorldSize * Config.MaxTokens;

    /// <summary>
    /// The combine-send buffer as a host tensor [ExpertsPerRank, WorldSize*MaxTokens, Hidden] (CPU backend): experts that
    /// write their outputs here (rows below RowsPerExpert[j] of block j) pass no expert output to combine (zero-copy).
    /// </summary>
    /// <exception cref="NotSupportedException">The backend's buffer is on the device: use <see cref="DeviceCombineBuffer"/>.</exception>
    public Tensor<BFloat16> CombineBuffer => backend.HostCombineBuffer is { } buffer
        ? View(buffer)
        : throw new NotSupportedException($"the {backend.Name} backend's combine buffer is on the device: use DeviceCombineBuffer");

    /// <summary>The combine-send buffer on the device (CUDA backend), for zero-copy combine from device experts.</summary>
    /// <exception cref="NotSupportedException">The backend has no device buffers (CPU).</exception>
    public DeviceTensor<BFloat16> DeviceCombineBuffer => backend.HasDeviceBuffers
        ? new DeviceTensor<BFloat16>(backend.DeviceCombineBuffer, outputLengths, this)
        : throw new NotSupportedException($"the {backend.Name} backend has no device buffers: use CombineBuffer");

    /// <summary>The backend's graph capture, for <see cref="EpLowLatencyGraph"/>; null where it has none (CPU).</summary>
    internal ILowLatencyGraphBackend? GraphBackend => backend as ILowLatencyGraphBackend;

    /// <summary>
    /// Checks, without creating anything, that a low-latency layer can serve <paramref name="config"/> (and
    /// <paramref name="format"/>, when given): bf16 tokens, one node, the fixed layout, FP8 only with Hidden a multiple of 128.
    /// </summary>
    /// <exception cref="ArgumentException">A rule is broken; the message names it.</exception>
    public static void ThrowIfUnsupported(EpConfig config, LowLatencyDispatchOptions? format = null, EpLowLatencyOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        LowLatencyValidator.Create(config, options ?? EpLowLatencyOptions.Default);
        if (format is not null)
        {
            LowLatencyValidator.Format(config, format);
        }
    }

    /// <summary>
    /// A low-latency layer on the backend <paramref name="backends"/> makes (the public entry points, CreateCpu and
    /// CreateCuda, live beside their backends): the config and options are checked here, the backend's own rules by the factory.
    /// </summary>
    internal static EpLowLatencyLayer Create(EpConfig config, IEpBackendFactory backends, EpLowLatencyOptions? options)
    {
        ArgumentNullException.ThrowIfNull(config);
        options ??= EpLowLatencyOptions.Default;
        LowLatencyValidator.Create(config, options);
        return new EpLowLatencyLayer(config, backends.CreateLowLatency(config, options), options);
    }

    /// <summary>Dispatch send and receive in one call (host API).</summary>
    /// <param name="x">[n, Hidden] bf16 tokens, n ≤ MaxTokens.</param>
    /// <param name="expertIds">[n, TopK] expert ids; NumExperts marks a dropped slot; a token may list an expert twice (two rows).</param>
    /// <param name="weights">[n, TopK] routing weights for a weighted combine, or null.</param>
    /// <param name="options">bf16 (default) or FP8.</param>
    /// <param name="cancellationToken">Cancels the wait; the deadline applies regardless.</param>
    public async ValueTask<LowLatencyDispatchResult> DispatchAsync(
        Tensor<BFloat16> x,
        Tensor<int> expertIds,
        Tensor<float>? weights = null,
        LowLatencyDispatchOptions? options = null,
        CancellationToken cancellationToken = default)
    {
        options ??= LowLatencyDispatchOptions.Bf16;
        HostDispatchInput input = ValidateHost(x, expertIds, weights, options);
        using Guard guard = Enter(LayerOperation.LowLatencyDispatch, StepState.Idle, "DispatchAsync");
        BeginStep(input, options);
        LowLatencyReceived received = await OperateAsync(LayerOperation.LowLatencyDispatch, input.TokenCount, async op =>
        {
            PhaseClock clock = NewClock();
            long bytes = await backend.DispatchSendAsync(input, options, op).ConfigureAwait(false);
            clock.Lap(Phase.LowLatencyDispatchSend, input.TokenCount, bytes);
            return await ReceiveDispatchAsync(LowLatencyPlace.Host, op, clock).ConfigureAwait(false);
        }, cancellationToken).ConfigureAwait(false);
        state = StepState.DispatchReceived;
        return HostResult(received);
    }

    /// <summary>
    /// Issues this rank's tokens to every rank (host API) and returns without waiting for any peer. Arguments as
    /// <see cref="DispatchAsync"/>; the inputs are copied before it returns.
    /// </summary>
    public async ValueTask DispatchSendAsync(
        Tensor<BFloat16> x,
        Tensor<int> expertIds,
        Tensor<float>? weights = null,
        LowLatencyDispatchOptions? options = null,
        CancellationToken cancellationToken = default)
    {
        options ??= LowLatencyDispatchOptions.Bf16;
        HostDispatchInput input = ValidateHost(x, expertIds, weights, options);
        using Guard guard = Enter(LayerOperation.LowLatencyDispatch, StepState.Idle, "DispatchSendAsync");
        await SendDispatchAsync(input, options, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>Waits for every rank's tokens and returns this rank's expert-major rows (host API).</summary>
    public async ValueTask<LowLatencyDispatchResult> DispatchReceiveAsync(CancellationToken cancellationToken = default)
    {
        using Guard guard = Enter(LayerOperation.LowLatencyDispatch, StepState.DispatchSent, "DispatchReceiveAsync");
        LowLatencyReceived received = await OperateAsync(LayerOperation.LowLatencyDispatch, current!.TokenCount, op => ReceiveDispatchAsync(LowLatencyPlace.Host, op, NewClock()), cancellationToken).ConfigureAwait(false);
        state = StepState.DispatchReceived;
        return HostResult(received);
    }

    /// <summary>Combine send and receive in one call (host API).</summary>
    /// <param name="expertOutput">
    /// [ExpertsPerRank, WorldSize*MaxTokens, Hidden] bf16 expert outputs (rows below RowsPerExpert[j] of block j are read),
    /// or null when the experts wrote into <see cref="CombineBuffer"/> (zero-copy).
    /// </param>
    /// <param name="handle">The handle of this layer's latest dispatch.</param>
    /// <param name="weighted">Multiply each row by its routing weight (the default; needs weights at dispatch), or sum plain rows.</param>
    /// <param name="cancellationToken">Cancels the wait; the deadline applies regardless.</param>
    /// <returns>[n, Hidden] bf16 in the caller's token order: per token the fp32 sum over its non-dropped rows, rounded once.</returns>
    public async ValueTask<Tensor<BFloat16>> CombineAsync(
        Tensor<BFloat16>? expertOutput,
        LowLatencyHandle handle,
        bool weighted = true,
        CancellationToken cancellationToken = default)
    {
        LowLatencyExpertOutput output = ValidateCombine(expertOutput, handle, weighted);
        using Guard guard = Enter(LayerOperation.LowLatencyCombine, StepState.DispatchReceived, "CombineAsync");
        LowLatencyCombined combined = await OperateAsync(LayerOperation.LowLatencyCombine, handle.TokenCount, async op =>
        {
            PhaseClock clock = NewClock();
            long bytes = await backend.CombineSendAsync(output, weighted, op).ConfigureAwait(false);
            clock.Lap(Phase.LowLatencyCombineSend, handle.TokenCount, bytes);
            return await ReceiveCombineAsync(LowLatencyPlace.Host, op, clock).ConfigureAwait(false);
        }, cancellationToken).ConfigureAwait(false);
        EndStep();
        return HostResult(combined);
    }

    /// <summary>Issues the expert outputs back to their ranks (host API) without waiting. Arguments as <see cref="CombineAsync"/>.</summary>
    public async ValueTask CombineSendAsync(
        Tensor<BFloat16>? expertOutput,
        LowLatencyHandle handle,
        bool weighted = true,
        CancellationToken cancellationToken = default)
    {
        LowLatencyExpertOutput output = ValidateCombine(expertOutput, handle, weighted);
        using Guard guard = Enter(LayerOperation.LowLatencyCombine, StepState.DispatchReceived, "CombineSendAsync");
        await SendCombineAsync(output, weighted, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>Waits for every rank's expert outputs and returns this rank's [n, Hidden] combined tokens (host API).</summary>
    public async ValueTask<Tensor<BFloat16>> CombineReceiveAsync(CancellationToken cancellationToken = default)
    {
        using Guard guard = Enter(LayerOperation.LowLatencyCombine, StepState.CombineSent, "CombineReceiveAsync");
        LowLatencyCombined combined = await OperateAsync(LayerOperation.LowLatencyCombine, current!.TokenCount, op => ReceiveCombineAsync(LowLatencyPlace.Host, op, NewClock()), cancellationToken).ConfigureAwait(false);
        EndStep();
        return HostResult(combined);
    }

    /// <summary>
    /// Dispatch send and receive from device buffers (CUDA): no host copy and no host wait; the results are device
    /// views, written in stream order. Shapes are checked here; ids are device data the kernels bounds-check.
    /// </summary>
    /// <exception cref="NotSupportedException">The backend has no device buffers (CPU).</exception>
    public async ValueTask<LowLatencyDeviceDispatchResult> DispatchOnDeviceAsync(
        DeviceTensor<BFloat16> x,
        DeviceTensor<int> expertIds,
        DeviceTensor<float>? weights = null,
        LowLatencyDispatchOptions? options = null,
        CancellationToken cancellationToken = default)
    {
        options ??= LowLatencyDispatchOptions.Bf16;
        DeviceDispatchInput input = ValidateDevice(x, expertIds, weights, options);
        using Guard guard = Enter(LayerOperation.LowLatencyDispatch, StepState.Idle, "DispatchOnDeviceAsync");
        BeginStep(input, options);
        LowLatencyReceived received = await OperateAsync(LayerOperation.LowLatencyDispatch, input.TokenCount, async op =>
        {
            PhaseClock clock = NewClock();
            long bytes = await backend.DispatchSendAsync(input, options, op).ConfigureAwait(false);
            clock.Lap(Phase.LowLatencyDispatchSend, input.TokenCount, bytes);
            return await ReceiveDispatchAsync(LowLatencyPlace.Device, op, clock).ConfigureAwait(false);
        }, cancellationToken).ConfigureAwait(false);
        state = StepState.DispatchReceived;
        return DeviceResult(received);
    }

    /// <summary>Dispatch send from device buffers (CUDA): returns once the send kernel is enqueued.</summary>
    /// <exception cref="NotSupportedException">The backend has no device buffers (CPU).</exception>
    public async ValueTask DispatchSendOnDeviceAsync(
        DeviceTensor<BFloat16> x,
        DeviceTensor<int> expertIds,
        DeviceTensor<float>? weights = null,
        LowLatencyDispatchOptions? options = null,
        CancellationToken cancellationToken = default)
    {
        options ??= LowLatencyDispatchOptions.Bf16;
        DeviceDispatchInput input = ValidateDevice(x, expertIds, weights, options);
        using Guard guard = Enter(LayerOperation.LowLatencyDispatch, StepState.Idle, "DispatchSendOnDeviceAsync");
        await SendDispatchAsync(input, options, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>Dispatch receive into device buffers (CUDA): returns once the receive kernel is enqueued; the wait is on the device.</summary>
    /// <exception cref="NotSupportedException">The backend has no device buffers (CPU).</exception>
    public async ValueTask<LowLatencyDeviceDispatchResult> DispatchReceiveOnDeviceAsync(CancellationToken cancellationToken = default)
    {
        RequireDevice();
        using Guard guard = Enter(LayerOperation.LowLatencyDispatch, StepState.DispatchSent, "DispatchReceiveOnDeviceAsync");
        LowLatencyReceived received = await OperateAsync(LayerOperation.LowLatencyDispatch, current!.TokenCount, op => ReceiveDispatchAsync(LowLatencyPlace.Device, op, NewClock()), cancellationToken).ConfigureAwait(false);
        state = StepState.DispatchReceived;
        return DeviceResult(received);
    }

    /// <summary>
    /// Combine send and receive on device buffers (CUDA). <paramref name="expertOutput"/> is
    /// [ExpertsPerRank, WorldSize*MaxTokens, Hidden] bf16 on the device (16-byte aligned), or null when the experts wrote
    /// into <see cref="DeviceCombineBuffer"/>. The result [n, Hidden] is a device view valid until the next combine.
    /// </summary>
    /// <exception cref="NotSupportedException">The backend has no device buffers (CPU).</exception>
    public async ValueTask<DeviceTensor<BFloat16>> CombineOnDeviceAsync(
        DeviceTensor<BFloat16>? expertOutput,
        LowLatencyHandle handle,
        bool weighted = true,
        CancellationToken cancellationToken = default)
    {
        LowLatencyExpertOutput output = ValidateCombine(expertOutput, handle, weighted);
        using Guard guard = Enter(LayerOperation.LowLatencyCombine, StepState.DispatchReceived, "CombineOnDeviceAsync");
        LowLatencyCombined combined = await OperateAsync(LayerOperation.LowLatencyCombine, handle.TokenCount, async op =>
        {
            PhaseClock clock = NewClock();
            long bytes = await backend.CombineSendAsync(output, weighted, op).ConfigureAwait(false);
            clock.Lap(Phase.LowLatencyCombineSend, handle.TokenCount, bytes);
            return await ReceiveCombineAsync(LowLatencyPlace.Device, op, clock).ConfigureAwait(false);
        }, cancellationToken).ConfigureAwait(false);
        int n = current!.TokenCount;
        EndStep();
        return DeviceResult(combined, n);
    }

    /// <summary>Combine send from device buffers (CUDA): returns once the send kernel is enqueued.</summary>
    /// <exception cref="NotSupportedException">The backend has no device buffers (CPU).</exception>
    public async ValueTask CombineSendOnDeviceAsync(
        DeviceTensor<BFloat16>? expertOutput,
        LowLatencyHandle handle,
        bool weighted = true,
        CancellationToken cancellationToken = default)
    {
        LowLatencyExpertOutput output = ValidateCombine(expertOutput, handle, weighted);
        using Guard guard = Enter(LayerOperation.LowLatencyCombine, StepState.DispatchReceived, "CombineSendOnDeviceAsync");
        await SendCombineAsync(output, weighted, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>Combine receive into a device buffer (CUDA): returns once the receive kernel is enqueued.</summary>
    /// <exception cref="NotSupportedException">The backend has no device buffers (CPU).</exception>
    public async ValueTask<DeviceTensor<BFloat16>> CombineReceiveOnDeviceAsync(CancellationToken cancellationToken = default)
    {
        RequireDevice();
        using Guard guard = Enter(LayerOperation.LowLatencyCombine, StepState.CombineSent, "CombineReceiveOnDeviceAsync");
        int n = current!.TokenCount;
        LowLatencyCombined combined = await OperateAsync(LayerOperation.LowLatencyCombine, n, op => ReceiveCombineAsync(LowLatencyPlace.Device, op, NewClock()), cancellationToken).ConfigureAwait(false);
        EndStep();
        return DeviceResult(combined, n);
    }

    /// <summary>
    /// After a failed step (deadline, abort), brings the group back to a clean state. Collective on the CUDA backend
    /// (every rank calls it together); a no-op on the CPU backend.
    /// </summary>
    public async ValueTask RecoverAsync()
    {
        using Guard guard = Enter(null, null, "RecoverAsync");
        await backend.RecoverAsync().ConfigureAwait(false);
        state = StepState.Idle;
    }

    /// <summary>
    /// Runs <paramref name="body"/> between steps with no other call in flight, under a fresh deadline (CUDA graph
    /// capture and replay, see <see cref="EpLowLatencyGraph"/>).
    /// </summary>
    internal async ValueTask<T> BetweenStepsAsync<T>(string call, Func<OperationContext, ValueTask<T>> body)
    {
        using Guard guard = Enter(null, StepState.Idle, call);
        using OperationScope scope = new(Config, options.Epoch, options.StepTimeout, sequence, CancellationToken.None);
        return await body(scope.Operation).ConfigureAwait(false);
    }

    /// <summary>Device views of a receive's buffers with a handle that names no step (graph replays have none).</summary>
    internal LowLatencyDeviceDispatchResult DeviceView(DeviceReceived received, int tokens, LowLatencyDispatchOptions format, bool hasWeights)
    {
        int[] scaleLengths = [outputLengths[0], outputLengths[1], Config.Hidden / LowLatencyDispatchOptions.ScaleGroup];
        return new LowLatencyDeviceDispatchResult(
            received.Tokens != 0 ? new DeviceTensor<BFloat16>(received.Tokens, outputLengths, this) : null,
            received.Fp8Tokens != 0 ? new DeviceTensor<byte>(received.Fp8Tokens, outputLengths, this) : null,
            received.Scales != 0 ? new DeviceTensor<float>(received.Scales, scaleLengths, this) : null,
            new DeviceTensor<int>(received.RowsPerExpert, [Config.ExpertsPerRank], this),
            new LowLatencyHandle(identity, options.Epoch, -1, tokens, hasWeights, format));
    }

    /// <summary>Releases every buffer. Later calls throw <see cref="ObjectDisposedException"/>.</summary>
    public void Dispose()
    {
        if (disposed)
        {
            return;
        }

        disposed = true;
        backend.Dispose();
    }

    private async ValueTask SendDispatchAsync(LowLatencyDispatchInput input, LowLatencyDispatchOptions format, CancellationToken cancellationToken)
    {
        BeginStep(input, format);
        await OperateAsync(LayerOperation.LowLatencyDispatch, input.TokenCount, async op =>
        {
            PhaseClock clock = NewClock();
            long bytes = await backend.DispatchSendAsync(input, format, op).ConfigureAwait(false);
            clock.Lap(Phase.LowLatencyDispatchSend, input.TokenCount, bytes);
            return bytes;
        }, cancellationToken).ConfigureAwait(false);
        state = StepState.DispatchSent;
    }

    private async ValueTask<LowLatencyReceived> ReceiveDispatchAsync(LowLatencyPlace place, OperationContext op, PhaseClock clock)
    {
        LowLatencyReceived received = await backend.DispatchReceiveAsync(place, op).ConfigureAwait(false);
        long bytes = 0;
        if (received is HostReceived host)
        {
            int rows = 0;
            foreach (int r in host.RowsPerExpert)
            {
                rows += r;
            }

            bytes = (long)rows * (current!.Options.Format == LowLatencyFormat.Fp8 ? Config.Hidden + (4 * (Config.Hidden / LowLatencyDispatchOptions.ScaleGroup)) : 2 * Config.Hidden);
            telemetry.Received(rows, host.RowsPerExpert);
        }

        clock.Lap(Phase.LowLatencyDispatchReceive, current!.TokenCount, bytes);
        return received;
    }

    private async ValueTask SendCombineAsync(LowLatencyExpertOutput output, bool weighted, CancellationToken cancellationToken)
    {
        int n = current!.TokenCount;
        await OperateAsync(LayerOperation.LowLatencyCombine, n, async op =>
        {
            PhaseClock clock = NewClock();
            long bytes = await backend.CombineSendAsync(output, weighted, op).ConfigureAwait(false);
            clock.Lap(Phase.LowLatencyCombineSend, n, bytes);
            return bytes;
        }, cancellationToken).ConfigureAwait(false);
        state = StepState.CombineSent;
    }

    private async ValueTask<LowLatencyCombined> ReceiveCombineAsync(LowLatencyPlace place, OperationContext op, PhaseClock clock)
    {
        LowLatencyCombined combined = await backend.CombineReceiveAsync(place, op).ConfigureAwait(false);
        int n = current!.TokenCount;
        clock.Lap(Phase.LowLatencyCombineReceive, n, 2L * n * Config.Hidden);
        return combined;
    }

    /// <summary>
    /// Runs one call's backend work under a fresh deadline and the operation's span. A failure ends the step on this
    /// rank: the call order returns to DispatchSend and the step's buffered messages are dropped.
    /// </summary>
    private async ValueTask<TResult> OperateAsync<TResult>(LayerOperation operation, long tokens, Func<OperationContext, ValueTask<TResult>> body, CancellationToken cancellationToken)
    {
        using OperationScope scope = new(Config, options.Epoch, options.StepTimeout, sequence, cancellationToken);
        using OperationTrace trace = telemetry.Begin(operation, sequence, tokens);
        try
        {
            return await body(scope.Operation).ConfigureAwait(false);
        }
        catch (Exception e) when (Abandon() || trace.Failed(e))
        {
            throw; // never reached: the filters end the step, count the failure, mark the span and decline
        }
    }

    private bool Abandon()
    {
        state = StepState.Idle;
        backend.Reset(options.Epoch, sequence + 1);
        return false;
    }

    /// <summary>A new step: its sequence number and handle; messages of earlier steps are dropped.</summary>
    private void BeginStep(LowLatencyDispatchInput input, LowLatencyDispatchOptions format)
    {
        sequence++;
        backend.Reset(options.Epoch, sequence);
        current = new LowLatencyHandle(identity, options.Epoch, sequence, input.TokenCount, input.HasWeights, format);
    }

    private void EndStep()
    {
        state = StepState.Idle;
        backend.Reset(options.Epoch, sequence + 1);
    }

    private HostDispatchInput ValidateHost(Tensor<BFloat16> x, Tensor<int> expertIds, Tensor<float>? weights, LowLatencyDispatchOptions format)
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        try
        {
            return LowLatencyValidator.Dispatch(Config, x, expertIds, weights, format);
        }
        catch (ArgumentException) when (telemetry.Rejected(LayerOperation.LowLatencyDispatch))
        {
            throw; // never reached: the filter counts the rejection and declines
        }
    }

    private DeviceDispatchInput ValidateDevice(DeviceTensor<BFloat16> x, DeviceTensor<int> expertIds, DeviceTensor<float>? weights, LowLatencyDispatchOptions format)
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        RequireDevice();
        try
        {
            return LowLatencyValidator.Dispatch(Config, x, expertIds, weights, format);
        }
        catch (ArgumentException) when (telemetry.Rejected(LayerOperation.LowLatencyDispatch))
        {
            throw; // never reached: the filter counts the rejection and declines
        }
    }

    private LowLatencyExpertOutput ValidateCombine(Tensor<BFloat16>? expertOutput, LowLatencyHandle handle, bool weighted)
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        try
        {
            ValidateHandle(handle, weighted);
            if (expertOutput is null)
            {
                return ZeroCopyExpertOutput.Instance;
            }

            LowLatencyValidator.ExpertOutput(Config, LowLatencyValidator.Lengths(expertOutput), nameof(expertOutput));

            // The backend reads rows as spans: a strided view is made dense once here.
            if (!expertOutput.IsDense)
            {
                BFloat16[] dense = new BFloat16[(int)expertOutput.FlattenedLength];
                expertOutput.FlattenTo(dense);
                expertOutput = View(dense);
            }

            return new HostExpertOutput(expertOutput);
        }
        catch (ArgumentException) when (telemetry.Rejected(LayerOperation.LowLatencyCombine))
        {
            throw; // never reached: the filter counts the rejection and declines
        }
    }

    private LowLatencyExpertOutput ValidateCombine(DeviceTensor<BFloat16>? expertOutput, LowLatencyHandle handle, bool weighted)
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        RequireDevice();
        try
        {
            ValidateHandle(handle, weighted);
            if (expertOutput is null)
            {
                return ZeroCopyExpertOutput.Instance;
            }

            LowLatencyValidator.ExpertOutput(Config, LowLatencyValidator.Lengths(expertOutput.Lengths), nameof(expertOutput));
            if (expertOutput.Pointer % 16 != 0)
            {
                throw new ArgumentException($"expertOutput must be 16-byte aligned; it is at 0x{expertOutput.Pointer:x}", nameof(expertOutput));
            }

            return new DeviceExpertOutput(expertOutput.Pointer);
        }
        catch (ArgumentException) when (telemetry.Rejected(LayerOperation.LowLatencyCombine))
        {
            throw; // never reached: the filter counts the rejection and declines
        }
    }

    private void ValidateHandle(LowLatencyHandle handle, bool weighted)
    {
        LowLatencyValidator.Combine(handle, weighted);
        if (!ReferenceEquals(handle.Owner, identity) || handle.Epoch != options.Epoch)
        {
            throw new ArgumentException("handle was produced by another layer (or an earlier incarnation of this one)", nameof(handle));
        }

        if (current is null || handle.Sequence != current.Sequence)
        {
            throw new ArgumentException($"handle is from step {handle.Sequence}, but this layer's latest dispatch is step {current?.Sequence ?? 0}: combine needs the handle of the latest dispatch", nameof(handle));
        }
    }

    private void RequireDevice()
    {
        if (!backend.HasDeviceBuffers)
        {
            throw new NotSupportedException($"the {backend.Name} backend has no device buffers: use the Tensor<T> overloads");
        }
    }

    private LowLatencyDispatchResult HostResult(LowLatencyReceived received)
    {
        HostReceived host = received as HostReceived
            ?? throw new InvalidOperationException($"the {backend.Name} backend returned {received.GetType().Name} for a host receive");
        int[] scaleLengths = [outputLengths[0], outputLengths[1], Config.Hidden / LowLatencyDispatchOptions.ScaleGroup];
        return new LowLatencyDispatchResult(
            host.Tokens is { } bf16 ? View(bf16) : null,
            host.Fp8Tokens is { } fp8 ? Tensor.Create(fp8, 0, [.. outputLengths.Select(l => (nint)l)], ReadOnlySpan<nint>.Empty) : null,
            host.Scales is { } scales ? Tensor.Create(scales, 0, [.. scaleLengths.Select(l => (nint)l)], ReadOnlySpan<nint>.Empty) : null,
            Tensor.Create(host.RowsPerExpert, 0, [host.RowsPerExpert.Length], ReadOnlySpan<nint>.Empty),
            current!);
    }

    private LowLatencyDeviceDispatchResult DeviceResult(LowLatencyReceived received)
    {
        DeviceReceived device = received as DeviceReceived
            ?? throw new InvalidOperationException($"the {backend.Name} backend returned {received.GetType().Name} for a device receive");
        int[] scaleLengths = [outputLengths[0], outputLengths[1], Config.Hidden / LowLatencyDispatchOptions.ScaleGroup];
        return new LowLatencyDeviceDispatchResult(
            device.Tokens != 0 ? new DeviceTensor<BFloat16>(device.Tokens, outputLengths, this) : null,
            device.Fp8Tokens != 0 ? new DeviceTensor<byte>(device.Fp8Tokens, outputLengths, this) : null,
            device.Scales != 0 ? new DeviceTensor<float>(device.Scales, scaleLengths, this) : null,
            new DeviceTensor<int>(device.RowsPerExpert, [Config.ExpertsPerRank], this),
            current!);
    }

    private Tensor<BFloat16> HostResult(LowLatencyCombined combined)
    {
        HostCombined host = combined as HostCombined
            ?? throw new InvalidOperationException($"the {backend.Name} backend returned {combined.GetType().Name} for a host combine");
        return Tensor.Create(host.Output, 0, [current!.TokenCount, Config.Hidden], ReadOnlySpan<nint>.Empty);
    }

    private DeviceTensor<BFloat16> DeviceResult(LowLatencyCombined combined, int tokens)
    {
        DeviceCombined device = combined as DeviceCombined
            ?? throw new InvalidOperationException($"the {backend.Name} backend returned {combined.GetType().Name} for a device combine");
        return new DeviceTensor<BFloat16>(device.Output, [tokens, Config.Hidden], this);
    }

    private Tensor<BFloat16> View(BFloat16[] buffer) =>
        Tensor.Create(buffer, 0, [outputLengths[0], outputLengths[1], outputLengths[2]], ReadOnlySpan<nint>.Empty);

    private PhaseClock NewClock() => new(Config.Rank, options.Observer, telemetry);

    /// <summary>
    /// Enters a call: not disposed, no call in flight on this layer, and (when <paramref name="expected"/> is given) the
    /// step at the right point of its order. A refusal changes nothing.
    /// </summary>
    private Guard Enter(LayerOperation? operation, StepState? expected, string call)
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        if (Interlocked.CompareExchange(ref busy, 1, 0) != 0)
        {
            throw new InvalidOperationException(
                $"rank {Config.Rank}: {call} while another call is in progress on this low-latency layer; calls on one layer must not overlap");
        }

        if (expected is { } want && state != want)
        {
            Volatile.Write(ref busy, 0);
            if (operation is { } op)
            {
                telemetry.Rejected(op);
            }

            throw new InvalidOperationException($"rank {Config.Rank}: {call} {OrderRule(want)}, but the layer {Where(state)}");
        }

        return new Guard(this);
    }

    private static string OrderRule(StepState want) => want switch
    {
        StepState.Idle => "starts a step, so it needs the previous step's combine receive to have completed",
        StepState.DispatchSent => "needs a dispatch send first",
        StepState.DispatchReceived => "needs the step's dispatch receive first",
        _ => "needs a combine send first",
    };

    private static string Where(StepState state) => state switch
    {
        StepState.Idle => "is between steps (next call: DispatchSend or DispatchAsync)",
        StepState.DispatchSent => "has sent its dispatch (next call: DispatchReceive)",
        StepState.DispatchReceived => "has received its dispatch (next call: CombineSend or CombineAsync)",
        _ => "has sent its combine (next call: CombineReceive)",
    };

    private readonly struct Guard(EpLowLatencyLayer layer) : IDisposable
    {
        public void Dispose() => Volatile.Write(ref layer.busy, 0);
    }
}

using System.Diagnostics;
using System.Numerics.Tensors;
using System.Runtime.InteropServices;
using EpA2A.Backends;
using EpA2A.Config;
using EpA2A.Errors;
using EpA2A.Numerics;
using EpA2A.Telemetry;
using EpA2A.Transport;

namespace EpA2A.Layer;

/// <summary>
/// One rank's expert-parallel all-to-all: <see cref="DispatchAsync{T}"/> sends each token to the ranks that
/// hold its experts, <see cref="CombineAsync{T}"/> brings the expert outputs back and sums them per token.
/// Every rank of the group calls the same operations in the same order. Inputs are validated before
/// anything is sent; every wait has the step deadline; a failed operation leaves the layer usable.
/// </summary>
public sealed partial class EpAll2AllLayer : IDisposable
{
    private readonly IDispatchCombineBackend backend;
    private readonly EpLayerOptions options;
    private readonly LayerTelemetry telemetry;
    private readonly object identity = new();
    private long sequence;
    private long lastDispatchSequence = -1;
    private int busy;
    private bool disposed;

    private EpAll2AllLayer(EpConfig config, IDispatchCombineBackend backend, EpLayerOptions options)
    {
        Config = config;
        this.backend = backend;
        this.options = options;
        Context = DispatchCombineContext.Create(config, options.Capacity);
        telemetry = new LayerTelemetry(config, backend.Name, options.LayerName, Context);
    }

    /// <summary>The layer's configuration.</summary>
    public EpConfig Config { get; }

    /// <summary>The buffers (and their growth count).</summary>
    public DispatchCombineContext Context { get; }

    /// <summary>The backend's name ("cpu", "cuda").</summary>
    public string BackendName => backend.Name;

    /// <summary>The layer's options.</summary>
    public EpLayerOptions Options => options;

    /// <summary>
    /// A layer on the backend <paramref name="backends"/> makes (the public entry points, CreateCpu and CreateCuda,
    /// live beside their backends): the options are checked here, the backend's own rules by the factory.
    /// </summary>
    internal static EpAll2AllLayer Create(EpConfig config, IEpBackendFactory backends, EpLayerOptions? options)
    {
        ArgumentNullException.ThrowIfNull(config);
        options ??= EpLayerOptions.Default;
        ValidateOptions(options);
        return new EpAll2AllLayer(config, backends.CreateDispatchCombine(config, options), options);
    }

    /// <summary>
    /// Sends each token to the ranks holding its experts.
    /// </summary>
    /// <param name="input">[n, Hidden] tokens, n ≤ MaxTokens, of the configured token type.</param>
    /// <param name="expertIds">[n, TopK] expert ids; NumExperts marks a dropped slot.</param>
    /// <param name="weights">Optional [n, TopK] routing weights (all ranks give them or none does).</param>
    /// <param name="scatterIndices">Optional [n, TopK] global output rows that fix the placement (all ranks or none).</param>
    /// <param name="cancellationToken">Cancels the wait; the step deadline applies regardless.</param>
    /// <returns>The received rows, their weights, and the layout combine needs.</returns>
    public async ValueTask<DispatchResult<T>> DispatchAsync<T>(
        Tensor<T> input,
        Tensor<int> expertIds,
        Tensor<float>? weights = null,
        Tensor<int>? scatterIndices = null,
        CancellationToken cancellationToken = default)
        where T : unmanaged
    {
        await CheckOrRejectAsync(
            LayerOperation.Dispatch,
            (input, expertIds, weights, scatterIndices),
            static (layer, a) => InputValidator.Dispatch(layer.Config, a.input, a.expertIds, a.weights, a.scatterIndices)).ConfigureAwait(false);

        // The tokens are copied once the layer is taken (into its staging buffer, which an overlapping call must not overwrite).
        return await DispatchHostAsync(input, (int)input.Lengths[0], ReadOnlyMemory<byte>.Empty, expertIds, weights, scatterIndices, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>
    /// <see cref="DispatchAsync{T}(Tensor{T}, Tensor{int}, Tensor{float}?, Tensor{int}?, CancellationToken)"/> from token
    /// rows already in host memory, row-major as the bytes of the token type (what a rank grain received from a client):
    /// the rows are read where they are, not copied first, so they must not change until this returns.
    /// </summary>
    /// <param name="tokenRows">[n, Hidden] of the configured token type, as bytes; n ≤ MaxTokens.</param>
    /// <param name="expertIds">[n, TopK] expert ids; NumExperts marks a dropped slot.</param>
    /// <param name="weights">Optional [n, TopK] routing weights (all ranks give them or none does).</param>
    /// <param name="scatterIndices">Optional [n, TopK] global output rows that fix the placement (all ranks or none).</param>
    /// <param name="cancellationToken">Cancels the wait; the step deadline applies regardless.</param>
    /// <returns>The received rows, their weights, and the layout combine needs.</returns>
    public async ValueTask<DispatchResult<T>> DispatchRowsAsync<T>(
        ReadOnlyMemory<byte> tokenRows,
        Tensor<int> expertIds,
        Tensor<float>? weights = null,
        Tensor<int>? scatterIndices = null,
        CancellationToken cancellationToken = default)
        where T : unmanaged
    {
        await CheckOrRejectAsync(
            LayerOperation.Dispatch,
            (bytes: tokenRows.Length, expertIds, weights, scatterIndices),
            static (layer, a) =>
            {
                int row = layer.Config.Hidden * layer.Config.TokenBytes;
                if (a.bytes % layer.Config.TokenBytes != 0)
                {
                    throw new ArgumentException($"tokenRows has {a.bytes} bytes, not whole elements of {layer.Config.TokenType} ({layer.Config.TokenBytes} bytes; rows of {row})", nameof(tokenRows));
                }

                InputValidator.DispatchRows<T>(layer.Config, a.bytes / layer.Config.TokenBytes, nameof(tokenRows), a.expertIds, a.weights, a.scatterIndices);
            }).ConfigureAwait(false);

        int n = tokenRows.Length / (Config.Hidden * Config.TokenBytes);
        return await DispatchHostAsync<T>(null, n, tokenRows, expertIds, weights, scatterIndices, cancellationToken).ConfigureAwait(false);
    }

    /// <summary>The host dispatch of <paramref name="n"/> validated tokens: <paramref name="input"/>'s, or else the bytes of <paramref name="tokens"/>.</summary>
    private async ValueTask<DispatchResult<T>> DispatchHostAsync<T>(Tensor<T>? input, int n, ReadOnlyMemory<byte> tokens, Tensor<int> expertIds, Tensor<float>? weights, Tensor<int>? scatterIndices, CancellationToken cancellationToken)
        where T : unmanaged
    {
        using ActiveOperation op = BeginTraced(LayerOperation.Dispatch, n, cancellationToken, out PhaseClock clock);
        if (input is not null)
        {
            int bytes = n * Config.Hidden * Config.TokenBytes;
            Memory<byte> staged = Context.HostStaging(bytes).AsMemory(0, bytes); // the layer's, reused: filled whole by the copy
            DenseTensor.CopyTo(input, MemoryMarshal.Cast<byte, T>(staged.Span));
            tokens = staged;
        }

        // From here on this dispatch may grow or overwrite the buffers an earlier layout's rows and weights live
        // in, so only its own layout is valid for combine, even if it fails.
        lastDispatchSequence = op.Operation.Sequence;

        DispatchStep step = new()
        {
            Operation = op.Operation,
            Context = Context,
            Inputs = new DispatchInputs.Host(
                n,
                tokens,
                Flatten(expertIds),
                weights is null ? null : Flatten(weights),
                scatterIndices is null ? null : Flatten(scatterIndices)),
        };

        try
        {
            (EpAllToAllLayout layout, int recv, clock) = await RunDispatchPhasesAsync(step, clock, tokens.Length).ConfigureAwait(false);
            Tensor<T> output = View(Context.Output<T>(), recv, Config.Hidden);
            Tensor<float>? outWeights = weights is null ? null : Vector(Context.WeightBuffer, recv);
            clock.Lap(Phase.DispatchPostprocess, n, 0);
            return new DispatchResult<T>(output, outWeights, layout);
        }
        catch (Exception e) when (op.Failed(e))
        {
            throw; // never reached: the filter counts the failure, marks the span and declines
        }
        finally
        {
            backend.Reset(options.Epoch, op.Operation.Sequence + 1);
        }
    }

    /// <summary>
    /// Brings expert outputs back to the tokens' ranks and sums them per token in fp32, rounding once.
    /// </summary>
    /// <param name="expertOutput">[layout.RecvRows, Hidden] expert outputs, rows in dispatch output order.</param>
    /// <param name="layout">The layout of this layer's latest dispatch.</param>
    /// <param name="options">Unweighted (default) or weighted by the routing weights.</param>
    /// <param name="cancellationToken">Cancels the wait; the step deadline applies regardless.</param>
    /// <returns>[n, Hidden]: for each dispatched token, the sum over its non-dropped top-k rows.</returns>
    public async ValueTask<Tensor<T>> CombineAsync<T>(
        Tensor<T> expertOutput,
        EpAllToAllLayout layout,
        CombineOptions? options = null,
        CancellationToken cancellationToken = default)
        where T : unmanaged
    {
        options ??= CombineOptions.Unweighted;
        await CheckOrRejectAsync(
            LayerOperation.Combine,
            (expertOutput, layout, options),
            static (layer, a) =>
            {
                InputValidator.Combine(layer.Config, a.expertOutput, a.layout, a.options);
                if (!ReferenceEquals(a.layout.Owner, layer.identity) || a.layout.Epoch != layer.options.Epoch)
                {
                    throw new ArgumentException("layout was produced by another layer (or an earlier incarnation of this one)", nameof(layout));
                }

                if (a.layout.DispatchSequence != layer.lastDispatchSequence)
                {
                    throw new ArgumentException($"layout is from operation {a.layout.DispatchSequence}, but this layer's latest dispatch is operation {layer.lastDispatchSequence}: combine needs the layout of the latest dispatch", nameof(layout));
                }
            }).ConfigureAwait(false);

        int n = layout.NumDispatchTokens;
        using ActiveOperation op = BeginTraced(LayerOperation.Combine, n, cancellationToken, out PhaseClock clock, stepNumber: layout.DispatchSequence);
        int rowBytes = layout.RecvRows * Config.Hidden * Config.TokenBytes;
        byte[] rows = Context.HostStaging(rowBytes); // the layer's, reused: the copy fills the bytes this combine reads
        DenseTensor.CopyTo(expertOutput, MemoryMarshal.Cast<byte, T>(rows.AsSpan(0, rowBytes)));
        CombineStep step = new()
        {
            Operation = op.Operation,
            Context = Context,
            Layout = layout,
            Inputs = new CombineInputs.Host(rows, Context.WeightBuffer),
            Weighted = options.Weighted,
        };
        try
        {
            await backend.CopyInAsync(step).ConfigureAwait(false);
            clock.Lap(Phase.CombineCopyIn, n, rowBytes);
            CombinedRows withinNode = await backend.CombineWithinNodeAsync(step).ConfigureAwait(false);
            clock.Lap(Phase.CombineKernel, n, rowBytes);
            CombinedRows combined = await backend.CombineAcrossNodesAsync(step, withinNode).ConfigureAwait(false);
            T[] result = GC.AllocateUninitializedArray<T>(n * Config.Hidden); // filled whole below
            switch (combined)
            {
                case CombinedRows.HostSums sums:
                    TokenRows.Narrow<T>(sums.Sums.Span, result);
                    break;
                case CombinedRows.HostRounded rounded:
                    MemoryMarshal.Cast<byte, T>(rounded.Rows).CopyTo(result);
                    break;
                default:
                    throw new InvalidOperationException($"the {backend.Name} backend returned {combined} for a host combine");
            }

            clock.Lap(Phase.CombineCrossNodeReduce, n, (long)n * Config.Hidden * Config.TokenBytes);
            return Tensor.Create(result, [n, Config.Hidden]);
        }
        catch (Exception e) when (op.Failed(e))
        {
            throw; // never reached: the filter counts the failure, marks the span and declines
        }
        finally
        {
            backend.Reset(this.options.Epoch, op.Operation.Sequence + 1);
        }
    }

    /// <summary>Every rank of the group (or of this node) arrives before any returns; bounded by the step deadline.</summary>
    public async ValueTask BarrierAllAsync(bool intraNodeOnly = false, CancellationToken cancellationToken = default)
    {
        using ActiveOperation op = BeginTraced(LayerOperation.Barrier, 0, cancellationToken, out PhaseClock clock);
        try
        {
            await backend.BarrierAsync(op.Operation, intraNodeOnly).ConfigureAwait(false);
            clock.Lap(Phase.Barrier, 0, 0);
        }
        catch (Exception e) when (op.Failed(e))
        {
            throw; // never reached: the filter counts the failure, marks the span and declines
        }
        finally
        {
            backend.Reset(options.Epoch, op.Operation.Sequence + 1);
        }
    }

    /// <summary>
    /// Dispatch from device buffers (CUDA backend; the in-process hot path): no host copies. Shapes and element types
    /// are checked here; ids and scatter indices are device data that the kernels bounds-check.
    /// </summary>
    /// <returns>Device views of the layer's output rows and weights (valid until the next dispatch), and the layout.</returns>
    /// <exception cref="NotSupportedException">The backend has no device buffers (CPU).</exception>
    public async ValueTask<DeviceDispatchResult<T>> DispatchOnDeviceAsync<T>(
        DeviceTensor<T> input,
        DeviceTensor<int> expertIds,
        DeviceTensor<float>? weights = null,
        DeviceTensor<int>? scatterIndices = null,
        CancellationToken cancellationToken = default)
        where T : unmanaged
    {
        await CheckOrRejectAsync(
            LayerOperation.Dispatch,
            (input, expertIds, weights, scatterIndices),
            static (layer, a) =>
            {
                layer.DeviceBackend();
                DeviceTensorValidator.Dispatch(layer.Config, a.input, a.expertIds, a.weights, a.scatterIndices);
            }).ConfigureAwait(false);

        IDeviceDispatchCombineBackend device = DeviceBackend();
        int n = input.Lengths[0];
        using ActiveOperation op = BeginTraced(LayerOperation.Dispatch, n, cancellationToken, out PhaseClock clock);
        lastDispatchSequence = op.Operation.Sequence;
        DispatchStep step = new()
        {
            Operation = op.Operation,
            Context = Context,
            Inputs = new DispatchInputs.Device(n, input.Pointer, expertIds.Pointer, weights?.Pointer ?? 0, scatterIndices?.Pointer ?? 0),
        };

        try
        {
            (EpAllToAllLayout layout, int recv, clock) = await RunDispatchPhasesAsync(step, clock, 0).ConfigureAwait(false);
            DeviceTensor<T> output = new(device.DeviceOutput, [recv, Config.Hidden], this);
            DeviceTensor<float>? outWeights = weights is null ? null : new(device.DeviceWeights, [recv], this);
            clock.Lap(Phase.DispatchPostprocess, n, 0);
            return new DeviceDispatchResult<T>(output, outWeights, layout);
        }
        catch (Exception e) when (op.Failed(e))
        {
            throw; // never reached: the filter counts the failure, marks the span and declines
        }
        finally
        {
            backend.Reset(options.Epoch, op.Operation.Sequence + 1);
        }
    }

    /// <summary>
    /// Combine from device buffers (CUDA backend): expert outputs [layout.RecvRows, Hidden] on the device (the
    /// dispatch output itself is fine) to a device result [n, Hidden] that the layer owns, valid until the next combine.
    /// </summary>
    /// <exception cref="NotSupportedException">The backend has no device buffers (CPU).</exception>
    public async ValueTask<DeviceTensor<T>> CombineOnDeviceAsync<T>(
        DeviceTensor<T> expertOutput,
        EpAllToAllLayout layout,
        CombineOptions? options = null,
        CancellationToken cancellationToken = default)
        where T : unmanaged
    {
        options ??= CombineOptions.Unweighted;
        await CheckOrRejectAsync(
            LayerOperation.Combine,
            (expertOutput, layout, options),
            static (layer, a) =>
            {
                layer.DeviceBackend();
                DeviceTensorValidator.Combine(layer.Config, a.expertOutput, a.layout, a.options);
                if (!ReferenceEquals(a.layout.Owner, layer.identity) || a.layout.Epoch != layer.options.Epoch || a.layout.DispatchSequence != layer.lastDispatchSequence)
                {
                    throw new ArgumentException($"layout is not the one of this layer's latest dispatch (operation {layer.lastDispatchSequence}): combine needs the layout of the latest dispatch", nameof(layout));
                }
            }).ConfigureAwait(false);

        int n = layout.NumDispatchTokens;
        using ActiveOperation op = BeginTraced(LayerOperation.Combine, n, cancellationToken, out PhaseClock clock, stepNumber: layout.DispatchSequence);
        CombineStep step = new()
        {
            Operation = op.Operation,
            Layout = layout,
            Context = Context,
            Inputs = new CombineInputs.Device(expertOutput.Pointer),
            Weighted = options.Weighted,
        };
        try
        {
            await backend.CopyInAsync(step).ConfigureAwait(false);
            clock.Lap(Phase.CombineCopyIn, n, 0);
            CombinedRows withinNode = await backend.CombineWithinNodeAsync(step).ConfigureAwait(false);
            clock.Lap(Phase.CombineKernel, n, expertOutput.ByteLength);
            CombinedRows combined = await backend.CombineAcrossNodesAsync(step, withinNode).ConfigureAwait(false);
            clock.Lap(Phase.CombineCrossNodeReduce, n, (long)n * Config.Hidden * Config.TokenBytes);
            nint rows = combined is CombinedRows.Device device
                ? device.Rows
                : throw new InvalidOperationException($"the {backend.Name} backend returned {combined} for a device combine");
            return new DeviceTensor<T>(rows, [n, Config.Hidden], this);
        }
        catch (Exception e) when (op.Failed(e))
        {
            throw; // never reached: the filter counts the failure, marks the span and declines
        }
        finally
        {
            backend.Reset(this.options.Epoch, op.Operation.Sequence + 1);
        }
    }

    /// <summary>
    /// Captures one dispatch of <paramref name="input"/> and one combine as two CUDA graphs (CUDA backend, a layer
    /// created with <see cref="EpLayerOptions.FixedCapacity"/>). Collective like a step: every rank captures together,
    /// and afterwards every rank replays in the same order. Capturing enqueues nothing; each replay runs the whole
    /// step on the device with no host wait between its kernels. The graphs replay the same buffers and token count.
    /// </summary>
    /// <param name="input">Tokens [n, Hidden] on the device.</param>
    /// <param name="expertIds">Expert ids [n, TopK] on the device.</param>
    /// <param name="weights">Routing weights [n, TopK] on the device, or null.</param>
    /// <param name="expertOutput">The experts' rows on the device (at least the received rows, 16-byte aligned), or null when the experts write in place into <see cref="EpStepGraph{T}.DispatchOutput"/>.</param>
    /// <param name="options">Weighted or not.</param>
    /// <exception cref="NotSupportedException">The backend cannot capture graphs (CPU), or the layer is not fixed-capacity.</exception>
    public async ValueTask<EpStepGraph<T>> CaptureStepGraphAsync<T>(
        DeviceTensor<T> input,
        DeviceTensor<int> expertIds,
        DeviceTensor<float>? weights = null,
        DeviceTensor<T>? expertOutput = null,
        CombineOptions? options = null)
        where T : unmanaged
    {
        options ??= CombineOptions.Unweighted;
        ObjectDisposedException.ThrowIf(disposed, this);
        IGraphCaptureBackend graphs = backend as IGraphCaptureBackend
            ?? throw new NotSupportedException($"the {backend.Name} backend cannot capture CUDA graphs");
        if (!this.options.FixedCapacity)
        {
            throw new NotSupportedException("graph capture needs a layer created with EpLayerOptions.FixedCapacity (otherwise the host sizes the buffers between the kernels)");
        }

        DeviceTensorValidator.Dispatch(Config, input, expertIds, weights, null);
        if (options.Weighted && weights is null)
        {
            throw new ArgumentException("a weighted combine needs routing weights at dispatch", nameof(options));
        }

        if (expertOutput is not null && (expertOutput.Rank != 2 || expertOutput.Lengths[1] != Config.Hidden || expertOutput.Pointer % 16 != 0))
        {
            throw new ArgumentException($"expertOutput must be a 16-byte aligned [rows, {Config.Hidden}] device tensor; got {expertOutput}", nameof(expertOutput));
        }

        int n = input.Lengths[0];
        DispatchInputs.Device inputs = new(n, input.Pointer, expertIds.Pointer, weights?.Pointer ?? 0, 0);
        using ActiveOperation op = BeginUntraced();
        CapturedStep captured = await graphs.CaptureAsync(inputs, expertOutput?.Pointer ?? 0, options.Weighted, op.Operation).ConfigureAwait(false);
        return new EpStepGraph<T>(this, graphs, captured, n);
    }

    /// <summary>Runs one replay of <paramref name="graph"/> under the layer's guard (no other operation may overlap).</summary>
    internal async ValueTask<GraphReplay> ReplayAsync(IGraphCaptureBackend graphs, CapturedStep captured, bool dispatch, bool combine)
    {
        using ActiveOperation op = BeginUntraced();
        return await graphs.ReplayAsync(captured, dispatch, combine, op.Operation).ConfigureAwait(false);
    }

    /// <summary>
    /// After a failed operation (deadline, abort), brings the group back to a clean state. Collective on the CUDA
    /// backend: every rank calls it together (libepa2a's reset waits in an NVSHMEM barrier without a deadline, so
    /// the coordinator calls it only once every rank is known to be there); a no-op on the CPU backend.
    /// </summary>
    public async ValueTask RecoverAsync()
    {
        using Guard guard = Enter();
        await backend.RecoverAsync().ConfigureAwait(false);
    }

    /// <summary>Releases every buffer (the original's finalize). Later calls throw <see cref="ObjectDisposedException"/>.</summary>
    public void Dispose()
    {
        if (disposed)
        {
            return;
        }

        disposed = true;
        backend.Dispose();
    }

    /// <summary>
    /// A call of a collective operation whose input was rejected still is this rank's turn in the group's sequence of
    /// operations: the rank takes the operation's number, so the next operation lines up with its peers', and tells
    /// the peers at once (the backend sends an abort naming this rank where they wait for it), so they fail within
    /// milliseconds instead of at the deadline. A call that overlaps an operation in flight takes nothing: that
    /// operation holds the number. Telling the peers is best effort: the caller gets its
    /// <see cref="ArgumentException"/> in any case, and a peer that was not told fails at its deadline.
    /// </summary>
    private async ValueTask RejectAsync(LayerOperation kind, ArgumentException error)
    {
        telemetry.Rejected(kind);
        if (disposed || Interlocked.CompareExchange(ref busy, 1, 0) != 0)
        {
            return;
        }

        try
        {
            using OperationScope scope = NewOperation(CancellationToken.None);
            if (kind == LayerOperation.Dispatch)
            {
                lastDispatchSequence = scope.Operation.Sequence; // as on the peers: no earlier layout is valid for combine
            }

            try
            {
                await backend.RejectAsync(scope.Operation, kind == LayerOperation.Dispatch, $"rank {Config.Rank} rejected its input: {error.Message}").ConfigureAwait(false);
            }
            catch (Exception e) when (e is OperationCanceledException or EpA2A.Errors.EpStepFailedException or InvalidOperationException or IOException or TimeoutException)
            {
                // A peer that cannot be told fails at its own deadline, as it would have anyway.
            }
            finally
            {
                backend.Reset(options.Epoch, scope.Operation.Sequence + 1);
            }
        }
        finally
        {
            Volatile.Write(ref busy, 0);
        }
    }

    private IDeviceDispatchCombineBackend DeviceBackend() => backend as IDeviceDispatchCombineBackend
        ?? throw new NotSupportedException($"the {backend.Name} backend has no device buffers: use the Tensor<T> overloads");

    private static void ValidateOptions(EpLayerOptions options)
    {
        if (options.StepTimeout <= TimeSpan.Zero || options.StepTimeout > TimeSpan.FromHours(1))
        {
            throw new ArgumentException($"EpLayerOptions.StepTimeout = {options.StepTimeout} must be in (0, 1 h]", nameof(options));
        }

        if (options.Capacity < 1)
        {
            throw new ArgumentException($"EpLayerOptions.Capacity = {options.Capacity} must be at least 1", nameof(options));
        }
    }

    /// <summary>
    /// The first rows of a buffer as a dense [rows, columns] tensor, without a copy. Strides are left to the
    /// library: System.Numerics.Tensors 10.0 rejects explicit strides on length-1 and empty dimensions.
    /// </summary>
    private static Tensor<TElement> View<TElement>(TElement[] buffer, int rows, int columns) =>
        Tensor.Create(buffer, 0, [rows, columns], ReadOnlySpan<nint>.Empty);

    private static Tensor<float> Vector(float[] buffer, int length) =>
        Tensor.Create(buffer, 0, [length], ReadOnlySpan<nint>.Empty);

    private static TElement[] Flatten<TElement>(Tensor<TElement> tensor) => DenseTensor.ToArray(tensor);

    /// <summary>
    /// A rank's dispatch output lives in one host array (the CPU backend's buffer, the CUDA backend's download target),
    /// so its bytes are bounded by <see cref="EpConfig.MaxOutputBytes"/>. Every rank sees the same table, so every rank
    /// refuses the same step here, before any growth or send: the layer stays usable for the next step.
    /// </summary>
    private void ThrowIfOutputTooLarge(IRoutingPlan plan)
    {
        long rowBytes = (long)Config.Hidden * Config.TokenBytes;
        if ((long)plan.MaxRecvRows * rowBytes <= EpConfig.MaxOutputBytes)
        {
            return;
        }

        int worst = Enumerable.Range(0, Config.WorldSize).MaxBy(plan.RecvRows);
        throw new EpStepFailedException(
            $"rank {worst} would receive {plan.RecvRows(worst)} rows of Hidden = {Config.Hidden} {Config.TokenType} ({(long)plan.RecvRows(worst) * rowBytes} bytes); a rank's dispatch output holds at most {EpConfig.MaxOutputBytes} bytes ({Config.MaxOutputRows} rows): send fewer tokens per step or spread the hot experts",
            worst);
    }

    /// <summary>
    /// The phases every dispatch runs, whether its inputs are host tensors or device buffers: copy-in,
    /// preprocess (counts exchange), output-size wait with collective growth, the dispatch kernel, and the layout.
    /// Returns the clock so the caller's postprocess lap follows on.
    /// </summary>
    private async ValueTask<(EpAllToAllLayout Layout, int Recv, PhaseClock Clock)> RunDispatchPhasesAsync(DispatchStep step, PhaseClock clock, long copyInBytes)
    {
        int n = step.TokenCount;
        await backend.CopyInAsync(step).ConfigureAwait(false);
        clock.Lap(Phase.DispatchCopyIn, n, copyInBytes);
        ExchangedCounts counts = await backend.ExchangeCountsAsync(step).ConfigureAwait(false);
        IRoutingPlan plan = counts.Plan;
        clock.Lap(Phase.DispatchPreprocess, n, 4L * Config.NumExperts * Config.WorldSize);

        ThrowIfOutputTooLarge(plan);
        await EnsureOutputRowsAsync(step, plan.MaxRecvRows, counts.SmallestOutputRows).ConfigureAwait(false);
        clock.Lap(Phase.DispatchOutputSizeWait, n, 0);

        DispatchedRows dispatched = await backend.DispatchTokensAsync(step, plan).ConfigureAwait(false);
        int recv = plan.RecvRows(Config.Rank);
        clock.Lap(Phase.DispatchKernel, n, (long)recv * Config.Hidden * Config.TokenBytes);

        EpAllToAllLayout layout = BuildLayout(step, plan, dispatched, recv);
        telemetry.Received(layout);
        return (layout, recv, clock);
    }

    /// <summary>
    /// Sizes the outputs for <paramref name="neededRows"/> (the largest receive of any rank), by the one growth policy.
    /// Every rank derives the same maximum from the same table, so growth is collective. The same table is not
    /// enough, though: a rank that arrives after its peers gave up the step still completes the counts exchange
    /// (what they sent before giving up reached it) and would grow alone, which on the CUDA backend's symmetric
    /// buffers waits forever in NVSHMEM. So before growing every rank confirms it is in this step, at a barrier
    /// with the step's deadline: a late rank times out there, naming the ranks that left. Steps that fit skip it.
    /// </summary>
    private async ValueTask EnsureOutputRowsAsync(DispatchStep step, int neededRows, int groupRows)
    {
        bool groupGrows = OutputGrowthPolicy.MustGrow(groupRows, neededRows);
        if (groupGrows)
        {
            await backend.BarrierAsync(step.Operation, intraNodeOnly: false).ConfigureAwait(false);
        }

        if (step.Inputs is DispatchInputs.Host)
        {
            Context.ReallocateDispatchOutput(neededRows); // the host copies the Tensor API returns
        }

        if (groupGrows)
        {
            await backend.GrowOutputAsync(step, Context.Growth.RowsFor(neededRows)).ConfigureAwait(false);
        }
    }

    private EpAllToAllLayout BuildLayout(DispatchStep step, IRoutingPlan plan, DispatchedRows dispatched, int recv)
    {
        int epr = Config.ExpertsPerRank;
        int[] rowsPerExpert = new int[epr];
        int[] starts = new int[epr];
        int[] padded = new int[epr];
        for (int j = 0; j < epr; j++)
        {
            rowsPerExpert[j] = plan.ExpertRows(Config.Rank, j);
            starts[j] = plan.ExpertStart(Config.Rank, j);
            padded[j] = (j + 1 < epr ? plan.ExpertStart(Config.Rank, j + 1) : recv) - starts[j];
        }

        // On the device path the per-slot arrays stay on the device: the layout's are empty (weights: empty but
        // present, so the layout still tells a weighted combine that dispatch had them).
        DispatchInputs.Host? host = step.Inputs as DispatchInputs.Host;
        int[] ids = host?.ExpertIds ?? [];
        float[]? weights = host is not null ? host.Weights : step.Inputs.HasWeights ? [] : null;

        return new EpAllToAllLayout(
            identity,
            options.Epoch,
            step.Operation.Sequence,
            step.TokenCount,
            [.. plan.TokensPerRank],
            ids,
            dispatched.GlobalScatter,
            recv,
            rowsPerExpert,
            starts,
            padded,
            dispatched.Origins,
            weights);
    }

    /// <summary>
    /// The argument checks of a collective operation: the layer is not disposed, then <paramref name="check"/> runs; an
    /// <see cref="ArgumentException"/> from it is rethrown after the call took its turn (see <see cref="RejectAsync"/>).
    /// The check is a static lambda over <paramref name="arguments"/>, so a call allocates no closure.
    /// </summary>
    private async ValueTask CheckOrRejectAsync<TArguments>(LayerOperation kind, TArguments arguments, Action<EpAll2AllLayer, TArguments> check)
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        try
        {
            check(this, arguments);
        }
        catch (ArgumentException e)
        {
            await RejectAsync(kind, e).ConfigureAwait(false);
            throw;
        }
    }

    /// <summary>
    /// Opens a traced operation: takes the layer (no overlap), the next operation number with its deadline, the
    /// operation's span (step <paramref name="stepNumber"/>, by default the operation's own number), and then the clock,
    /// so every phase span lies inside the operation's span.
    /// </summary>
    private ActiveOperation BeginTraced(LayerOperation kind, long tokens, CancellationToken cancellationToken, out PhaseClock clock, long? stepNumber = null)
    {
        Guard guard = Enter();
        OperationScope? scope = null;
        try
        {
            scope = NewOperation(cancellationToken);
            OperationTrace trace = telemetry.Begin(kind, stepNumber ?? scope.Operation.Sequence, tokens);
            clock = NewClock();
            return new ActiveOperation(guard, scope, trace);
        }
        catch
        {
            scope?.Dispose();
            guard.Dispose();
            throw;
        }
    }

    /// <summary>Opens an operation without a span or clock (graph capture and replay): the layer, a number, a deadline, no caller token.</summary>
    private ActiveOperation BeginUntraced()
    {
        Guard guard = Enter();
        try
        {
            return new ActiveOperation(guard, NewOperation(CancellationToken.None), trace: null);
        }
        catch
        {
            guard.Dispose();
            throw;
        }
    }

    private Guard Enter()
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        if (Interlocked.CompareExchange(ref busy, 1, 0) != 0)
        {
            throw new InvalidOperationException(
                $"rank {Config.Rank}: a dispatch, combine or barrier is already in progress on this layer; operations on one layer must not overlap");
        }

        return new Guard(this);
    }

    private OperationScope NewOperation(CancellationToken cancellationToken)
    {
        long seq = ++sequence;
        return new OperationScope(Config, options.Epoch, options.StepTimeout, seq, cancellationToken);
    }

    private PhaseClock NewClock() => new(Config.Rank, options.Observer, telemetry);

    private readonly struct Guard(EpAll2AllLayer layer) : IDisposable
    {
        public void Dispose() => Volatile.Write(ref layer.busy, 0);
    }

    /// <summary>
    /// An operation in progress: the layer's guard, the operation's number and deadline, and its span when traced.
    /// Disposing ends them in reverse order: the span, the deadline, then the guard.
    /// </summary>
    private readonly struct ActiveOperation(Guard guard, OperationScope scope, OperationTrace? trace) : IDisposable
    {
        public OperationContext Operation => scope.Operation;

        /// <summary>Records the failure on the operation's span and counter. Returns false, so it can be an exception filter.</summary>
        public bool Failed(Exception error) => trace is { } t && t.Failed(error);

        public void Dispose()
        {
            trace?.Dispose();
            scope.Dispose();
            guard.Dispose();
        }
    }
}

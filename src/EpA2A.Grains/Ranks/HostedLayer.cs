using System.Diagnostics;
using System.Numerics.Tensors;
using System.Runtime.InteropServices;
using EpA2A.Config;
using EpA2A.Errors;
using EpA2A.Experts;
using EpA2A.Layer;
using EpA2A.LowLatency;
using EpA2A.Numerics;
using EpA2A.Telemetry;
using EpA2A.Transport;

namespace EpA2A.Grains.Ranks;

/// <summary>
/// One layer hosted by a rank's silo: its <see cref="EpAll2AllLayer"/> (or, for a spec in low-latency mode, its
/// <see cref="EpLowLatencyLayer"/>), the mailbox its peers deliver into,
/// the inputs a client staged for a step, and the step's combined output until the client has read it.
/// </summary>
internal sealed class HostedLayer : IDisposable
{
    private readonly MessageAssembler assembler;
    private readonly Lock gate = new();
    private StagedInput? staged;

    /// <summary>The last step that ran here: the coordinator numbers a layer's steps upwards, so no input of it or of an earlier one is taken again.</summary>
    private long ranThrough;
    private readonly Dictionary<long, UnreadOutput> outputs = [];
    private CancellationTokenSource? running;
    private bool aborted;

    public HostedLayer(string name, LayerSpec spec, long epoch, EpConfig config, Func<EpConfig, EpLayerOptions, RankMailbox, EpAll2AllLayer> create, int? groupRank = null, MaskedWorld? world = null)
        : this(name, spec, epoch, config, create, createLowLatency: null, groupRank, world)
    {
    }

    public HostedLayer(
        string name,
        LayerSpec spec,
        long epoch,
        EpConfig config,
        Func<EpConfig, EpLayerOptions, RankMailbox, EpAll2AllLayer> create,
        Func<EpConfig, EpLowLatencyOptions, RankMailbox, EpLowLatencyLayer>? createLowLatency,
        int? groupRank = null,
        MaskedWorld? world = null)
    {
        GroupRank = groupRank ?? config.Rank;
        World = world;
        Name = name;
        Spec = spec;
        Epoch = epoch;
        Config = config;
        Mailbox = new RankMailbox();
        assembler = new MessageAssembler(config, Mailbox);
        if (spec.Mode == LayerMode.LowLatency)
        {
            Func<EpConfig, EpLowLatencyOptions, RankMailbox, EpLowLatencyLayer> make = createLowLatency
                ?? throw new NotSupportedException($"layer '{name}': this rank cannot host low-latency layers");
            LowLatencyLayer = make(config, new EpLowLatencyOptions { StepTimeout = spec.StepTimeout, Epoch = epoch, Observer = Phases, LayerName = name, NumSms = spec.NumSms }, Mailbox);
        }
        else
        {
            Layer = create(config, new EpLayerOptions { StepTimeout = spec.StepTimeout, Epoch = epoch, Observer = Phases, LayerName = name }, Mailbox);
        }
    }

    public string Name { get; }

    /// <summary>The rank of the group this silo serves (<see cref="Config"/>.Rank is the layer's, which differs in a masked group).</summary>
    public int GroupRank { get; }

    /// <summary>The survivors this layer runs on while ranks are masked, or null for the whole group.</summary>
    public MaskedWorld? World { get; }

    public LayerSpec Spec { get; }

    public long Epoch { get; }

    public EpConfig Config { get; }

    public RankMailbox Mailbox { get; }

    /// <summary>The normal layer (null in low-latency mode).</summary>
    public EpAll2AllLayer? Layer { get; }

    /// <summary>The low-latency layer (null in normal mode).</summary>
    public EpLowLatencyLayer? LowLatencyLayer { get; }

    public PhaseRecorder Phases { get; } = new();

    /// <summary>
    /// Stores a chunk; a message whose chunks are all in goes to the mailbox. A chunk of another epoch (a late
    /// message of an earlier incarnation of the group) is dropped before anything is allocated; a malformed one
    /// is an <see cref="InvalidDataException"/> (see <see cref="MessageAssembler"/>).
    /// </summary>
    public void Deliver(TransportChunk chunk)
    {
        ArgumentNullException.ThrowIfNull(chunk);
        if (chunk.Epoch != Epoch)
        {
            return; // nobody waits for it any more
        }

        assembler.Deliver(chunk);
    }

    public void BeginInput(StepInputHeader header)
    {
        if (header.Epoch != 0 && header.Epoch != Epoch)
        {
            throw new InvalidOperationException($"rank {GroupRank}: step {header.Step} belongs to epoch {header.Epoch}, but layer '{Name}' was formed anew (epoch {Epoch}, re-configured or re-formed after a failure): its input is refused; begin a new step");
        }

        if (header.Tokens < 0 || header.Tokens > Config.MaxTokens)
        {
            throw new ArgumentException($"rank {GroupRank}: step {header.Step} announces {header.Tokens} tokens; a rank dispatches 0 to MaxTokens = {Config.MaxTokens}", nameof(header));
        }

        lock (gate)
        {
            ThrowIfRan(header.Step);
            if (staged?.Header != header)
            {
                // The same header again is the client asking again (its answer was lost): the chunks already in stay.
                staged = new StagedInput(header, Config);
            }
        }
    }

    public void Stage(long step, InputPart part, int offset, byte[] data)
    {
        lock (gate)
        {
            ThrowIfRan(step);
            if (staged is null || staged.Header.Step != step)
            {
                throw new InvalidOperationException($"rank {GroupRank}: input for step {step} arrived before its header");
            }

            staged.Add(part, offset, data);
        }
    }

    /// <summary>
    /// A late repeat of a staging call (the client asked again, and an earlier ask was answered and the step has run) must
    /// not leave an input behind for a step that is over.
    /// </summary>
    private void ThrowIfRan(long step)
    {
        if (step <= ranThrough)
        {
            throw new InvalidOperationException($"rank {GroupRank}: input for step {step} arrived after step {ranThrough} ran on layer '{Name}': a late repeat, refused");
        }
    }

    /// <summary>
    /// A step's whole input in one message: the header as <see cref="BeginInput"/> takes it, then each part that has
    /// bytes as one <see cref="Stage"/> at offset 0 (so every check of the chunked path applies). A part the wire
    /// delivered as an array of its own is kept as it is, not copied. Sent again for the same step (the client asks
    /// again when an answer is lost), it is the same input: the header is kept and each part is taken as already staged.
    /// </summary>
    public void StageWhole(StepInput input)
    {
        ArgumentNullException.ThrowIfNull(input);
        ArgumentNullException.ThrowIfNull(input.Header, nameof(input));
        BeginInput(input.Header);
        long step = input.Header.Step;
        StagePart(step, InputPart.Tokens, input.Tokens);
        StagePart(step, InputPart.ExpertIds, input.ExpertIds);
        StagePart(step, InputPart.Weights, input.Weights);
        StagePart(step, InputPart.ScatterIndices, input.ScatterIndices);
    }

    private void StagePart(long step, InputPart part, ReadOnlyMemory<byte> bytes)
    {
        if (bytes.IsEmpty)
        {
            return; // an absent part, or one of no bytes: the run's completeness check tells which is missing
        }

        bool own = MemoryMarshal.TryGetArray(bytes, out ArraySegment<byte> segment) && segment.Offset == 0 && segment.Count == segment.Array!.Length;
        Stage(step, part, 0, own ? segment.Array! : bytes.ToArray());
    }

    /// <summary>
    /// A slice of a step's combined output. Outputs are kept per step until every byte was read and a later step has
    /// run (so another client's step cannot replace one before its client has it), and at most
    /// <see cref="MaxUnreadOutputs"/> steps or <see cref="UnreadOutputLifetime"/> beyond the step bound; an output given
    /// up that way is named when asked for. A rank that dispatched no token has an empty output, which reads as an
    /// empty slice until a later step runs.
    /// </summary>
    public byte[] ReadOutput(long step, int offset, int count)
    {
        lock (gate)
        {
            if (!outputs.TryGetValue(step, out UnreadOutput? o))
            {
                throw new InvalidOperationException($"rank {GroupRank}: no combined output for step {step} (never run here, already read, or given up unread after {MaxUnreadOutputs} later steps or {OutputBound.TotalSeconds:0.#} s)");
            }

            if (offset < 0 || count < 0 || (long)offset + count > o.Bytes.Length)
            {
                throw new ArgumentOutOfRangeException(nameof(offset), $"slice [{offset}, {(long)offset + count}) is outside the {o.Bytes.Length}-byte output");
            }

            if (o.Slices.Add((offset, count)))
            {
                o.Read += count; // a slice asked for again (its answer was lost) counts once
            }

            // The whole output (one chunk) goes out as it is: it is never written after the step, and crosses as Immutable.
            return offset == 0 && count == o.Bytes.Length ? o.Bytes : o.Bytes[offset..(offset + count)];
        }
    }

    /// <summary>Unread outputs kept per layer, at most (steps of a layer do not overlap, so one or two is the norm).</summary>
    internal const int MaxUnreadOutputs = 8;

    /// <summary>How long an unread output outlives the step bound.</summary>
    internal static readonly TimeSpan UnreadOutputLifetime = TimeSpan.FromSeconds(30);

    private TimeSpan OutputBound => (Spec.StepTimeout * 2) + TimeSpan.FromSeconds(1) + UnreadOutputLifetime;

    private void KeepOutput(long step, byte[] bytes)
    {
        long now = Stopwatch.GetTimestamp();
        foreach (long stale in outputs.Where(o => o.Value.Read >= o.Value.Bytes.Length || Stopwatch.GetElapsedTime(o.Value.Stored, now) > OutputBound).Select(o => o.Key).ToArray())
        {
            outputs.Remove(stale);
        }

        while (outputs.Count >= MaxUnreadOutputs)
        {
            outputs.Remove(outputs.Keys.Min());
        }

        outputs[step] = new UnreadOutput(bytes, now);
    }

    private sealed class UnreadOutput(byte[] bytes, long stored)
    {
        public byte[] Bytes { get; } = bytes;

        public long Stored { get; } = stored;

        public long Read { get; set; }

        /// <summary>The slices read so far.</summary>
        public HashSet<(int Offset, int Count)> Slices { get; } = [];
    }

    /// <summary>
    /// Ends the running step at once. An aborted layer runs no further step: the coordinator aborts only failed
    /// steps and re-forms the group (a new layer) before the next, so an abort that arrives before its step has
    /// started must still end that step.
    /// </summary>
    public void Abort()
    {
        lock (gate)
        {
            aborted = true;
            running?.Cancel();
        }
    }

    /// <summary>
    /// Dispatch, experts, combine; runs off the Orleans scheduler. Traced as "epa2a.rank.step", a child of the
    /// coordinator's grain call (Orleans activity propagation), and the parent of the layer's spans.
    /// </summary>
    public async Task<RankStepReport> RunStepAsync(StepTicket ticket, bool weighted, IExpertCompute compute)
    {
        using Activity? span = EpTelemetry.Source.StartActivity("epa2a.rank.step");
        span?.SetTag(EpTelemetry.Tags.SpanRank, GroupRank);
        span?.SetTag(EpTelemetry.Tags.SpanLayer, Name);
        span?.SetTag(EpTelemetry.Tags.SpanStep, ticket.Step);
        span?.SetTag(EpTelemetry.Tags.SpanEpoch, ticket.Epoch);
        RankStepReport report = await RunStepCoreAsync(ticket, weighted, compute).ConfigureAwait(false);
        if (span is not null)
        {
            span.SetTag(EpTelemetry.Tags.SpanRows, report.ReceivedRows);
            if (!report.Succeeded)
            {
                span.SetStatus(ActivityStatusCode.Error, report.Error);
            }
        }

        return report;
    }

    private async Task<RankStepReport> RunStepCoreAsync(StepTicket ticket, bool weighted, IExpertCompute compute)
    {
        StagedInput input;
        using CancellationTokenSource cts = new();
        lock (gate)
        {
            if (aborted)
            {
                return Failed($"rank {GroupRank}: step {ticket.Step} aborted by the coordinator", null);
            }

            if (staged is null || staged.Header.Step != ticket.Step)
            {
                return Failed($"rank {GroupRank} has no input for step {ticket.Step}", GroupRank);
            }

            input = staged;
            staged = null;
            ranThrough = ticket.Step;
            running = cts;
        }

        Phases.Clear();
        try
        {
            input.ThrowIfIncomplete(GroupRank);
            (byte[] bytes, int rows, int maskedSlots) = LowLatencyLayer is { } lowLatency
                ? await RunLowLatencyAsync(lowLatency, input, weighted, compute, cts.Token).ConfigureAwait(false)
                : await RunNormalAsync(input, weighted, compute, cts.Token).ConfigureAwait(false);
            lock (gate)
            {
                KeepOutput(ticket.Step, bytes);
            }

            return new RankStepReport(GroupRank, true, null, null, rows, bytes.Length, Phases.Snapshot(), maskedSlots);
        }
        catch (ArgumentException e)
        {
            // This rank's own input, refused before it was sent: the cause even when the coordinator's abort (which the
            // rejection itself set off, through the peers it told) arrived while the layer was telling them.
            return Failed($"rank {GroupRank}: bad input: {e.Message}", GroupRank);
        }
        catch (Exception) when (cts.IsCancellationRequested)
        {
            // Whatever this rank saw after the coordinator's abort is a consequence of it, not a cause.
            return Failed($"rank {GroupRank}: step {ticket.Step} aborted by the coordinator", null);
        }
        catch (EpStepFailedException e)
        {
            // The layer names its own ranks: in a masked group, member i is group rank Members[i].
            return World is { } w
                ? Failed($"{e.Message} (in the masked group, rank i is group rank [{string.Join(", ", w.Members)}][i])", e.Rank is int i && (uint)i < (uint)w.Members.Length ? w.Members[i] : e.Rank)
                : Failed(e.Message, e.Rank);
        }
        finally
        {
            lock (gate)
            {
                running = null;
            }
        }
    }

    public void Dispose()
    {
        Layer?.Dispose();
        LowLatencyLayer?.Dispose();
    }

    private Task<(byte[] Bytes, int Rows, int MaskedSlots)> RunNormalAsync(StagedInput input, bool weighted, IExpertCompute compute, CancellationToken token) => Config.TokenType switch
    {
        TokenType.BFloat16 => RunAsync<BFloat16>(input, weighted, compute, token),
        TokenType.Float16 => RunAsync<Half>(input, weighted, compute, token),
        _ => RunAsync<float>(input, weighted, compute, token),
    };

    private async Task<(byte[] Bytes, int Rows, int MaskedSlots)> RunAsync<T>(StagedInput input, bool weighted, IExpertCompute compute, CancellationToken token)
        where T : unmanaged
    {
        int n = input.Header.Tokens;
        int k = Config.TopK;
        EpAll2AllLayer layer = Layer!;
        (int[] ids, int masked) = LayerIds(input);
        // The staged rows are the layer's input where they are (the array the wire delivered them in).
        DispatchResult<T> dispatched = await layer.DispatchRowsAsync<T>(
            input.Tokens,
            Tensor.Create(ids, [n, k]),
            input.Weights is { } w ? Tensor.Create(MemoryMarshal.Cast<byte, float>(w).ToArray(), [n, k]) : null,
            input.Scatter is { } s ? Tensor.Create(MemoryMarshal.Cast<byte, int>(s).ToArray(), [n, k]) : null,
            token).ConfigureAwait(false);
        // The experts are the group's: a masked group's layer numbers them anew, the experts must not notice.
        Tensor<T> expertOutput = await compute.ComputeAsync(Name, World is null ? Config : Spec.ToConfig(GroupRank), dispatched, token).ConfigureAwait(false);
        Tensor<T> combined = await layer.CombineAsync(expertOutput, dispatched.Layout, new CombineOptions(weighted), token).ConfigureAwait(false);
        byte[] bytes = GC.AllocateUninitializedArray<byte>(n * Config.Hidden * Config.TokenBytes); // filled whole by the copy
        DenseTensor.CopyTo(combined, MemoryMarshal.Cast<byte, T>(bytes.AsSpan()));
        return (bytes, dispatched.Layout.RecvRows, masked);
    }

    /// <summary>A low-latency step: dispatch, the experts on the expert-major rows, combine (weighted as the client asked).</summary>
    private async Task<(byte[] Bytes, int Rows, int MaskedSlots)> RunLowLatencyAsync(EpLowLatencyLayer layer, StagedInput input, bool weighted, IExpertCompute compute, CancellationToken token)
    {
        if (input.Scatter is not null)
        {
            throw new ArgumentException("scatter indices are a normal-mode input: a low-latency layer places every row itself", nameof(input));
        }

        int n = input.Header.Tokens;
        int k = Config.TopK;
        LowLatencyDispatchResult dispatched = await layer.DispatchAsync(
            Tensor.Create(MemoryMarshal.Cast<byte, BFloat16>(input.Tokens).ToArray(), [n, Config.Hidden]),
            Tensor.Create(MemoryMarshal.Cast<byte, int>(input.Ids).ToArray(), [n, k]),
            input.Weights is { } w ? Tensor.Create(MemoryMarshal.Cast<byte, float>(w).ToArray(), [n, k]) : null,
            Spec.LowLatencyDispatch,
            token).ConfigureAwait(false);
        int rows = 0;
        foreach (int r in dispatched.RowsPerExpert)
        {
            rows += r;
        }

        Tensor<BFloat16> expertOutput = await compute.ComputeLowLatencyAsync(Name, Config, dispatched, token).ConfigureAwait(false);
        Tensor<BFloat16> combined = await layer.CombineAsync(expertOutput, dispatched.Handle, weighted, token).ConfigureAwait(false);
        byte[] bytes = new byte[n * Config.Hidden * 2];
        combined.FlattenTo(MemoryMarshal.Cast<byte, BFloat16>(bytes.AsSpan()));
        return (bytes, rows, 0);
    }

    private RankStepReport Failed(string error, int? blamed) =>
        new(GroupRank, false, error, blamed, 0, 0, Phases.Snapshot());

    /// <summary>
    /// The staged group expert ids in the layer's numbering: as they are for the whole group; in a masked group each id
    /// is checked against the group's range first (the layer checks only its own), then mapped, and the slots whose
    /// expert's rank is masked are counted.
    /// </summary>
    private (int[] Ids, int Masked) LayerIds(StagedInput input)
    {
        int[] ids = MemoryMarshal.Cast<byte, int>(input.Ids).ToArray();
        if (World is not { } w)
        {
            return (ids, 0);
        }

        if (input.Scatter is not null)
        {
            throw new ArgumentException($"scatter indices place rows across the whole group, which is masked now (serving ranks {string.Join(", ", w.Members)}): a masked step cannot honour them", nameof(input));
        }

        int masked = 0;
        for (int i = 0; i < ids.Length; i++)
        {
            if ((uint)ids[i] > (uint)Spec.NumExperts)
            {
                throw new ArgumentException($"expertIds[{i / Spec.TopK}, {i % Spec.TopK}] = {ids[i]} is outside [0, NumExperts = {Spec.NumExperts}] (NumExperts marks a dropped slot)", nameof(input));
            }

            masked += w.Map(ref ids[i]) ? 1 : 0;
        }

        return (ids, masked);
    }
}

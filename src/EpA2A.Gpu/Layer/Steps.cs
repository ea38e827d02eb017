using EpA2A.Config;
using EpA2A.Errors;
using EpA2A.Transport;

namespace EpA2A.Layer;

/// <summary>One collective operation in flight: its tag, its deadline and whose rank is waiting.</summary>
internal sealed class OperationContext(EpConfig config, long epoch, long sequence, TimeSpan timeout, CancellationToken deadline, CancellationToken token)
{
    public EpConfig Config { get; } = config;

    public long Epoch { get; } = epoch;

    public long Sequence { get; } = sequence;

    public TimeSpan Timeout { get; } = timeout;

    /// <summary>Cancelled when the deadline passes (and only then).</summary>
    public CancellationToken Deadline { get; } = deadline;

    /// <summary>Cancelled at the deadline or by the caller.</summary>
    public CancellationToken Token { get; } = token;

    /// <summary>When the operation (and its deadline) started, as a <see cref="System.Diagnostics.Stopwatch"/> timestamp.</summary>
    public long StartTimestamp { get; } = System.Diagnostics.Stopwatch.GetTimestamp();

    /// <summary>Time left before the deadline (zero once it has passed).</summary>
    public TimeSpan Remaining
    {
        get
        {
            TimeSpan left = Timeout - System.Diagnostics.Stopwatch.GetElapsedTime(StartTimestamp);
            return left > TimeSpan.Zero ? left : TimeSpan.Zero;
        }
    }

    public MessageTag Tag(ExchangePhase phase) => new(Epoch, Sequence, phase);

    /// <summary>
    /// Waits for one message from each of <paramref name="sources"/> (in that order). At the deadline the
    /// error names every rank that had not delivered.
    /// </summary>
    public async ValueTask<byte[][]> ReceiveAllAsync(IRankTransport transport, IReadOnlyList<int> sources, ExchangePhase phase)
    {
        MessageTag tag = Tag(phase);
        Task<byte[]>[] pending = new Task<byte[]>[sources.Count];
        for (int i = 0; i < sources.Count; i++)
        {
            pending[i] = transport.ReceiveAsync(sources[i], tag, Token).AsTask();
        }

        try
        {
            return await Task.WhenAll(pending).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (Deadline.IsCancellationRequested)
        {
            int[] missing = [.. sources.Where((_, i) => !pending[i].IsCompletedSuccessfully)];
            string who = missing.Length == 1 ? $"rank {missing[0]}" : $"ranks {string.Join(", ", missing)}";
            throw new EpStepTimeoutException(
                $"rank {Config.Rank}: {who} did not deliver {phase} for operation {Sequence} within {Timeout.TotalSeconds:0.###} s",
                missing.Length > 0 ? missing[0] : -1);
        }
    }
}

/// <summary>A dispatch in flight: the copied inputs, and what the phases derive from them.</summary>
internal sealed class DispatchStep
{
    public required OperationContext Operation { get; init; }

    public required DispatchCombineContext Context { get; init; }

    public required int TokenCount { get; init; }

    /// <summary>[TokenCount, Hidden] of the token type, as bytes.</summary>
    public required byte[] Tokens { get; init; }

    /// <summary>[TokenCount, TopK].</summary>
    public required int[] ExpertIds { get; init; }

    /// <summary>[TokenCount, TopK] or null.</summary>
    public float[]? Weights { get; init; }

    /// <summary>[TokenCount, TopK] global rows or null.</summary>
    public int[]? ScatterIndices { get; init; }

    /// <summary>Device pointers of the inputs on the in-process device path (CUDA); null when they are the host arrays above.</summary>
    public DeviceStepInputs? DeviceInputs { get; init; }

    /// <summary>Set by the preprocess phase.</summary>
    public IRoutingPlan? Plan { get; set; }

    /// <summary>Set by the dispatch phase: where each (token, k) landed, as a global row, -1 when dropped.</summary>
    public int[]? GlobalScatter { get; set; }

    /// <summary>Set by the dispatch phase: the origin of every received row.</summary>
    public RowOrigins? Origins { get; set; }

    public EpConfig Config => Operation.Config;
}

/// <summary>A combine in flight.</summary>
internal sealed class CombineStep
{
    private float[]? accumulator;

    public required OperationContext Operation { get; init; }

    public required EpAllToAllLayout Layout { get; init; }

    /// <summary>[RecvRows, Hidden] expert outputs of the token type, as bytes.</summary>
    public required byte[] ExpertOutput { get; init; }

    /// <summary>This rank's dispatch weights [TokenCount, TopK] (weighted combine), or null.</summary>
    public float[]? SourceWeights { get; init; }

    /// <summary>Received weights, one per row (weighted combine), or null.</summary>
    public float[]? RowWeights { get; init; }

    public required bool Weighted { get; init; }

    /// <summary>[TokenCount, Hidden] fp32 sums; rounded once at the end.</summary>
    public required int AccumulatorLength { get; init; }

    /// <summary>Allocated on first use: a backend that rounds on the device (CUDA) never touches it.</summary>
    public float[] Accumulator => accumulator ??= new float[AccumulatorLength];

    /// <summary>Set by a backend that rounds on its own (CUDA): [TokenCount, Hidden] of the token type, as bytes.</summary>
    public byte[]? Rounded { get; set; }

    /// <summary>Device path (CUDA): the expert outputs' device pointer (0 on the host path, where <see cref="ExpertOutput"/> holds them).</summary>
    public nint DeviceExpertOutput { get; init; }

    /// <summary>Device path: set by the backend to the device rows [TokenCount, Hidden] it combined into (owned by the layer).</summary>
    public nint DeviceResult { get; set; }

    public EpConfig Config => Operation.Config;
}

/// <summary>Device pointers of a dispatch's inputs (0 for an absent optional one).</summary>
internal sealed record DeviceStepInputs(nint Tokens, nint ExpertIds, nint Weights, nint ScatterIndices);

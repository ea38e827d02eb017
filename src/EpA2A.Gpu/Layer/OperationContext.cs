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
    /// Waits for one message from each of <paramref name="sources"/> (in that order), which the caller then owns and
    /// releases after its last read (<see cref="TransportBuffer.ReleaseAll"/>). At the deadline the error names every
    /// rank that had not delivered.
    /// </summary>
    public async ValueTask<TransportBuffer[]> ReceiveAllAsync(IRankTransport transport, IReadOnlyList<int> sources, ExchangePhase phase)
    {
        MessageTag tag = Tag(phase);
        Task<TransportBuffer>[] pending = new Task<TransportBuffer>[sources.Count];
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

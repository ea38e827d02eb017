namespace EpA2A.Transport;

/// <summary>
/// All ranks of a group in one process: each rank's transport posts straight into its peers' mailboxes.
/// Used by tests, the `epa2a step` command and single-process runs of the CPU backend.
/// </summary>
public sealed class InProcessFabric
{
    private readonly RankMailbox[] mailboxes;

    /// <summary>Creates a fabric for <paramref name="worldSize"/> ranks.</summary>
    public InProcessFabric(int worldSize)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(worldSize, 1);
        mailboxes = new RankMailbox[worldSize];
        for (int i = 0; i < worldSize; i++)
        {
            mailboxes[i] = new RankMailbox();
        }
    }

    /// <summary>Ranks on the fabric.</summary>
    public int WorldSize => mailboxes.Length;

    /// <summary>Messages buffered across all ranks (zero between steps when nothing leaked).</summary>
    public int PendingMessages => mailboxes.Sum(m => m.Count);

    /// <summary>The transport of <paramref name="rank"/>.</summary>
    public IRankTransport TransportFor(int rank)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rank);
        ArgumentOutOfRangeException.ThrowIfGreaterThanOrEqual(rank, WorldSize);
        return new Endpoint(this, rank);
    }

    private sealed class Endpoint(InProcessFabric fabric, int rank) : IRankTransport
    {
        // The buffer goes to the receiver as it is: its ownership passes with it, and the receiver releases it.
        public ValueTask SendAsync(int destination, MessageTag tag, TransportBuffer message, CancellationToken cancellationToken)
        {
            fabric.mailboxes[destination].Post(rank, tag, message);
            return ValueTask.CompletedTask;
        }

        public ValueTask<TransportBuffer> ReceiveAsync(int source, MessageTag tag, CancellationToken cancellationToken) =>
            fabric.mailboxes[rank].TakeAsync(source, tag, cancellationToken);

        public void DiscardBefore(long epoch, long sequence) => fabric.mailboxes[rank].DiscardBefore(epoch, sequence);
    }
}

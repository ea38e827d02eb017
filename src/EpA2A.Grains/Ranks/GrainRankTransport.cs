using System.Collections.Concurrent;
using EpA2A.Errors;
using EpA2A.Transport;
using Orleans.Concurrency;

namespace EpA2A.Grains.Ranks;

/// <summary>
/// The CPU backend's transport across silos: a message to another rank is one or more grain calls to its
/// <see cref="IRankPeer.DeliverAsync"/>, each chunk an <see cref="Immutable{T}"/> below the chunk size;
/// a message to itself goes straight into its own mailbox. Ranks are the layer's: in a masked group (survivors
/// renumbered, see <see cref="MaskedWorld"/>) destination d is the rank grain of group rank members[d].
/// </summary>
internal sealed class GrainRankTransport(IGrainFactory grains, string group, string layer, int rank, int chunkBytes, RankMailbox mailbox, int[]? members = null) : IRankTransport
{
    /// <summary>Peer references, made once each: GetGrain resolves the interface type through its attributes every time.</summary>
    private readonly ConcurrentDictionary<int, IRankPeer> peers = new();

    public async ValueTask SendAsync(int destination, MessageTag tag, byte[] payload, CancellationToken cancellationToken)
    {
        if (destination == rank)
        {
            mailbox.Post(rank, tag, payload);
            return;
        }

        IRankPeer peer = peers.GetOrAdd(destination, d => grains.GetGrain<IRankPeer>(GrainKeys.Rank(group, members?[d] ?? d)));
        int count = Math.Max(1, (payload.Length + chunkBytes - 1) / chunkBytes);
        Task[] sends = new Task[count];
        for (int i = 0; i < count; i++)
        {
            byte[] piece = count == 1 ? payload : payload[(i * chunkBytes)..Math.Min(payload.Length, (i + 1) * chunkBytes)];
            TransportChunk chunk = new(tag.Epoch, tag.Sequence, (int)tag.Phase, rank, i, count, payload.Length, new Immutable<byte[]>(piece));
            sends[i] = peer.DeliverAsync(layer, chunk);
        }

        Task all = Task.WhenAll(sends);
        try
        {
            await all.WaitAsync(cancellationToken).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (!all.IsCompleted)
        {
            // The peer did not take the message before the step's deadline (or an abort): it is the one missing.
            throw new EpStepTimeoutException($"rank {rank}: rank {destination} did not accept {tag} before the step ended", destination);
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            // The peer's silo is gone: the step fails because of that peer, not this rank (unless the peer judged
            // this rank's message malformed).
            Exception cause = e.GetBaseException();
            int blamed = cause is InvalidDataException ? rank : destination;
            throw new EpStepFailedException($"rank {rank} could not deliver {tag} to rank {destination}: {RemoteFailure.Describe(cause)}", blamed, e);
        }
    }

    public ValueTask<byte[]> ReceiveAsync(int source, MessageTag tag, CancellationToken cancellationToken) =>
        mailbox.TakeAsync(source, tag, cancellationToken);

    public void DiscardBefore(long epoch, long sequence) => mailbox.DiscardBefore(epoch, sequence);
}

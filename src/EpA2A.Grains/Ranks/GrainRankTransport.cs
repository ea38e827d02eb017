using System.Collections.Concurrent;
using EpA2A.Errors;
using EpA2A.Transport;

namespace EpA2A.Grains.Ranks;

/// <summary>
/// The CPU backend's transport across silos: a message to another rank is one or more grain calls to its
/// <see cref="IRankPeer.DeliverAsync"/>, each chunk a view of the message's buffer no larger than the chunk size;
/// a message to itself goes straight into its own mailbox. Ranks are the layer's: in a masked group (survivors
/// renumbered, see <see cref="MaskedWorld"/>) destination d is the rank grain of group rank members[d].
/// </summary>
internal sealed class GrainRankTransport(IGrainFactory grains, string group, string layer, int rank, int chunkBytes, RankMailbox mailbox, int[]? members = null) : IRankTransport
{
    /// <summary>Peer references, made once each: GetGrain resolves the interface type through its attributes every time.</summary>
    private readonly ConcurrentDictionary<int, IRankPeer> peers = new();

    /// <summary>
    /// Sends <paramref name="message"/> as grain calls of chunks that are views of its buffer, and releases the buffer once
    /// every call has finished normally: Orleans has written the bytes onto the wire before the peer could answer (inside
    /// one silo, the peer copied them before answering). On a failure or the deadline the buffer is left to the GC, since
    /// a call that has not answered may still be waiting to be written.
    /// </summary>
    public async ValueTask SendAsync(int destination, MessageTag tag, TransportBuffer message, CancellationToken cancellationToken)
    {
        if (destination == rank)
        {
            mailbox.Post(rank, tag, message); // ownership passes to this rank's own receive
            return;
        }

        IRankPeer peer = peers.GetOrAdd(destination, d => grains.GetGrain<IRankPeer>(GrainKeys.Rank(group, members?[d] ?? d)));
        int length = message.Length;
        ReadOnlyMemory<byte> bytes = message.Memory;
        int count = Math.Max(1, (length + chunkBytes - 1) / chunkBytes);
        Task all;
        if (count == 1)
        {
            all = peer.DeliverAsync(layer, Chunk(tag, 0, 1, length, bytes));
        }
        else
        {
            Task[] sends = new Task[count];
            for (int i = 0; i < count; i++)
            {
                int start = i * chunkBytes;
                sends[i] = peer.DeliverAsync(layer, Chunk(tag, i, count, length, bytes[start..Math.Min(length, start + chunkBytes)]));
            }

            all = Task.WhenAll(sends);
        }

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

        message.Release();
    }

    private TransportChunk Chunk(MessageTag tag, int index, int count, int totalBytes, ReadOnlyMemory<byte> bytes) =>
        new(tag.Epoch, tag.Sequence, (int)tag.Phase, rank, index, count, totalBytes, new TransportChunkData(bytes));

    public ValueTask<TransportBuffer> ReceiveAsync(int source, MessageTag tag, CancellationToken cancellationToken) =>
        mailbox.TakeAsync(source, tag, cancellationToken);

    public void DiscardBefore(long epoch, long sequence) => mailbox.DiscardBefore(epoch, sequence);
}

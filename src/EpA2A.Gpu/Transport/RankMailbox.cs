namespace EpA2A.Transport;

/// <summary>
/// The messages that arrived for one rank, matched by (source, tag). A message may arrive before its
/// receive is posted (a fast peer) or after (a slow one); either way the receiver gets it exactly once.
/// </summary>
public sealed class RankMailbox
{
    private readonly Lock gate = new();
    private readonly Dictionary<(int Source, MessageTag Tag), TaskCompletionSource<TransportBuffer>> slots = [];
    private long floor;

    /// <summary>Messages held, delivered or awaited (for leak checks).</summary>
    public int Count
    {
        get
        {
            lock (gate)
            {
                return slots.Count;
            }
        }
    }

    /// <summary>
    /// The operation the latest <see cref="DiscardBefore"/> kept messages from: the operation in progress or the
    /// next one. A transport that accepts messages from outside uses it to refuse operations far ahead.
    /// </summary>
    public long Floor
    {
        get
        {
            lock (gate)
            {
                return floor;
            }
        }
    }

    /// <summary>Stores a message, which the mailbox then owns until its receiver takes it. A second message for the same slot is a protocol error.</summary>
    public void Post(int source, MessageTag tag, TransportBuffer payload)
    {
        TaskCompletionSource<TransportBuffer> slot = Slot(source, tag);
        if (!slot.TrySetResult(payload))
        {
            throw new InvalidOperationException($"duplicate message from rank {source} for {tag}");
        }
    }

    /// <summary>Waits for the message from <paramref name="source"/> with <paramref name="tag"/>; the caller then owns it.</summary>
    public async ValueTask<TransportBuffer> TakeAsync(int source, MessageTag tag, CancellationToken cancellationToken)
    {
        TaskCompletionSource<TransportBuffer> slot = Slot(source, tag);
        TransportBuffer payload = await slot.Task.WaitAsync(cancellationToken).ConfigureAwait(false);
        lock (gate)
        {
            slots.Remove((source, tag));
        }

        return payload;
    }

    /// <summary>
    /// Drops every slot of an older epoch or an earlier operation. Their messages are not released: a receiver may have
    /// taken one from its slot a moment ago, so they are left to the garbage collector.
    /// </summary>
    public void DiscardBefore(long epoch, long sequence)
    {
        lock (gate)
        {
            floor = sequence;
            foreach ((int Source, MessageTag Tag) key in slots.Keys.ToArray())
            {
                if (key.Tag.Epoch < epoch || (key.Tag.Epoch == epoch && key.Tag.Sequence < sequence))
                {
                    slots.Remove(key);
                }
            }
        }
    }

    private TaskCompletionSource<TransportBuffer> Slot(int source, MessageTag tag)
    {
        lock (gate)
        {
            if (!slots.TryGetValue((source, tag), out TaskCompletionSource<TransportBuffer>? slot))
            {
                slot = new TaskCompletionSource<TransportBuffer>(TaskCreationOptions.RunContinuationsAsynchronously);
                slots.Add((source, tag), slot);
            }

            return slot;
        }
    }
}

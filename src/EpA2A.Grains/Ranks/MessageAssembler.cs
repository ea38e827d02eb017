using System.Collections.Concurrent;
using EpA2A.Config;
using EpA2A.Transport;

namespace EpA2A.Grains.Ranks;

/// <summary>
/// Turns the <see cref="TransportChunk"/>s that peers (or anyone who can reach the silo) deliver into whole
/// messages in a rank's mailbox. Every field of a chunk is checked against the layer's configuration before a
/// byte is allocated: a message can be no larger than the largest one the protocol sends, chunks must tile it
/// exactly once, and the number of messages held is bounded. A violation is an <see cref="InvalidDataException"/>
/// naming the field and the rule, thrown back to the caller; the layer is untouched.
/// </summary>
internal sealed class MessageAssembler(EpConfig config, RankMailbox mailbox)
{
    /// <summary>The smallest piece a sender cuts (RankSiloOptions.ChunkBytes is at least this); only a message's last chunk may be shorter.</summary>
    public const int MinChunkBytes = 1024;

    private readonly ConcurrentDictionary<(int Source, MessageTag Tag), Reassembly> partial = new();
    private readonly Lock gate = new();
    private long partialBytes;

    /// <summary>The largest message the protocol sends for this configuration (see <see cref="LargestMessage"/>).</summary>
    public int MaxMessageBytes { get; } = LargestMessage(config);

    /// <summary>How many operations ahead of this rank's current one a peer's message may be (a peer runs at most two ahead).</summary>
    public const int MaxOperationsAhead = 8;

    /// <summary>Messages begun or held at once, at most: a peer is at most one operation ahead, each with a few exchanges.</summary>
    public int MaxHeldMessages { get; } = (16 * config.WorldSize) + 64;

    /// <summary>
    /// Bytes of messages begun but not complete, at most: every peer's message of two exchanges. A first chunk of a
    /// few bytes makes the whole message's buffer, so this, not the chunk sizes, bounds what a sender can make a rank
    /// allocate.
    /// </summary>
    public long MaxPartialBytes { get; } = 2L * config.WorldSize * LargestMessage(config);

    /// <summary>
    /// A bound on any message between ranks: per (token, slot) at most a 36-byte record and an fp32 row, for the
    /// tokens of every node's sender with this local rank (inter-node forwarding), plus the counts table and 64 KiB
    /// for an abort's reason.
    /// </summary>
    public static int LargestMessage(EpConfig c)
    {
        ArgumentNullException.ThrowIfNull(c);
        long perSlot = 36 + (4L * c.Hidden);
        long bytes = 65536 + (4L * (c.NumExperts + 16)) + ((long)c.NumNodes * c.MaxTokens * c.TopK * perSlot);
        return (int)Math.Min(bytes, Array.MaxLength);
    }

    public void Deliver(TransportChunk chunk)
    {
        ArgumentNullException.ThrowIfNull(chunk);
        TransportChunkData data = chunk.Data ?? throw Bad(chunk, "carries no data");
        if ((uint)chunk.Source >= (uint)config.WorldSize || chunk.Source == config.Rank)
        {
            throw Bad(chunk, $"claims source rank {chunk.Source}; peers of rank {config.Rank} are [0, {config.WorldSize}) without it");
        }

        if (!Enum.IsDefined((ExchangePhase)chunk.Phase))
        {
            throw Bad(chunk, $"has phase {chunk.Phase}, which is no exchange of the protocol");
        }

        if (chunk.TotalBytes < 0 || chunk.TotalBytes > MaxMessageBytes)
        {
            throw Bad(chunk, $"announces TotalBytes = {chunk.TotalBytes}; a message of this layer is in [0, {MaxMessageBytes}]");
        }

        int maxChunks = Math.Max(1, (chunk.TotalBytes + MinChunkBytes - 1) / MinChunkBytes);
        if (chunk.Count < 1 || chunk.Count > maxChunks)
        {
            throw Bad(chunk, $"announces Count = {chunk.Count} chunks; a {chunk.TotalBytes}-byte message has 1 to {maxChunks} (pieces of at least {MinChunkBytes} bytes)");
        }

        if ((uint)chunk.Index >= (uint)chunk.Count)
        {
            throw Bad(chunk, $"has Index = {chunk.Index}, outside [0, Count = {chunk.Count})");
        }

        long floor = mailbox.Floor;
        if (chunk.Sequence < floor)
        {
            data.TakeBuffer()?.Release(); // an operation this rank has finished: nobody reads it
            return;
        }

        if (chunk.Sequence > floor + MaxOperationsAhead)
        {
            throw Bad(chunk, $"is for operation {chunk.Sequence}, more than {MaxOperationsAhead} ahead of this rank's operation {floor}");
        }

        MessageTag tag = new(chunk.Epoch, chunk.Sequence, (ExchangePhase)chunk.Phase);
        if (chunk.Count == 1)
        {
            if (data.Length != chunk.TotalBytes)
            {
                throw Bad(chunk, $"is the only chunk but holds {data.Length} of its TotalBytes = {chunk.TotalBytes}");
            }

            ThrowIfFull(chunk);

            // The codec's buffer becomes the message as it is; a chunk from inside this silo is the sender's view, copied.
            mailbox.Post(chunk.Source, tag, data.TakeBuffer() ?? TransportBuffer.CopyOf(data.Bytes.Span));
            return;
        }

        (int, MessageTag) key = (chunk.Source, tag);
        Reassembly r;
        lock (gate)
        {
            if (!partial.TryGetValue(key, out r!))
            {
                ThrowIfFull(chunk);
                if (partialBytes + chunk.TotalBytes > MaxPartialBytes)
                {
                    throw Bad(chunk, $"would make the messages being assembled exceed {MaxPartialBytes} bytes ({partialBytes} held)");
                }

                r = new Reassembly(chunk.TotalBytes, chunk.Count);
                partial[key] = r;
                partialBytes += chunk.TotalBytes;
            }
        }

        bool complete = r.Add(chunk, data.Bytes.Span);
        data.TakeBuffer()?.Release(); // copied into the message above
        if (complete)
        {
            lock (gate)
            {
                partial.TryRemove(key, out _);
                partialBytes -= r.Buffer.Length;
            }

            mailbox.Post(chunk.Source, tag, r.Buffer);
        }
    }

    private void ThrowIfFull(TransportChunk chunk)
    {
        if (partial.Count + mailbox.Count >= MaxHeldMessages)
        {
            throw Bad(chunk, $"would exceed the {MaxHeldMessages} messages a rank holds at once ({partial.Count} being assembled, {mailbox.Count} in the mailbox)");
        }
    }

    private static InvalidDataException Bad(TransportChunk chunk, string rule) =>
        new($"transport chunk {chunk.Index} of {chunk.Count} from rank {chunk.Source} (phase {chunk.Phase}, operation {chunk.Sequence}, epoch {chunk.Epoch}) {rule}");

    /// <summary>
    /// One message being put together. Every chunk but the last has the same length L and sits at Index × L; the
    /// last fills the end. Each index is taken once, so a completed message has every byte written exactly once.
    /// </summary>
    private sealed class Reassembly(int totalBytes, int count)
    {
        private readonly Lock gate = new();
        private readonly bool[] seen = new bool[count];
        private int chunkLength;
        private int lastLength = -1;
        private int received;

        // Uninitialized: a message is posted only once its chunks have tiled every byte.
        public TransportBuffer Buffer { get; } = TransportBuffer.Rent(totalBytes);

        public bool Add(TransportChunk chunk, ReadOnlySpan<byte> data)
        {
            if (chunk.TotalBytes != Buffer.Length || chunk.Count != count)
            {
                throw Bad(chunk, $"disagrees with an earlier chunk of its message on the size (TotalBytes {Buffer.Length}, Count {count})");
            }

            lock (gate)
            {
                if (seen[chunk.Index])
                {
                    throw Bad(chunk, "arrived twice");
                }

                bool last = chunk.Index == count - 1;
                if (!last && chunkLength != 0 && data.Length != chunkLength)
                {
                    throw Bad(chunk, $"holds {data.Length} bytes; the other chunks of its message hold {chunkLength}");
                }

                int full = last ? chunkLength : data.Length;
                int tail = last ? data.Length : lastLength;
                bool tiles = data.Length > 0 && data.Length <= Buffer.Length && (last || data.Length >= MinChunkBytes)
                    && (full == 0 || (long)(count - 1) * full < Buffer.Length)
                    && (full == 0 || tail < 0 || (tail <= full && ((long)(count - 1) * full) + tail == Buffer.Length));
                if (!tiles)
                {
                    throw Bad(chunk, $"holds {data.Length} bytes, which with the chunks seen so far do not tile a {Buffer.Length}-byte message in {count} pieces");
                }

                if (last)
                {
                    lastLength = data.Length;
                }
                else
                {
                    chunkLength = data.Length;
                }

                int offset = last ? Buffer.Length - data.Length : chunk.Index * data.Length;
                data.CopyTo(Buffer.Span[offset..]);
                seen[chunk.Index] = true;
                return ++received == count;
            }
        }
    }
}

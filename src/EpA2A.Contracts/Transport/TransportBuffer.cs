using System.Numerics;

namespace EpA2A.Transport;

/// <summary>
/// The bytes of one message between ranks (the CPU backend's packets, what the grain transport receives), in an array
/// rented from a pool, so a step's messages reuse the previous steps' arrays instead of allocating. A buffer has one
/// owner at a time, and only the owner reads, writes or releases it:
/// <list type="number">
/// <item>the sender, from <see cref="Rent"/> until it passes the buffer to a transport's send;</item>
/// <item>the transport: until it has put the buffer into the receiver's mailbox (in process), or until every grain call
/// that carries it has finished normally (then the bytes are on the wire and the transport releases it);</item>
/// <item>the receiver, from its receive until its last read, where it calls <see cref="Release"/>.</item>
/// </list>
/// Nobody releases a buffer on a failure (an abort, a deadline, a call that faulted, a discarded message): a pending
/// serialization or a reader may still hold it, so the garbage collector takes it instead. After <see cref="Release"/>
/// this object no longer reaches the bytes (<see cref="Span"/> throws, a second release throws), and in Debug builds (or
/// with the AppContext switch <c>EpA2A.Transport.PoisonReleasedBuffers</c>) the bytes are overwritten before the array
/// goes back, so a reader that kept a span past the release reads garbage and the reference comparisons fail.
/// </summary>
public sealed class TransportBuffer
{
    /// <summary>What a released buffer is filled with when poisoning is on (as a bf16 row: NaNs).</summary>
    public const byte PoisonByte = 0xFF;

    /// <summary>Larger messages are allocated and dropped, not pooled (the default layer's are under 1 MiB).</summary>
    public const int MaxPooledBytes = 16 << 20;

    private byte[]? array;

    private TransportBuffer(byte[] array, int length)
    {
        this.array = array;
        Length = length;
    }

    /// <summary>Whether <see cref="Release"/> overwrites the bytes first (Debug builds, or the AppContext switch).</summary>
    public static bool PoisonsOnRelease { get; } = IsDebugBuild || (AppContext.TryGetSwitch("EpA2A.Transport.PoisonReleasedBuffers", out bool on) && on);

    /// <summary>The message's length in bytes (the rented array may be longer).</summary>
    public int Length { get; }

    /// <summary>Whether <see cref="Release"/> has run.</summary>
    public bool IsReleased => Volatile.Read(ref array) is null;

    /// <summary>The message's bytes; not zeroed: the sender writes every byte.</summary>
    public Span<byte> Span => Array().AsSpan(0, Length);

    /// <summary>The message's bytes as memory (for a transport that slices the message into chunks).</summary>
    public Memory<byte> Memory => Array().AsMemory(0, Length);

    private static bool IsDebugBuild =>
#if DEBUG
        true;
#else
        false;
#endif

    /// <summary>A buffer of <paramref name="length"/> bytes, owned by the caller.</summary>
    public static TransportBuffer Rent(int length)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        return new TransportBuffer(BufferPool.Rent(length), length);
    }

    /// <summary>A buffer holding a copy of <paramref name="bytes"/>.</summary>
    public static TransportBuffer CopyOf(ReadOnlySpan<byte> bytes)
    {
        TransportBuffer buffer = Rent(bytes.Length);
        bytes.CopyTo(buffer.Span);
        return buffer;
    }

    /// <summary>Releases every buffer of <paramref name="buffers"/> (a receiver's messages after its last read).</summary>
    public static void ReleaseAll(ReadOnlySpan<TransportBuffer> buffers)
    {
        foreach (TransportBuffer b in buffers)
        {
            b.Release();
        }
    }

    /// <summary>The owner's last act: the array goes back to the pool (poisoned first, see <see cref="PoisonsOnRelease"/>).</summary>
    public void Release()
    {
        byte[] a = Interlocked.Exchange(ref array, null)
            ?? throw new InvalidOperationException("a transport buffer was released twice: two parties thought they owned it");
        if (PoisonsOnRelease)
        {
            a.AsSpan().Fill(PoisonByte);
        }

        BufferPool.Return(a);
    }

    private byte[] Array() =>
        Volatile.Read(ref array) ?? throw new ObjectDisposedException(nameof(TransportBuffer), "the transport buffer was read after its owner released it");

    /// <summary>
    /// Arrays by power-of-two size, 4 KiB to <see cref="MaxPooledBytes"/>. A miss allocates on the pinned object heap:
    /// pooled arrays live for the process, and there the collector neither copies them (a pooled array allocated in gen0
    /// is copied into gen1 and again into gen2 by the collections of the first steps) nor scans them. Each size keeps at
    /// most 64 MiB of idle arrays (and at least 4); more are dropped on return.
    /// </summary>
    private static class BufferPool
    {
        private const int MinShift = 12;
        private const int MaxShift = 24;
        private const long IdleBytesPerSize = 64L << 20;

        private static readonly Stack<byte[]>[] Idle = [.. Enumerable.Range(0, MaxShift - MinShift + 1).Select(_ => new Stack<byte[]>())];

        public static byte[] Rent(int length)
        {
            if (length > MaxPooledBytes)
            {
                return GC.AllocateUninitializedArray<byte>(length);
            }

            int bucket = Bucket(length);
            Stack<byte[]> idle = Idle[bucket];
            lock (idle)
            {
                if (idle.TryPop(out byte[]? array))
                {
                    return array;
                }
            }

            return GC.AllocateUninitializedArray<byte>(1 << (bucket + MinShift), pinned: true);
        }

        public static void Return(byte[] array)
        {
            if (array.Length > MaxPooledBytes || array.Length != 1 << (Bucket(array.Length) + MinShift))
            {
                return; // not a pooled size (a message larger than the pool takes)
            }

            Stack<byte[]> idle = Idle[Bucket(array.Length)];
            lock (idle)
            {
                if (idle.Count < Math.Max(4, IdleBytesPerSize / array.Length))
                {
                    idle.Push(array);
                }
            }
        }

        private static int Bucket(int length) => Math.Max(0, BitOperations.Log2((uint)Math.Max(length, 1) - 1) + 1 - MinShift);
    }
}

using System.Buffers.Binary;
using System.Runtime.InteropServices;
using System.Text;

namespace EpA2A.Transport;

/// <summary>Writes a little-endian message into a buffer sized up front (no growth on the hot path).</summary>
internal ref struct MessageWriter(Span<byte> buffer)
{
    private readonly Span<byte> buffer = buffer;
    private int position;

    /// <summary>A writer that continues at <paramref name="position"/> (a message filled in several passes).</summary>
    public MessageWriter(Span<byte> buffer, int position)
        : this(buffer)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(position);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(position, buffer.Length);
        this.position = position;
    }

    public readonly int Position => position;

    public void WriteInt(int value)
    {
        BinaryPrimitives.WriteInt32LittleEndian(buffer[position..], value);
        position += 4;
    }

    public void WriteFloat(float value)
    {
        BinaryPrimitives.WriteSingleLittleEndian(buffer[position..], value);
        position += 4;
    }

    public void WriteBytes(ReadOnlySpan<byte> bytes)
    {
        bytes.CopyTo(buffer[position..]);
        position += bytes.Length;
    }

    public void WriteFloats(ReadOnlySpan<float> values) => WriteBytes(MemoryMarshal.AsBytes(values));
}

/// <summary>Reads what <see cref="MessageWriter"/> wrote; a short or malformed message is an exception, never a wild read.</summary>
internal ref struct MessageReader(ReadOnlySpan<byte> buffer, int source)
{
    private readonly ReadOnlySpan<byte> buffer = buffer;
    private int position;

    public readonly bool AtEnd => position == buffer.Length;

    public int ReadInt()
    {
        Need(4);
        int v = BinaryPrimitives.ReadInt32LittleEndian(buffer[position..]);
        position += 4;
        return v;
    }

    public float ReadFloat()
    {
        Need(4);
        float v = BinaryPrimitives.ReadSingleLittleEndian(buffer[position..]);
        position += 4;
        return v;
    }

    public ReadOnlySpan<byte> ReadBytes(int count)
    {
        Need(count);
        ReadOnlySpan<byte> s = buffer.Slice(position, count);
        position += count;
        return s;
    }

    public string ReadString()
    {
        int length = ReadInt();
        return Encoding.UTF8.GetString(ReadBytes(length));
    }

    private readonly void Need(int count)
    {
        if (count < 0 || position + count > buffer.Length)
        {
            throw new InvalidDataException($"message from rank {source} is truncated: needs {count} bytes at offset {position} of {buffer.Length}");
        }
    }
}

/// <summary>The first word of every CPU-backend message: ok, or an abort that carries its reason.</summary>
internal static class MessageStatus
{
    public const int Ok = 0;
    public const int Aborted = 1;

    /// <summary>An empty ok message (a barrier's).</summary>
    public static TransportBuffer Empty()
    {
        TransportBuffer message = TransportBuffer.Rent(4);
        new MessageWriter(message.Span).WriteInt(Ok);
        return message;
    }

    /// <summary>An abort that names the rank responsible (forwarded unchanged, so receivers two hops away blame the right one).</summary>
    public static TransportBuffer Abort(int culprit, string reason)
    {
        byte[] text = Encoding.UTF8.GetBytes(reason);
        TransportBuffer message = TransportBuffer.Rent(12 + text.Length);
        MessageWriter w = new(message.Span);
        w.WriteInt(Aborted);
        w.WriteInt(culprit);
        w.WriteInt(text.Length);
        w.WriteBytes(text);
        return message;
    }
}

using System.Buffers;
using System.Runtime.InteropServices;

namespace EpA2A.Grains;

/// <summary>
/// The bytes of an array of unmanaged elements as <see cref="Memory{T}"/> of bytes, without copying them: what lets the
/// client put a caller's token rows into a message whose serializer writes them straight onto the wire.
/// </summary>
/// <typeparam name="T">The element type.</typeparam>
internal sealed class ByteView<T>(T[] array) : MemoryManager<byte>
    where T : unmanaged
{
    /// <summary>The whole array's bytes (an empty array gives empty memory).</summary>
    public static ReadOnlyMemory<byte> Of(T[] array)
    {
        ArgumentNullException.ThrowIfNull(array);
        return array.Length == 0 ? ReadOnlyMemory<byte>.Empty : new ByteView<T>(array).Memory;
    }

    public override Span<byte> GetSpan() => MemoryMarshal.AsBytes(array.AsSpan());

    public override unsafe MemoryHandle Pin(int elementIndex = 0)
    {
        GCHandle handle = GCHandle.Alloc(array, GCHandleType.Pinned);
        return new MemoryHandle((byte*)handle.AddrOfPinnedObject() + elementIndex, handle);
    }

    public override void Unpin()
    {
    }

    protected override void Dispose(bool disposing)
    {
    }
}

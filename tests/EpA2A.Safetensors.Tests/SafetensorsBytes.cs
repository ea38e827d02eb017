using System.Buffers.Binary;
using System.Text;

namespace EpA2A.Safetensors.Tests;

/// <summary>Hand-made safetensors bytes for reader tests.</summary>
internal static class SafetensorsBytes
{
    /// <summary>An 8-byte little-endian length, then the header as UTF-8, then the buffer.</summary>
    public static byte[] Craft(string header, byte[] buffer, ulong? declaredHeaderLength = null)
    {
        byte[] json = Encoding.UTF8.GetBytes(header);
        byte[] bytes = new byte[8 + json.Length + buffer.Length];
        BinaryPrimitives.WriteUInt64LittleEndian(bytes, declaredHeaderLength ?? (ulong)json.Length);
        json.CopyTo(bytes, 8);
        buffer.CopyTo(bytes, 8 + json.Length);
        return bytes;
    }

    /// <summary>A buffer of <paramref name="length"/> non-zero bytes.</summary>
    public static byte[] Buffer(int length) => [.. Enumerable.Range(0, length).Select(i => (byte)(0x11 + i))];
}

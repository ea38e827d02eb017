using System.Globalization;
using System.Runtime.InteropServices;

namespace EpA2A.Safetensors;

/// <summary>
/// One named tensor of a safetensors file: dtype, shape, and its bytes (contiguous, row-major, little-endian).
/// Immutable; a tensor read from a file shares the file's buffer.
/// </summary>
public sealed class SafetensorsTensor
{
    /// <summary>The header key that holds the file's metadata; no tensor may be named so.</summary>
    public const string MetadataKey = "__metadata__";

    private readonly long[] shape;

    private SafetensorsTensor(string name, SafetensorsDType dtype, long[] shape, long elementCount, ReadOnlyMemory<byte> data)
    {
        Name = name;
        DType = dtype;
        this.shape = shape;
        ElementCount = elementCount;
        Data = data;
    }

    /// <summary>The tensor's name (its header key).</summary>
    public string Name { get; }

    /// <summary>The element type.</summary>
    public SafetensorsDType DType { get; }

    /// <summary>Dimensions, outermost first; empty for a scalar.</summary>
    public ReadOnlySpan<long> Shape => shape;

    /// <summary>Dimensions.</summary>
    public int Rank => shape.Length;

    /// <summary>Elements: the product of <see cref="Shape"/> (1 for a scalar).</summary>
    public long ElementCount { get; }

    /// <summary>The raw bytes, <see cref="ElementCount"/> × the dtype's size.</summary>
    public ReadOnlyMemory<byte> Data { get; }

    /// <summary>The shape as text: "[2, 3]".</summary>
    public string ShapeText => FormatShape(shape);

    /// <summary>A tensor of CLR elements; the values are copied.</summary>
    /// <exception cref="ArgumentException">The name is reserved, a dimension is negative, or the values do not fill the shape.</exception>
    public static SafetensorsTensor FromValues<T>(string name, ReadOnlySpan<long> shape, ReadOnlySpan<T> values)
        where T : unmanaged
    {
        RequireLittleEndian();
        return FromBytes(name, SafetensorsDTypes.Of<T>(), shape, MemoryMarshal.AsBytes(values).ToArray());
    }

    /// <summary>A tensor of raw little-endian bytes of any dtype; the bytes are not copied.</summary>
    /// <exception cref="ArgumentException">The name is reserved, a dimension is negative, or the bytes do not fill the shape.</exception>
    public static SafetensorsTensor FromBytes(string name, SafetensorsDType dtype, ReadOnlySpan<long> shape, ReadOnlyMemory<byte> data)
    {
        ArgumentNullException.ThrowIfNull(name);
        if (name == MetadataKey)
        {
            throw new ArgumentException($"'{MetadataKey}' is reserved for the file's metadata and cannot name a tensor", nameof(name));
        }

        long count = CountElements(shape) ?? throw new ArgumentException(
            $"tensor '{name}': shape {FormatShape(shape)} has a negative dimension or more elements than fit in 64 bits", nameof(shape));
        long bytes = ByteLength(count, dtype) ?? throw new ArgumentException(
            $"tensor '{name}': shape {FormatShape(shape)} of {SafetensorsDTypes.NameOf(dtype)} needs more bytes than fit in 64 bits", nameof(shape));
        if (bytes != data.Length)
        {
            throw new ArgumentException(
                $"tensor '{name}': shape {FormatShape(shape)} of {SafetensorsDTypes.NameOf(dtype)} needs {bytes} bytes, but {data.Length} were given", nameof(data));
        }

        return new SafetensorsTensor(name, dtype, shape.ToArray(), count, data);
    }

    /// <summary>The elements as <typeparamref name="T"/>, copied.</summary>
    /// <exception cref="InvalidOperationException"><typeparamref name="T"/> is not this tensor's element type.</exception>
    public T[] ToArray<T>()
        where T : unmanaged
    {
        RequireLittleEndian();
        if (!SafetensorsDTypes.Matches<T>(DType))
        {
            throw new InvalidOperationException($"tensor '{Name}' holds {SafetensorsDTypes.NameOf(DType)}, which cannot be read as {typeof(T).Name}");
        }

        return MemoryMarshal.Cast<byte, T>(Data.Span).ToArray();
    }

    /// <summary>The element count of <paramref name="shape"/>; null when a dimension is negative or the product overflows.</summary>
    internal static long? CountElements(ReadOnlySpan<long> shape)
    {
        long count = 1;
        foreach (long dim in shape)
        {
            if (dim < 0)
            {
                return null;
            }

            if (dim != 0 && count > long.MaxValue / dim)
            {
                return null;
            }

            count *= dim;
        }

        return count;
    }

    /// <summary>Bytes of <paramref name="count"/> elements; null when that overflows.</summary>
    internal static long? ByteLength(long count, SafetensorsDType dtype)
    {
        int size = SafetensorsDTypes.SizeOf(dtype);
        return count > long.MaxValue / size ? null : count * size;
    }

    /// <summary>A tensor whose header the reader has already checked; shares <paramref name="data"/>.</summary>
    internal static SafetensorsTensor Trusted(string name, SafetensorsDType dtype, long[] shape, long elementCount, ReadOnlyMemory<byte> data) =>
        new(name, dtype, shape, elementCount, data);

    internal static string FormatShape(ReadOnlySpan<long> shape)
    {
        string[] dims = new string[shape.Length];
        for (int i = 0; i < shape.Length; i++)
        {
            dims[i] = shape[i].ToString(CultureInfo.InvariantCulture);
        }

        return $"[{string.Join(", ", dims)}]";
    }

    private static void RequireLittleEndian()
    {
        // safetensors data is little-endian; reinterpreting bytes as elements is only right on such a host.
        if (!BitConverter.IsLittleEndian)
        {
            throw new PlatformNotSupportedException("safetensors tensors are little-endian; this host is big-endian");
        }
    }
}

using System.Runtime.CompilerServices;

namespace EpA2A.Layer;

/// <summary>
/// A typed view of device memory: a pointer, a dense row-major shape, and the object that owns the memory (a
/// <see cref="Cuda.DeviceBuffer{T}"/>, a layer, or whatever the caller allocated with). The view owns
/// nothing: the memory must outlive its use. The layer checks shapes and element types only; the kernels
/// bounds-check ids and rows.
/// </summary>
/// <typeparam name="T">The element type.</typeparam>
public sealed class DeviceTensor<T>
    where T : unmanaged
{
    private readonly int[] lengths;

    /// <summary>Creates a view of <paramref name="pointer"/> with <paramref name="lengths"/>.</summary>
    /// <exception cref="ArgumentException">A length is negative, or the pointer is null for a non-empty shape.</exception>
    public DeviceTensor(nint pointer, ReadOnlySpan<int> lengths, object? owner = null)
    {
        long count = 1;
        foreach (int d in lengths)
        {
            if (d < 0)
            {
                throw new ArgumentException($"shape [{string.Join(", ", lengths.ToArray())}] has a negative length", nameof(lengths));
            }

            count *= d;
        }

        if (pointer == 0 && count > 0)
        {
            throw new ArgumentException("a non-empty device tensor needs a non-null pointer", nameof(pointer));
        }

        Pointer = pointer;
        this.lengths = lengths.ToArray();
        FlattenedLength = count;
        Owner = owner;
    }

    /// <summary>The device address of element [0, ..., 0].</summary>
    public nint Pointer { get; }

    /// <summary>The shape, outermost first (dense, row-major).</summary>
    public ReadOnlySpan<int> Lengths => lengths;

    /// <summary>Dimensions.</summary>
    public int Rank => lengths.Length;

    /// <summary>Elements in the view.</summary>
    public long FlattenedLength { get; }

    /// <summary>Bytes in the view.</summary>
    public long ByteLength => FlattenedLength * Unsafe.SizeOf<T>();

    /// <summary>Who owns the memory (for diagnostics and lifetime reasoning); null when unknown.</summary>
    public object? Owner { get; }

    /// <inheritdoc />
    public override string ToString() => $"DeviceTensor<{typeof(T).Name}>[{string.Join(", ", lengths)}] at 0x{Pointer:x}";
}

using System.Numerics.Tensors;
using System.Runtime.InteropServices;

namespace EpA2A.Numerics;

/// <summary>
/// Row-major copies out of a <see cref="Tensor{T}"/>. <see cref="Tensor{T}.FlattenTo"/> walks every element
/// through the library's generic indexing, which for a struct such as <see cref="BFloat16"/> costs about as much
/// as the whole CPU step; a tensor laid out row-major without gaps (what <c>Tensor.Create(array, lengths)</c>
/// makes) is one block copy instead.
/// </summary>
public static class DenseTensor
{
    /// <summary>Copies <paramref name="source"/>'s elements, in row-major order, to the start of <paramref name="destination"/>.</summary>
    /// <exception cref="ArgumentException"><paramref name="destination"/> is shorter than the tensor.</exception>
    public static void CopyTo<T>(Tensor<T> source, Span<T> destination)
    {
        ArgumentNullException.ThrowIfNull(source);
        if (destination.Length < source.FlattenedLength)
        {
            throw new ArgumentException($"destination has {destination.Length} elements, the tensor {source.FlattenedLength}", nameof(destination));
        }

        if (TryGetRowMajorSpan(source, out ReadOnlySpan<T> elements))
        {
            elements.CopyTo(destination);
        }
        else
        {
            source.FlattenTo(destination);
        }
    }

    /// <summary>A new array of <paramref name="source"/>'s elements in row-major order.</summary>
    public static T[] ToArray<T>(Tensor<T> source)
    {
        ArgumentNullException.ThrowIfNull(source);
        T[] flat = new T[checked((int)source.FlattenedLength)];
        CopyTo(source, flat);
        return flat;
    }

    /// <summary>
    /// The tensor's elements as one span when they lie row-major without gaps: every dimension longer than one has
    /// the stride of the dimensions after it (the library gives length-1 dimensions stride 0).
    /// </summary>
    internal static bool TryGetRowMajorSpan<T>(Tensor<T> source, out ReadOnlySpan<T> elements)
    {
        elements = default;
        long length = source.FlattenedLength;
        if (length == 0)
        {
            return true;
        }

        if (!source.IsDense || length > int.MaxValue)
        {
            return false;
        }

        ReadOnlySpan<nint> lengths = source.Lengths;
        ReadOnlySpan<nint> strides = source.Strides;
        long expected = 1;
        for (int d = lengths.Length - 1; d >= 0; d--)
        {
            if (lengths[d] > 1 && strides[d] != expected)
            {
                return false;
            }

            expected *= lengths[d];
        }

        elements = MemoryMarshal.CreateReadOnlySpan(ref source.GetPinnableReference(), (int)length);
        return true;
    }
}

using System.Numerics.Tensors;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Runtime.Intrinsics;

namespace EpA2A.Numerics;

/// <summary>
/// Whole rows of token elements to and from fp32, vectorized: the CPU backend's and the layer's hot loops.
/// Every result is bit-identical to the element-wise <see cref="TokenConvert"/> (which the reference keeps using,
/// so the two are independent): widening is exact, narrowing rounds to nearest even like
/// <see cref="BFloat16.FromSingle"/> and the <see cref="Half"/> cast, and a scaled sum is a multiply then an add,
/// never fused.
/// </summary>
/// <remarks>
/// The loops are compiled optimized from their first call: a short run (a demo's ten steps) would otherwise spend
/// its time in the unoptimized first tier, where every vector operation is a call.
/// </remarks>
internal static class TokenRows
{
    /// <summary>Floats widened at a time on the stack by <see cref="Accumulate{T}"/>.</summary>
    private const int Block = 512;

    /// <summary>Widens <paramref name="row"/> exactly into <paramref name="destination"/> (same length).</summary>
    public static void Widen<T>(ReadOnlySpan<T> row, Span<float> destination)
        where T : unmanaged
    {
        if (row.Length != destination.Length)
        {
            throw new ArgumentException($"row has {row.Length} elements, destination {destination.Length}", nameof(destination));
        }

        if (typeof(T) == typeof(float))
        {
            MemoryMarshal.Cast<T, float>(row).CopyTo(destination);
        }
        else if (typeof(T) == typeof(BFloat16))
        {
            WidenBFloat16(MemoryMarshal.Cast<T, ushort>(row), MemoryMarshal.Cast<float, uint>(destination));
        }
        else if (typeof(T) == typeof(Half))
        {
            TensorPrimitives.ConvertToSingle(MemoryMarshal.Cast<T, Half>(row), destination);
        }
        else
        {
            throw new NotSupportedException($"{typeof(T).Name} is not a token type");
        }
    }

    /// <summary>Rounds <paramref name="source"/> to the element type (nearest even) into <paramref name="destination"/> (same length).</summary>
    public static void Narrow<T>(ReadOnlySpan<float> source, Span<T> destination)
        where T : unmanaged
    {
        if (source.Length != destination.Length)
        {
            throw new ArgumentException($"source has {source.Length} elements, destination {destination.Length}", nameof(destination));
        }

        if (typeof(T) == typeof(float))
        {
            source.CopyTo(MemoryMarshal.Cast<T, float>(destination));
        }
        else if (typeof(T) == typeof(BFloat16))
        {
            NarrowBFloat16(MemoryMarshal.Cast<float, uint>(source), MemoryMarshal.Cast<T, ushort>(destination));
        }
        else if (typeof(T) == typeof(Half))
        {
            TensorPrimitives.ConvertToHalf(source, MemoryMarshal.Cast<T, Half>(destination));
        }
        else
        {
            throw new NotSupportedException($"{typeof(T).Name} is not a token type");
        }
    }

    /// <summary><c>acc[i] += row[i] * scale</c>, the product rounded before the sum (as <see cref="TokenConvert.Accumulate{T}"/>).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Accumulate<T>(ReadOnlySpan<T> row, Span<float> acc, float scale)
        where T : unmanaged
    {
        if (row.Length != acc.Length)
        {
            throw new ArgumentException($"row has {row.Length} elements, accumulator {acc.Length}", nameof(row));
        }

        Span<float> wide = stackalloc float[Block];
        for (int start = 0; start < row.Length; start += Block)
        {
            int length = Math.Min(Block, row.Length - start);
            Span<float> chunk = wide[..length];
            Widen(row.Slice(start, length), chunk);
            if (scale != 1f)
            {
                Affine(chunk, scale, 0f);
            }

            Add(chunk, acc.Slice(start, length));
        }
    }

    /// <summary><c>x[i] = (x[i] * scale) - shift</c>, two roundings (the product, then the difference).</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Affine(Span<float> x, float scale, float shift)
    {
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            ref float at = ref MemoryMarshal.GetReference(x);
            Vector256<float> a = Vector256.Create(scale);
            Vector256<float> b = Vector256.Create(shift);
            for (; i <= x.Length - Vector256<float>.Count; i += Vector256<float>.Count)
            {
                ((Vector256.LoadUnsafe(ref at, (nuint)i) * a) - b).StoreUnsafe(ref at, (nuint)i);
            }
        }

        for (; i < x.Length; i++)
        {
            x[i] = (x[i] * scale) - shift;
        }
    }

    /// <summary><c>acc[i] += partial[i]</c>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public static void Add(ReadOnlySpan<float> partial, Span<float> acc)
    {
        if (partial.Length != acc.Length)
        {
            throw new ArgumentException($"partial has {partial.Length} elements, accumulator {acc.Length}", nameof(partial));
        }

        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            ref float from = ref MemoryMarshal.GetReference(partial);
            ref float to = ref MemoryMarshal.GetReference(acc);
            for (; i <= acc.Length - Vector256<float>.Count; i += Vector256<float>.Count)
            {
                (Vector256.LoadUnsafe(ref to, (nuint)i) + Vector256.LoadUnsafe(ref from, (nuint)i)).StoreUnsafe(ref to, (nuint)i);
            }
        }

        for (; i < acc.Length; i++)
        {
            acc[i] += partial[i];
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void WidenBFloat16(ReadOnlySpan<ushort> bits, Span<uint> destination)
    {
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            ref ushort src = ref MemoryMarshal.GetReference(bits);
            ref uint dst = ref MemoryMarshal.GetReference(destination);
            for (; i <= bits.Length - Vector256<ushort>.Count; i += Vector256<ushort>.Count)
            {
                (Vector256<uint> lower, Vector256<uint> upper) = Vector256.Widen(Vector256.LoadUnsafe(ref src, (nuint)i));
                Vector256.ShiftLeft(lower, 16).StoreUnsafe(ref dst, (nuint)i);
                Vector256.ShiftLeft(upper, 16).StoreUnsafe(ref dst, (nuint)(i + Vector256<uint>.Count));
            }
        }

        for (; i < bits.Length; i++)
        {
            destination[i] = (uint)bits[i] << 16;
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    private static void NarrowBFloat16(ReadOnlySpan<uint> source, Span<ushort> destination)
    {
        int i = 0;
        if (Vector256.IsHardwareAccelerated)
        {
            ref uint src = ref MemoryMarshal.GetReference(source);
            ref ushort dst = ref MemoryMarshal.GetReference(destination);
            for (; i <= source.Length - Vector256<ushort>.Count; i += Vector256<ushort>.Count)
            {
                Vector256<uint> lower = Round(Vector256.LoadUnsafe(ref src, (nuint)i));
                Vector256<uint> upper = Round(Vector256.LoadUnsafe(ref src, (nuint)(i + Vector256<uint>.Count)));
                Vector256.Narrow(lower, upper).StoreUnsafe(ref dst, (nuint)i);
            }
        }

        for (; i < source.Length; i++)
        {
            destination[i] = BFloat16.FromSingle(BitConverter.UInt32BitsToSingle(source[i])).RawBits;
        }
    }

    /// <summary>The bfloat16 bits of eight floats in the low halves: what <see cref="BFloat16.FromSingle"/> does to each.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static Vector256<uint> Round(Vector256<uint> u)
    {
        Vector256<uint> nan = Vector256.GreaterThan(u & Vector256.Create(0x7FFF_FFFFu), Vector256.Create(0x7F80_0000u));
        Vector256<uint> quiet = Vector256.ShiftRightLogical(u, 16) | Vector256.Create(0x0040u);
        Vector256<uint> lsb = Vector256.ShiftRightLogical(u, 16) & Vector256<uint>.One;
        Vector256<uint> rounded = Vector256.ShiftRightLogical(u + Vector256.Create(0x7FFFu) + lsb, 16);
        return Vector256.ConditionalSelect(nan, quiet, rounded);
    }
}

using System.Runtime.CompilerServices;

namespace EpA2A.Numerics;

/// <summary>
/// Widening to and narrowing from fp32 for the three token element types. The typeof checks fold away
/// when the JIT specializes for a value type, so this costs nothing per element.
/// </summary>
public static class TokenConvert
{
    /// <summary>Exact widening of one element to float.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float ToSingle<T>(T value)
        where T : unmanaged
    {
        if (typeof(T) == typeof(float))
        {
            return Unsafe.As<T, float>(ref value);
        }

        if (typeof(T) == typeof(BFloat16))
        {
            return Unsafe.As<T, BFloat16>(ref value).ToSingle();
        }

        if (typeof(T) == typeof(Half))
        {
            return (float)Unsafe.As<T, Half>(ref value);
        }

        throw new NotSupportedException($"{typeof(T).Name} is not a token type");
    }

    /// <summary>Rounds a float to the element type, to nearest even.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static T FromSingle<T>(float value)
        where T : unmanaged
    {
        if (typeof(T) == typeof(float))
        {
            return Unsafe.As<float, T>(ref value);
        }

        if (typeof(T) == typeof(BFloat16))
        {
            BFloat16 b = BFloat16.FromSingle(value);
            return Unsafe.As<BFloat16, T>(ref b);
        }

        if (typeof(T) == typeof(Half))
        {
            Half h = (Half)value;
            return Unsafe.As<Half, T>(ref h);
        }

        throw new NotSupportedException($"{typeof(T).Name} is not a token type");
    }

    /// <summary>Adds a row of elements to an fp32 accumulator, optionally scaled.</summary>
    public static void Accumulate<T>(ReadOnlySpan<T> row, Span<float> acc, float scale)
        where T : unmanaged
    {
        if (row.Length != acc.Length)
        {
            throw new ArgumentException($"row has {row.Length} elements, accumulator {acc.Length}", nameof(row));
        }

        for (int i = 0; i < row.Length; i++)
        {
            acc[i] += ToSingle(row[i]) * scale;
        }
    }

    /// <summary>Rounds an fp32 row to the element type.</summary>
    public static void Round<T>(ReadOnlySpan<float> acc, Span<T> destination)
        where T : unmanaged
    {
        if (acc.Length != destination.Length)
        {
            throw new ArgumentException($"accumulator has {acc.Length} elements, destination {destination.Length}", nameof(destination));
        }

        for (int i = 0; i < acc.Length; i++)
        {
            destination[i] = FromSingle<T>(acc[i]);
        }
    }
}

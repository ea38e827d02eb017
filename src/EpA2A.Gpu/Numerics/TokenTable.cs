using System.Runtime.CompilerServices;

namespace EpA2A.Numerics;

/// <summary>
/// An elementwise function of a 16-bit token type (bf16, fp16) tabulated for all 65536 inputs: y = f(x) rounded
/// to the type, so applying it costs one load instead of a widening, a call and a rounding. The reference and the
/// stand-in experts use it on steps of billions of elements; the result is bit for bit the direct computation.
/// </summary>
/// <typeparam name="T">BFloat16 or Half.</typeparam>
public sealed class TokenTable<T>
    where T : unmanaged
{
    private readonly T[] values = new T[1 << 16];

    /// <summary>Tabulates <c>FromSingle(f(ToSingle(x)))</c> for every 16-bit x.</summary>
    /// <exception cref="NotSupportedException"><typeparamref name="T"/> is not a 16-bit token type.</exception>
    public TokenTable(Func<float, float> f)
    {
        ArgumentNullException.ThrowIfNull(f);
        if (!TokenTable.Supports<T>())
        {
            throw new NotSupportedException($"{typeof(T).Name} is not a 16-bit token type");
        }

        for (int bits = 0; bits < values.Length; bits++)
        {
            ushort b = (ushort)bits;
            values[bits] = TokenConvert.FromSingle<T>(f(TokenConvert.ToSingle(Unsafe.As<ushort, T>(ref b))));
        }
    }

    /// <summary>f(x), rounded to <typeparamref name="T"/>.</summary>
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public T Apply(T x) => values[Unsafe.As<T, ushort>(ref x)];

    /// <summary>dst[i] = f(src[i]) for every element.</summary>
    public void Apply(ReadOnlySpan<T> src, Span<T> dst)
    {
        if (src.Length != dst.Length)
        {
            throw new ArgumentException($"source has {src.Length} elements, destination {dst.Length}", nameof(dst));
        }

        T[] v = values;
        for (int i = 0; i < src.Length; i++)
        {
            T x = src[i];
            dst[i] = v[Unsafe.As<T, ushort>(ref x)];
        }
    }
}

/// <summary>Which token types a <see cref="TokenTable{T}"/> exists for.</summary>
public static class TokenTable
{
    /// <summary>True when <typeparamref name="T"/> is a 16-bit token type (bf16 or fp16).</summary>
    public static bool Supports<T>()
        where T : unmanaged => typeof(T) == typeof(BFloat16) || typeof(T) == typeof(Half);
}

using System.Globalization;
using System.Runtime.InteropServices;

namespace EpA2A.Numerics;

/// <summary>
/// bfloat16: the upper 16 bits of an IEEE binary32. .NET has no such type, so this is ours.
/// Conversion from float rounds to nearest, ties to even; NaN stays NaN (quiet).
/// </summary>
[StructLayout(LayoutKind.Sequential, Size = 2)]
public readonly struct BFloat16 : IEquatable<BFloat16>, IComparable<BFloat16>, IFormattable
{
    private readonly ushort bits;

    private BFloat16(ushort bits) => this.bits = bits;

    /// <summary>The raw 16 bits.</summary>
    public ushort RawBits => bits;

    /// <summary>Builds a value from its raw 16 bits.</summary>
    public static BFloat16 FromBits(ushort bits) => new(bits);

    /// <summary>Rounds a float to the nearest bfloat16, ties to even.</summary>
    public static BFloat16 FromSingle(float value)
    {
        uint u = BitConverter.SingleToUInt32Bits(value);
        if ((u & 0x7FFF_FFFFu) > 0x7F80_0000u)
        {
            // NaN: keep the sign and force a quiet mantissa bit so truncation cannot turn it into infinity.
            return new BFloat16((ushort)((u >> 16) | 0x0040u));
        }

        uint lsb = (u >> 16) & 1u;
        u += 0x7FFFu + lsb;
        return new BFloat16((ushort)(u >> 16));
    }

    /// <summary>The exact float value of this bfloat16.</summary>
    public float ToSingle() => BitConverter.UInt32BitsToSingle((uint)bits << 16);

    /// <summary>Widening conversion: exact.</summary>
    public static explicit operator float(BFloat16 value) => value.ToSingle();

    /// <summary>Narrowing conversion: round to nearest even.</summary>
    public static explicit operator BFloat16(float value) => FromSingle(value);

    /// <inheritdoc />
    public bool Equals(BFloat16 other) => bits == other.bits;

    /// <inheritdoc />
    public override bool Equals(object? obj) => obj is BFloat16 other && Equals(other);

    /// <inheritdoc />
    public override int GetHashCode() => bits;

    /// <inheritdoc />
    public int CompareTo(BFloat16 other) => ToSingle().CompareTo(other.ToSingle());

    /// <inheritdoc />
    public override string ToString() => ToSingle().ToString(CultureInfo.InvariantCulture);

    /// <inheritdoc />
    public string ToString(string? format, IFormatProvider? formatProvider) => ToSingle().ToString(format, formatProvider);

    /// <summary>Bitwise equality.</summary>
    public static bool operator ==(BFloat16 left, BFloat16 right) => left.Equals(right);

    /// <summary>Bitwise inequality.</summary>
    public static bool operator !=(BFloat16 left, BFloat16 right) => !left.Equals(right);

    /// <summary>Ordering by value.</summary>
    public static bool operator <(BFloat16 left, BFloat16 right) => left.CompareTo(right) < 0;

    /// <summary>Ordering by value.</summary>
    public static bool operator >(BFloat16 left, BFloat16 right) => left.CompareTo(right) > 0;

    /// <summary>Ordering by value.</summary>
    public static bool operator <=(BFloat16 left, BFloat16 right) => left.CompareTo(right) <= 0;

    /// <summary>Ordering by value.</summary>
    public static bool operator >=(BFloat16 left, BFloat16 right) => left.CompareTo(right) >= 0;
}

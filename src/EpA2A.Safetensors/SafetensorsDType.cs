using EpA2A.Numerics;

namespace EpA2A.Safetensors;

/// <summary>
/// The element types a safetensors header may name. Only whole-byte types: the sub-byte float formats
/// (F4, F6_*) are refused as unsupported, since a tensor of them has no byte-exact row-major layout here.
/// </summary>
public enum SafetensorsDType
{
    /// <summary>"BOOL": one byte, 0 or 1.</summary>
    Bool,

    /// <summary>"U8".</summary>
    UInt8,

    /// <summary>"I8".</summary>
    Int8,

    /// <summary>"F8_E5M2": raw bytes (no CLR type).</summary>
    Float8E5M2,

    /// <summary>"F8_E4M3": raw bytes (no CLR type).</summary>
    Float8E4M3,

    /// <summary>"F8_E8M0": raw bytes (no CLR type).</summary>
    Float8E8M0,

    /// <summary>"I16".</summary>
    Int16,

    /// <summary>"U16".</summary>
    UInt16,

    /// <summary>"F16": IEEE binary16 (<see cref="Half"/>).</summary>
    Float16,

    /// <summary>"BF16": bfloat16 (<see cref="Numerics.BFloat16"/>).</summary>
    BFloat16,

    /// <summary>"I32".</summary>
    Int32,

    /// <summary>"U32".</summary>
    UInt32,

    /// <summary>"F32".</summary>
    Float32,

    /// <summary>"F64".</summary>
    Float64,

    /// <summary>"I64".</summary>
    Int64,

    /// <summary>"U64".</summary>
    UInt64,
}

/// <summary>Names, sizes and CLR types of <see cref="SafetensorsDType"/>.</summary>
public static class SafetensorsDTypes
{
    private static readonly (SafetensorsDType Type, string Name, int Size, Type? Clr)[] Table =
    [
        (SafetensorsDType.Bool, "BOOL", 1, typeof(bool)),
        (SafetensorsDType.UInt8, "U8", 1, typeof(byte)),
        (SafetensorsDType.Int8, "I8", 1, typeof(sbyte)),
        (SafetensorsDType.Float8E5M2, "F8_E5M2", 1, null),
        (SafetensorsDType.Float8E4M3, "F8_E4M3", 1, null),
        (SafetensorsDType.Float8E8M0, "F8_E8M0", 1, null),
        (SafetensorsDType.Int16, "I16", 2, typeof(short)),
        (SafetensorsDType.UInt16, "U16", 2, typeof(ushort)),
        (SafetensorsDType.Float16, "F16", 2, typeof(Half)),
        (SafetensorsDType.BFloat16, "BF16", 2, typeof(BFloat16)),
        (SafetensorsDType.Int32, "I32", 4, typeof(int)),
        (SafetensorsDType.UInt32, "U32", 4, typeof(uint)),
        (SafetensorsDType.Float32, "F32", 4, typeof(float)),
        (SafetensorsDType.Float64, "F64", 8, typeof(double)),
        (SafetensorsDType.Int64, "I64", 8, typeof(long)),
        (SafetensorsDType.UInt64, "U64", 8, typeof(ulong)),
    ];

    /// <summary>Every dtype, in the order of <see cref="SafetensorsDType"/>.</summary>
    public static IReadOnlyList<SafetensorsDType> All { get; } = [.. Table.Select(e => e.Type)];

    /// <summary>The names this reader accepts, for error messages.</summary>
    public static string KnownNames { get; } = string.Join(", ", Table.Select(e => e.Name));

    /// <summary>The name a safetensors header uses ("BF16").</summary>
    public static string NameOf(SafetensorsDType type) => Entry(type).Name;

    /// <summary>Bytes per element.</summary>
    public static int SizeOf(SafetensorsDType type) => Entry(type).Size;

    /// <summary>The dtype a header name stands for; names are case-sensitive, as the format defines them.</summary>
    public static bool TryParse(string name, out SafetensorsDType type)
    {
        foreach ((SafetensorsDType t, string n, _, _) in Table)
        {
            if (string.Equals(n, name, StringComparison.Ordinal))
            {
                type = t;
                return true;
            }
        }

        type = default;
        return false;
    }

    /// <summary>The dtype whose CLR element type is <typeparamref name="T"/>.</summary>
    /// <exception cref="NotSupportedException"><typeparamref name="T"/> is no safetensors element type.</exception>
    public static SafetensorsDType Of<T>()
        where T : unmanaged
    {
        foreach ((SafetensorsDType t, _, _, Type? clr) in Table)
        {
            if (clr == typeof(T))
            {
                return t;
            }
        }

        throw new NotSupportedException($"{typeof(T).Name} is no safetensors element type");
    }

    /// <summary>
    /// True when elements of <paramref name="type"/> may be read as <typeparamref name="T"/>: its own CLR type,
    /// or bytes for the fp8 types, which have none.
    /// </summary>
    public static bool Matches<T>(SafetensorsDType type)
        where T : unmanaged
    {
        Type? clr = Entry(type).Clr;
        return clr is null ? typeof(T) == typeof(byte) : clr == typeof(T);
    }

    private static (SafetensorsDType Type, string Name, int Size, Type? Clr) Entry(SafetensorsDType type) =>
        (uint)type < (uint)Table.Length
            ? Table[(int)type]
            : throw new ArgumentOutOfRangeException(nameof(type), type, "unknown safetensors dtype");
}

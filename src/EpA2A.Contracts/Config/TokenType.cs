namespace EpA2A.Config;

/// <summary>The element type of the tokens that dispatch moves and combine sums.</summary>
public enum TokenType
{
    /// <summary>bfloat16: 8-bit exponent, 7-bit mantissa (the default, as in the Python original).</summary>
    BFloat16 = 0,

    /// <summary>IEEE 754 binary16.</summary>
    Float16 = 1,

    /// <summary>IEEE 754 binary32.</summary>
    Float32 = 2,
}

/// <summary>The element type of routing weights. Only fp32 exists today; the enum keeps the config honest.</summary>
public enum WeightType
{
    /// <summary>IEEE 754 binary32.</summary>
    Float32 = 0,
}

/// <summary>Facts about a <see cref="TokenType"/>.</summary>
public static class TokenTypeInfo
{
    /// <summary>Bytes per element.</summary>
    public static int SizeOf(TokenType type) => type switch
    {
        TokenType.BFloat16 => 2,
        TokenType.Float16 => 2,
        TokenType.Float32 => 4,
        _ => throw new ArgumentOutOfRangeException(nameof(type), type, "unknown token type"),
    };

    /// <summary>The short name the command lines, tables and files use: "bf16", "fp16" or "fp32".</summary>
    public static string Name(TokenType type) => type switch
    {
        TokenType.BFloat16 => "bf16",
        TokenType.Float16 => "fp16",
        TokenType.Float32 => "fp32",
        _ => throw new ArgumentOutOfRangeException(nameof(type), type, "unknown token type"),
    };

    /// <summary>
    /// Reads a token type from its short name or a common alias, ignoring case: bf16 / bfloat16, fp16 / f16 / float16,
    /// fp32 / f32 / float32. The one parser of token types: each command turns a false into its own usage error.
    /// </summary>
    public static bool TryParse(string? text, out TokenType type)
    {
        switch (text?.Trim().ToUpperInvariant())
        {
            case "BF16" or "BFLOAT16":
                type = TokenType.BFloat16;
                return true;
            case "FP16" or "F16" or "FLOAT16":
                type = TokenType.Float16;
                return true;
            case "FP32" or "F32" or "FLOAT32":
                type = TokenType.Float32;
                return true;
            default:
                type = default;
                return false;
        }
    }

    /// <summary>The token type whose CLR element type is <typeparamref name="T"/>.</summary>
    public static TokenType Of<T>()
        where T : unmanaged
    {
        if (typeof(T) == typeof(Numerics.BFloat16))
        {
            return TokenType.BFloat16;
        }

        if (typeof(T) == typeof(Half))
        {
            return TokenType.Float16;
        }

        if (typeof(T) == typeof(float))
        {
            return TokenType.Float32;
        }

        throw new NotSupportedException($"{typeof(T).Name} is not a token type: use BFloat16, Half or float");
    }
}

namespace EpA2A.LowLatency;

/// <summary>The element format of the low-latency dispatch output.</summary>
public enum LowLatencyFormat
{
    /// <summary>bf16 rows, moved bit for bit.</summary>
    Bf16 = 0,

    /// <summary>FP8 e4m3 rows with one fp32 scale per 128 channels of a token (Hidden must be a multiple of 128).</summary>
    Fp8 = 1,
}

/// <summary>How a low-latency dispatch sends its tokens.</summary>
/// <param name="Format">bf16 (default) or FP8 e4m3.</param>
/// <param name="PowerOfTwoScales">
/// FP8 only: round each scale up to a power of two (UE8M0), as block-scaled FP8 GEMMs want. Ignored for bf16.
/// </param>
public sealed record LowLatencyDispatchOptions(LowLatencyFormat Format = LowLatencyFormat.Bf16, bool PowerOfTwoScales = false)
{
    /// <summary>The channels that share one FP8 scale.</summary>
    public const int ScaleGroup = 128;

    /// <summary>bf16 rows.</summary>
    public static LowLatencyDispatchOptions Bf16 { get; } = new();

    /// <summary>FP8 rows, scale = amax / 448.</summary>
    public static LowLatencyDispatchOptions Fp8 { get; } = new(LowLatencyFormat.Fp8);

    /// <summary>FP8 rows, scale = the smallest power of two at least amax / 448.</summary>
    public static LowLatencyDispatchOptions Fp8PowerOfTwo { get; } = new(LowLatencyFormat.Fp8, PowerOfTwoScales: true);
}

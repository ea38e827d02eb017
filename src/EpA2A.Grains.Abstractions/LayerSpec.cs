using EpA2A.Config;
using EpA2A.LowLatency;

namespace EpA2A.Grains;

/// <summary>
/// A layer's configuration as it crosses the wire: everything of <see cref="EpConfig"/> but the rank, plus
/// the step deadline. Every rank builds its own <see cref="EpConfig"/> from it, so they cannot disagree.
/// </summary>
[GenerateSerializer]
[Immutable]
public sealed record LayerSpec
{
    /// <summary>Tokens per rank per step, at most.</summary>
    [Id(0)]
    public required int MaxTokens { get; init; }

    /// <summary>Elements per token.</summary>
    [Id(1)]
    public required int Hidden { get; init; }

    /// <summary>Experts per token.</summary>
    [Id(2)]
    public required int TopK { get; init; }

    /// <summary>Experts in the group.</summary>
    [Id(3)]
    public required int NumExperts { get; init; }

    /// <summary>Ranks in the group.</summary>
    [Id(4)]
    public required int WorldSize { get; init; }

    /// <summary>Ranks per node (equal to WorldSize: the intra-node algorithm).</summary>
    [Id(5)]
    public int? LocalWorldSize { get; init; }

    /// <summary>Token element type.</summary>
    [Id(6)]
    public TokenType TokenType { get; init; } = TokenType.BFloat16;

    /// <summary>Local combine (single node).</summary>
    [Id(7)]
    public bool EnableLocalCombine { get; init; }

    /// <summary>Alignment of each local expert's rows.</summary>
    [Id(8)]
    public int ExpertAlignment { get; init; } = 1;

    /// <summary>SMs for GPU kernels.</summary>
    [Id(9)]
    public int NumSms { get; init; } = 20;

    /// <summary>Ahead-of-time kernels (CUDA).</summary>
    [Id(10)]
    public bool UseAot { get; init; }

    /// <summary>Each collective operation, and each step through the grains, must finish within this.</summary>
    [Id(11)]
    public TimeSpan StepTimeout { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>Which layer the ranks run: the normal one (default) or the low-latency (decode) one.</summary>
    [Id(12)]
    public LayerMode Mode { get; init; } = LayerMode.Normal;

    /// <summary>Low-latency mode: the dispatch format (bf16, or FP8 with Hidden a multiple of 128, optionally power-of-two scales).</summary>
    [Id(13)]
    public LowLatencyFormat LowLatencyFormat { get; init; } = LowLatencyFormat.Bf16;

    /// <summary>Low-latency FP8: power-of-two (UE8M0) scales.</summary>
    [Id(14)]
    public bool PowerOfTwoScales { get; init; }

    /// <summary>The low-latency dispatch options these fields describe.</summary>
    public LowLatencyDispatchOptions LowLatencyDispatch => new(LowLatencyFormat, PowerOfTwoScales && LowLatencyFormat == LowLatencyFormat.Fp8);

    /// <summary>
    /// What the coordinator does when a rank is lost (its silo dead, stalled past the deadline, or cut off): fail the
    /// step and re-form with every rank (the default), or mask the rank and keep serving on the survivors.
    /// </summary>
    [Id(15)]
    public LostRankPolicy OnLostRank { get; init; } = LostRankPolicy.FailAndReform;

    /// <summary>The configuration of <paramref name="rank"/>; throws <see cref="ArgumentException"/> naming a bad field.</summary>
    public EpConfig ToConfig(int rank) => new(
        MaxTokens,
        Hidden,
        TopK,
        NumExperts,
        rank,
        WorldSize,
        LocalWorldSize ?? WorldSize,
        TokenType,
        numSms: NumSms,
        enableLocalCombine: EnableLocalCombine,
        useAot: UseAot,
        expertAlignment: ExpertAlignment);

    /// <summary>How <paramref name="to"/> differs from this spec, field by field ("NumExperts 16 -> 32, Hidden 64 -> 128").</summary>
    public string DescribeChanges(LayerSpec to)
    {
        ArgumentNullException.ThrowIfNull(to);
        (string Name, object? From, object? To)[] fields =
        [
            (nameof(MaxTokens), MaxTokens, to.MaxTokens),
            (nameof(Hidden), Hidden, to.Hidden),
            (nameof(TopK), TopK, to.TopK),
            (nameof(NumExperts), NumExperts, to.NumExperts),
            (nameof(WorldSize), WorldSize, to.WorldSize),
            (nameof(LocalWorldSize), LocalWorldSize ?? WorldSize, to.LocalWorldSize ?? to.WorldSize),
            (nameof(TokenType), TokenType, to.TokenType),
            (nameof(EnableLocalCombine), EnableLocalCombine, to.EnableLocalCombine),
            (nameof(ExpertAlignment), ExpertAlignment, to.ExpertAlignment),
            (nameof(NumSms), NumSms, to.NumSms),
            (nameof(UseAot), UseAot, to.UseAot),
            (nameof(StepTimeout), StepTimeout, to.StepTimeout),
            (nameof(OnLostRank), OnLostRank, to.OnLostRank),
            (nameof(Mode), Mode, to.Mode),
            (nameof(LowLatencyFormat), LowLatencyFormat, to.LowLatencyFormat),
            (nameof(PowerOfTwoScales), PowerOfTwoScales, to.PowerOfTwoScales),
        ];
        string[] changed = [.. fields.Where(f => !Equals(f.From, f.To)).Select(f => $"{f.Name} {f.From} -> {f.To}")];
        return changed.Length > 0 ? string.Join(", ", changed) : Equals(to) ? "no change" : "a field not listed here";
    }

    /// <summary>Validates every field (as rank 0) and the deadline.</summary>
    public LayerSpec Validated()
    {
        EpConfig config = ToConfig(0);
        if (!Enum.IsDefined(Mode))
        {
            throw new ArgumentException($"LayerSpec.Mode = {Mode} is not Normal or LowLatency", nameof(Mode));
        }

        if (Mode == LayerMode.LowLatency)
        {
            LowLatencyConfigRules.Check(config);
            LowLatencyConfigRules.CheckFormat(config, LowLatencyDispatch);
        }

        if (StepTimeout <= TimeSpan.Zero || StepTimeout > TimeSpan.FromHours(1))
        {
            throw new ArgumentException($"LayerSpec.StepTimeout = {StepTimeout} must be in (0, 1 h]", nameof(StepTimeout));
        }

        return this;
    }
}

/// <summary>Which layer a <see cref="LayerSpec"/> asks the ranks to run.</summary>
public enum LayerMode
{
    /// <summary>The normal layer (<c>EpAll2AllLayer</c>): any token type, inter-node, growable buffers.</summary>
    Normal = 0,

    /// <summary>The low-latency layer (<c>EpLowLatencyLayer</c>): decode-sized steps, fixed capacity, expert-major layout, bf16 or FP8 dispatch.</summary>
    LowLatency = 1,
}

namespace EpA2A.Config;

/// <summary>
/// The configuration of one rank's expert-parallel all-to-all layer. Every rank of a group holds the same
/// values except <see cref="Rank"/>. Validated on construction: a bad value is an
/// <see cref="ArgumentException"/> that names the field and the rule.
/// </summary>
public sealed record EpConfig
{
    /// <summary>Builds and validates a configuration.</summary>
    /// <exception cref="ArgumentException">A field breaks its rule; the message names the field and the rule.</exception>
    public EpConfig(
        int maxTokens,
        int hidden,
        int topK,
        int numExperts,
        int rank,
        int worldSize,
        int localWorldSize,
        TokenType tokenType = TokenType.BFloat16,
        WeightType weightType = WeightType.Float32,
        int numSms = 20,
        bool enableLocalCombine = false,
        bool useAot = false,
        int expertAlignment = 1)
    {
        MaxTokens = maxTokens;
        Hidden = hidden;
        TopK = topK;
        NumExperts = numExperts;
        Rank = rank;
        WorldSize = worldSize;
        LocalWorldSize = localWorldSize;
        TokenType = tokenType;
        WeightType = weightType;
        NumSms = numSms;
        EnableLocalCombine = enableLocalCombine;
        UseAot = useAot;
        ExpertAlignment = expertAlignment;
        Validate();
    }

    /// <summary>The largest number of tokens one rank dispatches in a step.</summary>
    public int MaxTokens { get; }

    /// <summary>Elements per token row.</summary>
    public int Hidden { get; }

    /// <summary>Experts chosen per token.</summary>
    public int TopK { get; }

    /// <summary>Experts in the whole group; a multiple of <see cref="WorldSize"/>.</summary>
    public int NumExperts { get; }

    /// <summary>This rank, in [0, WorldSize).</summary>
    public int Rank { get; }

    /// <summary>Ranks in the group.</summary>
    public int WorldSize { get; }

    /// <summary>Ranks per node; divides <see cref="WorldSize"/>. Equal to it: the intra-node algorithm.</summary>
    public int LocalWorldSize { get; }

    /// <summary>Element type of tokens (bf16 by default).</summary>
    public TokenType TokenType { get; }

    /// <summary>Element type of routing weights (fp32).</summary>
    public WeightType WeightType { get; }

    /// <summary>Streaming multiprocessors the GPU kernels may use.</summary>
    public int NumSms { get; }

    /// <summary>A token that picks several experts on one rank crosses to it once (single node only).</summary>
    public bool EnableLocalCombine { get; }

    /// <summary>Use kernels compiled ahead of time (CUDA backend); has no effect on results.</summary>
    public bool UseAot { get; }

    /// <summary>
    /// Rows received per local expert start at a multiple of this (1: packed). Grouped GEMMs want 64 or 128.
    /// Padding rows are zero and ignored by combine.
    /// </summary>
    public int ExpertAlignment { get; }

    /// <summary>Experts each rank holds.</summary>
    public int ExpertsPerRank => NumExperts / WorldSize;

    /// <summary>Nodes in the group.</summary>
    public int NumNodes => WorldSize / LocalWorldSize;

    /// <summary>True when the whole group is one node (direct peer access between all ranks).</summary>
    public bool IsIntraNode => WorldSize == LocalWorldSize;

    /// <summary>The node this rank is on.</summary>
    public int Node => Rank / LocalWorldSize;

    /// <summary>This rank's index inside its node.</summary>
    public int LocalRank => Rank % LocalWorldSize;

    /// <summary>Bytes per token element.</summary>
    public int TokenBytes => TokenTypeInfo.SizeOf(TokenType);

    /// <summary>The rank that holds <paramref name="expert"/>.</summary>
    public int RankOfExpert(int expert) => expert / ExpertsPerRank;

    /// <summary>
    /// The most bytes a rank's dispatch output may take (one host array: int32 byte offsets). Receive sizes are known
    /// only after the counts exchange, so a step that would exceed it fails there, on every rank, naming the rank.
    /// </summary>
    public const long MaxOutputBytes = int.MaxValue;

    /// <summary>The most rows a rank's dispatch output may hold: <see cref="MaxOutputBytes"/> over a row's bytes.</summary>
    public int MaxOutputRows => (int)(MaxOutputBytes / ((long)Hidden * TokenBytes));

    /// <summary>The same configuration seen from another rank of the group.</summary>
    public EpConfig ForRank(int rank) =>
        new(MaxTokens, Hidden, TopK, NumExperts, rank, WorldSize, LocalWorldSize, TokenType, WeightType, NumSms, EnableLocalCombine, UseAot, ExpertAlignment);

    private void Validate()
    {
        Require(MaxTokens >= 1, nameof(MaxTokens), MaxTokens, "must be at least 1");
        Require(Hidden >= 1, nameof(Hidden), Hidden, "must be at least 1");
        Require(TopK >= 1, nameof(TopK), TopK, "must be at least 1");
        Require(WorldSize >= 1, nameof(WorldSize), WorldSize, "must be at least 1");
        Require(LocalWorldSize >= 1 && LocalWorldSize <= WorldSize, nameof(LocalWorldSize), LocalWorldSize, $"must be in [1, WorldSize={WorldSize}]");
        Require(WorldSize % LocalWorldSize == 0, nameof(LocalWorldSize), LocalWorldSize, $"must divide WorldSize={WorldSize}");
        Require(Rank >= 0 && Rank < WorldSize, nameof(Rank), Rank, $"must be in [0, WorldSize={WorldSize})");
        Require(NumExperts >= WorldSize, nameof(NumExperts), NumExperts, $"must be at least WorldSize={WorldSize}");
        Require(NumExperts % WorldSize == 0, nameof(NumExperts), NumExperts, $"must be a multiple of WorldSize={WorldSize}");
        Require(TopK <= NumExperts, nameof(TopK), TopK, $"must not exceed NumExperts={NumExperts}");
        Require(Enum.IsDefined(TokenType), nameof(TokenType), TokenType, "must be BFloat16, Float16 or Float32");
        Require(Enum.IsDefined(WeightType), nameof(WeightType), WeightType, "must be Float32");
        Require(NumSms >= 1, nameof(NumSms), NumSms, "must be at least 1");
        Require(!EnableLocalCombine || IsIntraNode, nameof(EnableLocalCombine), EnableLocalCombine, "needs a single node (WorldSize == LocalWorldSize)");
        Require(ExpertAlignment >= 1 && (ExpertAlignment & (ExpertAlignment - 1)) == 0, nameof(ExpertAlignment), ExpertAlignment, "must be a power of two");

        // Row counts and byte offsets are int32 on every backend: keep the worst case inside them.
        long worstRows = (long)MaxTokens * TopK * WorldSize + ((long)ExpertsPerRank * (ExpertAlignment - 1));
        Require(worstRows <= int.MaxValue, nameof(MaxTokens), MaxTokens, $"MaxTokens*TopK*WorldSize (+ padding) = {worstRows} rows exceeds {int.MaxValue}");
        long tokenBytes = (long)MaxTokens * Hidden * TokenBytes;
        Require(tokenBytes <= int.MaxValue, nameof(Hidden), Hidden, $"MaxTokens*Hidden*{TokenBytes} = {tokenBytes} bytes exceeds {int.MaxValue}");
    }

    private static void Require(bool ok, string field, object value, string rule)
    {
        if (!ok)
        {
            throw new ArgumentException($"EpConfig.{field} = {value} {rule}", field);
        }
    }
}

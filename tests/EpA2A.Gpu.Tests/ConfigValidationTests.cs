using EpA2A.Config;
using EpA2A.Layer;
using EpA2A.Transport;

namespace EpA2A.Tests;

/// <summary>
/// A bad <see cref="EpConfig"/> is an <see cref="ArgumentException"/> at construction that names the field and
/// the rule, never a later crash; the derived facts follow from the fields.
/// </summary>
public sealed class ConfigValidationTests
{
    /// <summary>A valid baseline (maxTokens 64, hidden 128, topK 4, 16 experts, rank 1 of 8, 4 per node) with one field changed.</summary>
    public static TheoryData<string, string, string, Func<EpConfig>> BadConfigs => new()
    {
        { "MaxTokens", "= 0", "must be at least 1", () => Make(maxTokens: 0) },
        { "MaxTokens", "= -5", "must be at least 1", () => Make(maxTokens: -5) },
        { "Hidden", "= 0", "must be at least 1", () => Make(hidden: 0) },
        { "TopK", "= 0", "must be at least 1", () => Make(topK: 0) },
        { "TopK", "= 17", "must not exceed NumExperts=16", () => Make(topK: 17) },
        { "WorldSize", "= 0", "must be at least 1", () => Make(worldSize: 0, localWorldSize: 1, rank: 0) },
        { "LocalWorldSize", "= 0", "must be in [1, WorldSize=8]", () => Make(localWorldSize: 0) },
        { "LocalWorldSize", "= 16", "must be in [1, WorldSize=8]", () => Make(localWorldSize: 16) },
        { "LocalWorldSize", "= 3", "must divide WorldSize=8", () => Make(localWorldSize: 3) },
        { "Rank", "= -1", "must be in [0, WorldSize=8)", () => Make(rank: -1) },
        { "Rank", "= 8", "must be in [0, WorldSize=8)", () => Make(rank: 8) },
        { "NumExperts", "= 4", "must be at least WorldSize=8", () => Make(numExperts: 4, topK: 2) },
        { "NumExperts", "= 20", "must be a multiple of WorldSize=8", () => Make(numExperts: 20) },
        { "TokenType", "= 7", "must be BFloat16, Float16 or Float32", () => Make(tokenType: (TokenType)7) },
        { "WeightType", "= 1", "must be Float32", () => Make(weightType: (WeightType)1) },
        { "NumSms", "= 0", "must be at least 1", () => Make(numSms: 0) },
        { "EnableLocalCombine", "= True", "needs a single node (WorldSize == LocalWorldSize)", () => Make(enableLocalCombine: true) },
        { "ExpertAlignment", "= 0", "must be a power of two", () => Make(expertAlignment: 0) },
        { "ExpertAlignment", "= 48", "must be a power of two", () => Make(expertAlignment: 48) },
        { "ExpertAlignment", "= -64", "must be a power of two", () => Make(expertAlignment: -64) },
        { "MaxTokens", "= 300000000", "rows exceeds 2147483647", () => Make(maxTokens: 300_000_000, hidden: 1) },
        { "Hidden", "= 100000", "bytes exceeds 2147483647", () => Make(maxTokens: 20_000, hidden: 100_000) },
    };

    [Theory]
    [MemberData(nameof(BadConfigs))]
    public void A_bad_field_is_an_ArgumentException_naming_the_field_its_value_and_the_rule(string field, string value, string rule, Func<EpConfig> make)
    {
        ArgumentException e = Assert.Throws<ArgumentException>(make);

        Assert.Equal(field, e.ParamName);
        Assert.Contains($"EpConfig.{field} {value} ", e.Message, StringComparison.Ordinal);
        Assert.Contains(rule, e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Huge_alignment_padding_is_caught_by_the_row_limit_not_by_an_overflow()
    {
        // 2^30 is a power of two, so only the int32 row bound can reject it.
        ArgumentException e = Assert.Throws<ArgumentException>(() => Make(expertAlignment: 1 << 30, numExperts: 64, maxTokens: 1, topK: 1));

        Assert.Equal("MaxTokens", e.ParamName);
        Assert.Contains("(+ padding)", e.Message, StringComparison.Ordinal);
        Assert.Contains("exceeds 2147483647", e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(8, 8, 0, 64, 8, 1, true, 0, 0)]
    [InlineData(8, 4, 5, 64, 8, 2, false, 1, 1)]
    [InlineData(8, 2, 7, 16, 2, 4, false, 3, 1)]
    [InlineData(6, 1, 4, 12, 2, 6, false, 4, 0)]
    [InlineData(1, 1, 0, 5, 5, 1, true, 0, 0)]
    public void Derived_facts_follow_from_the_fields(int world, int local, int rank, int experts, int expertsPerRank, int nodes, bool intraNode, int node, int localRank)
    {
        EpConfig c = new(maxTokens: 16, hidden: 32, topK: 1, numExperts: experts, rank: rank, worldSize: world, localWorldSize: local);

        Assert.Equal(expertsPerRank, c.ExpertsPerRank);
        Assert.Equal(nodes, c.NumNodes);
        Assert.Equal(intraNode, c.IsIntraNode);
        Assert.Equal(node, c.Node);
        Assert.Equal(localRank, c.LocalRank);
        for (int e = 0; e < experts; e++)
        {
            Assert.Equal(e / expertsPerRank, c.RankOfExpert(e));
        }
    }

    [Theory]
    [InlineData(TokenType.BFloat16, 2)]
    [InlineData(TokenType.Float16, 2)]
    [InlineData(TokenType.Float32, 4)]
    public void Token_bytes_follow_the_token_type(TokenType type, int bytes) =>
        Assert.Equal(bytes, Make(tokenType: type).TokenBytes);

    [Fact]
    public void The_defaults_are_bfloat16_tokens_fp32_weights_20_SMs_and_packed_rows()
    {
        EpConfig c = new(maxTokens: 16, hidden: 32, topK: 2, numExperts: 8, rank: 0, worldSize: 2, localWorldSize: 2);

        Assert.Equal(TokenType.BFloat16, c.TokenType);
        Assert.Equal(WeightType.Float32, c.WeightType);
        Assert.Equal(20, c.NumSms);
        Assert.Equal(1, c.ExpertAlignment);
        Assert.False(c.EnableLocalCombine);
        Assert.False(c.UseAot);
    }

    [Fact]
    public void ForRank_changes_the_rank_only_and_validates_it()
    {
        EpConfig c = Make(tokenType: TokenType.Float16, numSms: 7, expertAlignment: 64, useAot: true);

        EpConfig other = c.ForRank(6);

        Assert.Equal(6, other.Rank);
        Assert.Equal(c with { }, c);
        Assert.Equal(c, other.ForRank(c.Rank));
        Assert.NotEqual(c, other);
        ArgumentException e = Assert.Throws<ArgumentException>(() => c.ForRank(8));
        Assert.Equal("Rank", e.ParamName);
    }

    [Theory]
    [InlineData(0, 2, "StepTimeout", "must be in (0, 1 h]")]
    [InlineData(-1, 2, "StepTimeout", "must be in (0, 1 h]")]
    [InlineData(3_600_001, 2, "StepTimeout", "must be in (0, 1 h]")]
    [InlineData(1000, 0, "Capacity", "must be at least 1")]
    public void Bad_layer_options_are_rejected_naming_the_option(int timeoutMs, int capacity, string option, string rule)
    {
        EpConfig c = new(maxTokens: 4, hidden: 4, topK: 1, numExperts: 1, rank: 0, worldSize: 1, localWorldSize: 1);
        EpLayerOptions options = new() { StepTimeout = TimeSpan.FromMilliseconds(timeoutMs), Capacity = capacity };

        ArgumentException e = Assert.Throws<ArgumentException>(() => EpAll2AllLayer.CreateCpu(c, new InProcessFabric(1).TransportFor(0), options));

        Assert.Equal("options", e.ParamName);
        Assert.Contains($"EpLayerOptions.{option}", e.Message, StringComparison.Ordinal);
        Assert.Contains(rule, e.Message, StringComparison.Ordinal);
    }

    private static EpConfig Make(
        int maxTokens = 64,
        int hidden = 128,
        int topK = 4,
        int numExperts = 16,
        int rank = 1,
        int worldSize = 8,
        int localWorldSize = 4,
        TokenType tokenType = TokenType.BFloat16,
        WeightType weightType = WeightType.Float32,
        int numSms = 20,
        bool enableLocalCombine = false,
        bool useAot = false,
        int expertAlignment = 1) =>
        new(maxTokens, hidden, topK, numExperts, rank, worldSize, localWorldSize, tokenType, weightType, numSms, enableLocalCombine, useAot, expertAlignment);
}

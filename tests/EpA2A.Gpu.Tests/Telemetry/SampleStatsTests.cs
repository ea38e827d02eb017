using EpA2A.Config;
using EpA2A.Telemetry;

namespace EpA2A.Tests.Telemetry;

/// <summary>The one percentile definition (nearest rank) and the one token-type parser every command and table uses.</summary>
public sealed class SampleStatsTests
{
    [Fact]
    public void Percentiles_are_nearest_rank_values_of_the_sample()
    {
        int seed = Random.Shared.Next();
        Random rng = new(seed);
        double[] sample = [.. Enumerable.Range(0, 1000).Select(_ => rng.NextDouble() * 100)];
        double[] sorted = [.. sample.Order()];
        Assert.True(SampleStats.Median(sample) == sorted[499], $"seed {seed}");
        Assert.True(SampleStats.Percentile(sample, 0.99) == sorted[989], $"seed {seed}");
        Assert.True(SampleStats.Percentile(sample, 1) == sorted[^1], $"seed {seed}");
        Assert.True(SampleStats.Percentile(sample, 0) == sorted[0], $"seed {seed}");
        Assert.Equal(SampleStats.Percentile(sample, 0.95), SampleStats.PercentileOfSorted(sorted, 0.95));
        Assert.Equal(3, SampleStats.Median([5, 1, 3]));
        Assert.Equal(0, SampleStats.Percentile([], 0.99));
        Assert.Throws<ArgumentOutOfRangeException>(() => SampleStats.Percentile(sample, 1.5));
    }

    [Theory]
    [InlineData("bf16", TokenType.BFloat16)]
    [InlineData("BFloat16", TokenType.BFloat16)]
    [InlineData(" fp16 ", TokenType.Float16)]
    [InlineData("F16", TokenType.Float16)]
    [InlineData("fp32", TokenType.Float32)]
    [InlineData("float32", TokenType.Float32)]
    public void Token_types_parse_from_their_names_and_aliases(string text, TokenType want)
    {
        Assert.True(TokenTypeInfo.TryParse(text, out TokenType got));
        Assert.Equal(want, got);
        Assert.True(TokenTypeInfo.TryParse(TokenTypeInfo.Name(got), out TokenType back));
        Assert.Equal(got, back);
    }

    [Theory]
    [InlineData("fp8")]
    [InlineData("")]
    [InlineData(null)]
    [InlineData("int8")]
    public void Other_words_are_not_token_types(string? text) => Assert.False(TokenTypeInfo.TryParse(text, out _));
}

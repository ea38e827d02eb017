using System.Globalization;
using EpA2A.Config;

namespace EpA2A.Tests;

/// <summary>One random case of a step: the group's shape, the routing's character, and the seed of its data.</summary>
public sealed record StepCase(
    int WorldSize,
    int LocalWorldSize,
    int TopK,
    int NumExperts,
    int Hidden,
    int MaxTokens,
    TokenType TokenType,
    bool LocalCombine,
    int Alignment,
    double DropRatio,
    bool Skewed,
    bool Weights,
    bool Scatter,
    int DataSeed)
{
    public EpConfig Config(int rank = 0) => new(
        MaxTokens,
        Hidden,
        TopK,
        NumExperts,
        rank,
        WorldSize,
        LocalWorldSize,
        TokenType,
        enableLocalCombine: LocalCombine,
        expertAlignment: Alignment);

    public override string ToString() => string.Create(
        CultureInfo.InvariantCulture,
        $"world {WorldSize}/{LocalWorldSize} topK {TopK} experts {NumExperts} hidden {Hidden} max {MaxTokens} {TokenType} localCombine {LocalCombine} align {Alignment} drop {DropRatio:0.00} skewed {Skewed} weights {Weights} scatter {Scatter} dataSeed {DataSeed}");
}

using System.Globalization;
using EpA2A.Config;

namespace EpA2A.Tests.LowLatency;

/// <summary>One random low-latency case: the group's shape, the routing's character, the format and call forms, and the data seed.</summary>
public sealed record LowLatencyCase(
    int WorldSize,
    int TopK,
    int NumExperts,
    int Hidden,
    int MaxTokens,
    double DropRatio,
    double DuplicateRatio,
    bool Skewed,
    bool Fp8,
    bool PowerOfTwoScales,
    bool Weights,
    bool Weighted,
    bool ZeroCopy,
    bool Split,
    int DataSeed)
{
    public EpConfig Config(int rank = 0) => new(MaxTokens, Hidden, TopK, NumExperts, rank, WorldSize, WorldSize);

    public override string ToString() => string.Create(
        CultureInfo.InvariantCulture,
        $"world {WorldSize} topK {TopK} experts {NumExperts} hidden {Hidden} max {MaxTokens} drop {DropRatio:0.00} dup {DuplicateRatio:0.00} skewed {Skewed} fp8 {Fp8} pow2 {PowerOfTwoScales} weights {Weights} weighted {Weighted} zeroCopy {ZeroCopy} split {Split} dataSeed {DataSeed}");
}

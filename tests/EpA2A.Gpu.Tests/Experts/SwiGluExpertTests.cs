using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Experts.SwiGlu;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Reference;

namespace EpA2A.Tests.Experts;

/// <summary>
/// The CPU SwiGLU expert against the independent double-precision reference, on rows a real dispatch delivered (two
/// ranks in process, padded expert blocks), with seeded random weights and tokens; the bound is
/// <see cref="ReferenceSwiGlu.Tolerance"/> (its remarks justify it).
/// </summary>
public sealed class SwiGluExpertTests
{
    private const int Hidden = 96;
    private const int Ffn = 160;

    [Theory]
    [InlineData(TokenType.BFloat16, 11)]
    [InlineData(TokenType.BFloat16, 12)]
    [InlineData(TokenType.Float32, 13)]
    public async Task The_cpu_expert_matches_the_reference_within_the_stated_bf16_tolerance(TokenType type, int seed)
    {
        (double worst, double rms) = type == TokenType.BFloat16 ? await WorstRatioAsync<BFloat16>(seed, seed) : await WorstRatioAsync<float>(seed, seed);

        Assert.True(worst <= 1.0, $"seed {seed}: an output is {worst:0.00}x its tolerance away from the reference");
        Assert.True(rms is > 0.2 and < 5, $"seed {seed}: the outputs' rms is {rms}; random weights are scaled to give O(1) outputs");
    }

    [Fact]
    public async Task The_check_catches_experts_with_other_weights()
    {
        const int seed = 21;
        (double worst, _) = await WorstRatioAsync<BFloat16>(seed, weightsUnderTest: seed + 1);

        Assert.True(worst > 10, $"seed {seed}: experts with other weights came within {worst:0.00}x the tolerance: the check cannot tell them apart");
    }

    [Fact]
    public void A_layer_whose_experts_are_not_the_weights_is_refused_naming_both()
    {
        SwiGluExpertCompute experts = new(SwiGluWeights.Random(Hidden, Ffn, firstExpert: 4, count: 4, seed: 1));

        ArgumentException range = Assert.Throws<ArgumentException>(() => experts.ValidateLayer("l", Config(rank: 0)));
        Assert.Contains("rank 0 of the layer serves experts 0..3", range.Message, StringComparison.Ordinal);
        Assert.Contains("weights hold experts 4..7", range.Message, StringComparison.Ordinal);
        ArgumentException hidden = Assert.Throws<ArgumentException>(() => experts.ValidateLayer("l", new EpConfig(8, 64, 2, 8, 1, 2, 2)));
        Assert.Contains("Hidden is 64, the SwiGLU weights' hidden is 96", hidden.Message, StringComparison.Ordinal);
        experts.ValidateLayer("l", Config(rank: 1));
    }

    private static EpConfig Config(int rank, TokenType type = TokenType.BFloat16) =>
        new(maxTokens: 24, hidden: Hidden, topK: 2, numExperts: 8, rank: rank, worldSize: 2, localWorldSize: 2, tokenType: type, expertAlignment: 4);

    /// <summary>Dispatches a random step and runs every rank's experts; the worst |got - reference| / tolerance, and the outputs' rms.</summary>
    private static async Task<(double Worst, double Rms)> WorstRatioAsync<T>(int seed, int weightsUnderTest)
        where T : unmanaged
    {
        Random rng = new(seed);
        EpConfig config = Config(0, TokenTypeInfo.Of<T>());
        using InProcessGroup group = new(config);
        RankInput<T>[] inputs = RoutingGenerator.Draw<T>(config, [rng.Next(8, 25), rng.Next(8, 25)], 0.1, skewed: false, withWeights: false, rng);
        DispatchResult<T>[] got = await group.RunAsync((layer, r) => layer.DispatchAsync(
            Tensor.Create(inputs[r].Tokens, [inputs[r].Count, Hidden]),
            Tensor.Create(inputs[r].ExpertIds, [inputs[r].Count, config.TopK])));
        double worst = 0, squares = 0;
        long count = 0;
        for (int r = 0; r < 2; r++)
        {
            int first = r * config.ExpertsPerRank;
            SwiGluWeights truth = SwiGluWeights.Random(Hidden, Ffn, first, config.ExpertsPerRank, seed);
            SwiGluExpertCompute experts = new(SwiGluWeights.Random(Hidden, Ffn, first, config.ExpertsPerRank, weightsUnderTest));
            EpConfig rankConfig = Config(r, config.TokenType);
            T[] output = StepHarness.Flat(await experts.ComputeAsync("l", rankConfig, got[r], default));
            EpAllToAllLayout layout = got[r].Layout;
            (double[] want, double[] tolerance) = ReferenceSwiGlu.ApplyToBlocks<T>(truth, StepHarness.Flat(got[r].Output), layout.ExpertRowStarts, layout.RowsPerLocalExpert);
            for (int i = 0; i < output.Length; i++)
            {
                double v = TokenConvert.ToSingle(output[i]);
                double ratio = Math.Abs(v - want[i]) / tolerance[i];
                Assert.False(double.IsNaN(ratio), $"seed {seed}: rank {r} element {i}: got {v}, reference {want[i]}, tolerance {tolerance[i]}");
                worst = Math.Max(worst, ratio);
                squares += v * v;
                count += v == 0 ? 0 : 1;
            }

            // Padding rows (the blocks are aligned to 4) stay zero.
            for (int j = 0; j < config.ExpertsPerRank; j++)
            {
                int end = layout.ExpertRowStarts[j] + layout.PaddedRowsPerLocalExpert[j];
                for (int row = layout.ExpertRowStarts[j] + layout.RowsPerLocalExpert[j]; row < end; row++)
                {
                    Assert.All(output.AsSpan(row * Hidden, Hidden).ToArray(), v => Assert.Equal(0f, TokenConvert.ToSingle(v)));
                }
            }
        }

        Assert.True(count > 0, $"seed {seed}: no row was received");
        return (worst, Math.Sqrt(squares / count));
    }
}

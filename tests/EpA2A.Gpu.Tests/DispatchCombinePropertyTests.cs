using CsCheck;
using EpA2A.Config;

namespace EpA2A.Tests;

/// <summary>The CPU backend against the independent reference on random groups, routings and shapes.</summary>
public sealed class DispatchCombinePropertyTests
{
    private static readonly Gen<StepCase> Cases =
        from world in Gen.Int[1, 8]
        from localIndex in Gen.Int[0, 7]
        from topK in Gen.Int[1, 8]
        from expertsPerRank in Gen.Int[1, 256 / world]
        from hidden in Gen.OneOf(Gen.Int[1, 24], Gen.Int[25, 160])
        from maxTokens in Gen.Int[1, 40]
        from tokenType in Gen.Enum<TokenType>()
        from localCombine in Gen.Bool
        from alignment in Gen.Int[0, 3].Select(i => i < 2 ? 1 : i == 2 ? 4 : 16)
        from drop in Gen.Double[0, 0.5]
        from skewed in Gen.Bool
        from weights in Gen.Bool
        from scatter in Gen.Bool
        from seed in Gen.Int
        let divisors = Enumerable.Range(1, world).Where(d => world % d == 0).ToArray()
        let local = divisors[localIndex % divisors.Length]
        let experts = world * expertsPerRank
        select new StepCase(
            world,
            local,
            Math.Min(topK, experts),
            experts,
            hidden,
            maxTokens,
            tokenType,
            localCombine && local == world,
            scatter ? 1 : alignment,
            drop,
            skewed,
            weights,
            scatter,
            seed);

    [Fact]
    public void Random_groups_match_the_reference() =>
        Cases.Sample(c => StepHarness.RunAsync(c, steps: 2).GetAwaiter().GetResult(), iter: 150, threads: 1, print: c => c.ToString());

    [Theory]
    [InlineData(8, 8, false)]
    [InlineData(8, 8, true)]
    [InlineData(8, 2, false)]
    [InlineData(4, 1, false)]
    public Task Heavily_skewed_routing_with_uneven_token_counts_matches_the_reference(int world, int local, bool localCombine) =>
        StepHarness.RunAsync(new StepCase(world, local, 8, 256, 72, 96, TokenType.BFloat16, localCombine, 1, 0.25, true, true, false, Environment.TickCount), steps: 2);

    [Fact]
    public Task Odd_hidden_sizes_and_fp16_match_the_reference() =>
        StepHarness.RunAsync(new StepCase(6, 3, 5, 12, 37, 33, TokenType.Float16, false, 4, 0.1, false, true, false, 1234), steps: 3);
}

using EpA2A.Config;
using EpA2A.Numerics;
using EpA2A.Reference;

namespace EpA2A.Tests;

/// <summary>Drawn inputs: a function of the seed alone (every rank process draws every rank's), never zero, spread over [-2, 2).</summary>
public sealed class RoutingGeneratorTests
{
    [Fact]
    public void Tokens_are_a_function_of_the_seed_nonzero_and_spread_over_the_range()
    {
        int seed = Random.Shared.Next();
        EpConfig config = new(300, 1000, 2, 8, 0, 2, 2); // 300 000 elements a rank: several generator chunks
        RankInput<BFloat16>[] a = RoutingGenerator.Draw<BFloat16>(config, [300, 257], 0.1, false, true, new Random(seed));
        RankInput<BFloat16>[] b = RoutingGenerator.Draw<BFloat16>(config, [300, 257], 0.1, false, true, new Random(seed));
        RankInput<BFloat16>[] c = RoutingGenerator.Draw<BFloat16>(config, [300, 257], 0.1, false, true, new Random(seed + 1));
        for (int r = 0; r < 2; r++)
        {
            Assert.True(a[r].Tokens.AsSpan().SequenceEqual(b[r].Tokens), $"rank {r}: the same seed drew other tokens (seed {seed})");
            Assert.Equal(a[r].ExpertIds, b[r].ExpertIds);
            Assert.False(a[r].Tokens.AsSpan().SequenceEqual(c[r].Tokens), $"rank {r}: another seed drew the same tokens (seed {seed})");
            float[] v = [.. a[r].Tokens.Select(t => t.ToSingle())];
            Assert.DoesNotContain(0f, v);
            Assert.All(v, x => Assert.InRange(x, -2f, 2f));
            Assert.InRange(v.Average(), -0.05, 0.05); // uniform: mean 0, sd 1.15, 257 000+ samples
            Assert.InRange(v.Count(x => x < -1f) / (double)v.Length, 0.23, 0.27);
        }

        Assert.False(a[0].Tokens.AsSpan(0, 1000).SequenceEqual(a[1].Tokens.AsSpan(0, 1000)), $"ranks 0 and 1 drew the same first token (seed {seed})");
    }
}

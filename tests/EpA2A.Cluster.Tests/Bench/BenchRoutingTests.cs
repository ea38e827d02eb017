using EpA2A.Tools.Bench;

namespace EpA2A.Cluster.Tests.Bench;

/// <summary>
/// The bench's routing: every token picks TopK distinct experts that exist, the received rows add up to every
/// routed entry, skewed routing loads the experts unevenly where uniform does not, and a seed gives the same ids.
/// </summary>
public sealed class BenchRoutingTests
{
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Every_token_picks_topK_distinct_experts_that_exist(bool skewed)
    {
        int seed = Random.Shared.Next();
        Random shapes = new(seed);
        for (int draw = 0; draw < 40; draw++)
        {
            int experts = shapes.Next(1, 33);
            int topK = draw == 0 ? experts : shapes.Next(1, experts + 1);
            int tokens = shapes.Next(1, 200);
            Random rng = new(shapes.Next());
            double[]? popularity = skewed ? BenchRouting.SkewedPopularity(experts, rng) : null;

            int[] ids = BenchRouting.Draw(tokens, topK, experts, popularity, rng);

            string where = $"seed {seed}, draw {draw}: {tokens} tokens, top-{topK} of {experts} experts";
            Assert.True(ids.Length == tokens * topK, $"{where}: {ids.Length} ids");
            for (int t = 0; t < tokens; t++)
            {
                int[] token = ids[(t * topK)..((t + 1) * topK)];
                Assert.True(token.All(e => e >= 0 && e < experts), $"{where}: token {t} picks [{string.Join(", ", token)}]");
                Assert.True(token.Distinct().Count() == topK, $"{where}: token {t} picks [{string.Join(", ", token)}], not {topK} distinct experts");
            }
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void Received_rows_count_every_entry_once_at_the_rank_that_owns_its_expert(bool skewed)
    {
        int seed = Random.Shared.Next();
        Random rng = new(seed);
        for (int draw = 0; draw < 20; draw++)
        {
            int world = rng.Next(1, 9);
            int expertsPerRank = rng.Next(1, 9);
            int experts = world * expertsPerRank;
            int topK = rng.Next(1, Math.Min(experts, 8) + 1);
            int tokens = rng.Next(1, 300);
            double[]? popularity = skewed ? BenchRouting.SkewedPopularity(experts, rng) : null;
            int[][] ids = [.. Enumerable.Range(0, world).Select(_ => BenchRouting.Draw(tokens, topK, experts, popularity, rng))];

            int[] rows = BenchRouting.ReceivedRows(ids, world, experts);

            // Independently: rank r owns experts [r * expertsPerRank, (r + 1) * expertsPerRank).
            int[] expected = new int[world];
            for (int r = 0; r < world; r++)
            {
                HashSet<int> owned = [.. Enumerable.Range(r * expertsPerRank, expertsPerRank)];
                expected[r] = ids.Sum(rank => rank.Count(owned.Contains));
            }

            string where = $"seed {seed}, draw {draw}: world {world}, {tokens} tokens, top-{topK} of {experts} experts";
            Assert.True(rows.Sum() == world * tokens * topK, $"{where}: {rows.Sum()} rows received in all");
            Assert.True(expected.SequenceEqual(rows), $"{where}: rows [{string.Join(", ", rows)}], expected [{string.Join(", ", expected)}]");
        }
    }

    /// <summary>
    /// 4096 tokens of top-8 of 256 experts: 128 picks per expert on average. Uniform, the busiest expert stays
    /// within a few standard deviations (about 11) of that; skewed, the hottest expert is picked by most tokens.
    /// </summary>
    [Fact]
    public void Skewed_routing_loads_the_busiest_expert_far_above_the_mean_and_uniform_does_not()
    {
        const int experts = 256;
        const int topK = 8;
        const int tokens = 4096;
        int seed = Random.Shared.Next();
        Random rng = new(seed);

        double uniform = BusiestOverMean(BenchRouting.Draw(tokens, topK, experts, null, rng), experts);
        double skewed = BusiestOverMean(BenchRouting.Draw(tokens, topK, experts, BenchRouting.SkewedPopularity(experts, rng), rng), experts);

        Assert.True(uniform < 2, $"seed {seed}: uniform routing's busiest expert is {uniform:0.00}x the mean");
        Assert.True(skewed > 3, $"seed {seed}: skewed routing's busiest expert is only {skewed:0.00}x the mean");
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void The_same_seed_draws_the_same_ids_and_another_seed_different_ones(bool skewed)
    {
        const int experts = 64;
        const int topK = 6;
        const int tokens = 512;
        int seed = Random.Shared.Next(int.MaxValue);

        int[] first = DrawWith(seed);
        int[] again = DrawWith(seed);
        int[] other = DrawWith(seed + 1);

        Assert.True(first.SequenceEqual(again), $"seed {seed}: two draws with the same seed differ");
        Assert.False(first.SequenceEqual(other), $"seeds {seed} and {seed + 1} draw the same ids");

        int[] DrawWith(int s)
        {
            Random rng = new(s);
            double[]? popularity = skewed ? BenchRouting.SkewedPopularity(experts, rng) : null;
            return BenchRouting.Draw(tokens, topK, experts, popularity, rng);
        }
    }

    [Fact]
    public void Written_ids_read_back_unchanged()
    {
        int seed = Random.Shared.Next();
        Random rng = new(seed);
        int[] ids = BenchRouting.Draw(rng.Next(1, 100), 4, 32, BenchRouting.SkewedPopularity(32, rng), rng);
        string path = Path.Combine(Directory.CreateTempSubdirectory("epa2a-routing-").FullName, "ids.i32");
        try
        {
            BenchRouting.Write(path, ids);

            Assert.Equal(ids.Length * sizeof(int), new FileInfo(path).Length);
            Assert.True(ids.SequenceEqual(BenchRouting.Read(path)), $"seed {seed}: the ids read back differ");
        }
        finally
        {
            Directory.Delete(Path.GetDirectoryName(path)!, recursive: true);
        }
    }

    private static double BusiestOverMean(int[] ids, int experts)
    {
        int[] picks = new int[experts];
        foreach (int e in ids)
        {
            picks[e]++;
        }

        return picks.Max() / picks.Average();
    }
}

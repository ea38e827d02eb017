using EpA2A.Tools.Bench;

namespace EpA2A.Cluster.Tests.Bench;

/// <summary>
/// `bench --passes 2`: every rank process runs the sweep twice, and the summary pairs each point's passes by name and
/// pass number, prints each pass's medians, the spread (largest / smallest median - 1) and whether a point of 128
/// tokens or more stays within 10%, and the free device memory after each pass.
/// </summary>
public sealed class BenchSpreadTests
{
    [Fact]
    public void Spread_is_the_largest_over_the_smallest_median_of_the_passes()
    {
        Assert.Equal(10, BenchPassSpread.SpreadPct([100, 110]), 9);
        Assert.Equal(25, BenchPassSpread.SpreadPct([80, 100, 90]), 9);
        Assert.True(double.IsNaN(BenchPassSpread.SpreadPct([100, double.NaN])));
    }

    [Fact]
    public void Two_passes_are_summarized_apart_and_the_spread_table_names_the_point_outside_the_bound()
    {
        BenchPoint small = Point("intra-uniform-h2048-t1", 1);
        BenchPoint big = Point("intra-uniform-h2048-t4096", 4096);
        BenchManifest manifest = new() { Passes = 2, Points = [small, big] };
        // Two ranks; per pass the slowest rank's median decides. Big: dispatch 100 then 130 (30%: outside), combine
        // 50 then 52 (4%). Small: 10 then 20 (100%), which is not bounded below 128 tokens.
        BenchRankReport[] reports =
        [
            Report(0, [Sample(small, 0, 10, 5), Sample(big, 0, 100, 50), Sample(small, 1, 20, 5), Sample(big, 1, 130, 52)], [7000L << 20, 6990L << 20]),
            Report(1, [Sample(small, 0, 9, 4), Sample(big, 0, 90, 40), Sample(small, 1, 15, 4), Sample(big, 1, 120, 45)], [7000L << 20, 6990L << 20]),
        ];

        BenchSummary s = BenchSummary.Build(manifest, reports, null, [], null, "test GPU", "0", DateTime.UnixEpoch, 2);

        // The main table is pass 1's.
        Assert.Equal(100, s.Points.Single(p => p.Name == big.Name).Cuda!.DispatchGpu!.Median, 9);
        BenchPassSpread b = s.Spread.Single(x => x.Name == big.Name);
        Assert.Equal([100.0, 130.0], b.DispatchMedians);
        Assert.Equal(30, b.DispatchSpreadPct, 9);
        Assert.Equal(4, b.CombineSpreadPct, 9);
        Assert.False(b.Within);
        BenchPassSpread t = s.Spread.Single(x => x.Name == small.Name);
        Assert.Equal(100, t.DispatchSpreadPct, 9);
        Assert.True(t.Within); // not bounded below 128 tokens

        string md = BenchReport.Markdown(s, "plot.png");
        Assert.Contains("within 10%: 0 of 1", md, StringComparison.Ordinal);
        Assert.Contains($"| {big.Name} | 100.0 / 130.0 | 30.0 | 50.0 / 52.0 | 4.0 | NO |", md, StringComparison.Ordinal);
        Assert.Contains("after each pass (every layer disposed) 7000 / 6990 MiB", md, StringComparison.Ordinal);
        Assert.Contains("10 MiB more after the last", md, StringComparison.Ordinal);
    }

    private static BenchPoint Point(string name, int tokens) => new()
    {
        Name = name,
        World = 2,
        Local = 2,
        Tokens = tokens,
        Hidden = 2048,
        TopK = 2,
        Experts = 4,
        Routing = "uniform",
        RecvRows = [[tokens * 2, tokens * 2]],
    };

    /// <summary>Three iterations of one point, all at the given GPU times.</summary>
    private static BenchRankPoint Sample(BenchPoint p, int pass, double dispatch, double combine)
    {
        BenchRankPoint r = new() { Name = p.Name, Pass = pass, Checked = true };
        for (int i = 0; i < 3; i++)
        {
            r.DispatchGpu.Add(dispatch);
            r.CombineGpu.Add(combine);
            r.DispatchWall.Add(dispatch + 5);
            r.CombineWall.Add(combine + 5);
        }

        return r;
    }

    private static BenchRankReport Report(int rank, List<BenchRankPoint> points, List<long> freeAfterPass) =>
        new(rank, 3e12, points, 7010L << 20, freeAfterPass[^1]) { DeviceFreeAfterPass = freeAfterPass };
}

using System.Diagnostics;
using EpA2A.Tools;

namespace EpA2A.Cluster.Tests.Bench;

/// <summary>
/// Ceiling % stands every rank's bytes against every rank's time (the span from the earliest start to the latest
/// end): the formula gpu-check and bench share. One rank's own time against all bytes overstated it (117 % once).
/// </summary>
public sealed class CopyCeilingTests
{
    private static long Us(double us) => (long)Math.Round(us * Stopwatch.Frequency / 1e6);

    [Fact]
    public void Ranks_that_run_one_after_the_other_share_the_span_and_stay_at_the_bound()
    {
        // Two ranks each move half the bytes at the full copy rate, one after the other: 10 µs each, 20 µs in all.
        double bandwidth = 3e12;
        double bytes = bandwidth * 20e-6;
        RankInterval[] step = [new(Us(100), Us(110)), new(Us(110), Us(120))];
        double span = CopyCeiling.SpanUs(step);
        Assert.Equal(20, span, 3);
        Assert.Equal(100, CopyCeiling.Percent(bytes, bandwidth, span), 3);

        // What one rank's own time claimed: twice the physical bound.
        Assert.Equal(200, CopyCeiling.Percent(bytes, bandwidth, 10), 3);
    }

    [Fact]
    public void The_median_is_over_steps_of_the_span_over_ranks()
    {
        // Rank 1 starts 5 µs late in every step; its steps last 10, 30, 20 µs; rank 0's 10 µs.
        RankInterval[] rank0 = [new(Us(0), Us(10)), new(Us(100), Us(110)), new(Us(200), Us(210))];
        RankInterval[] rank1 = [new(Us(5), Us(15)), new(Us(105), Us(135)), new(Us(205), Us(225))];
        Assert.Equal(25, CopyCeiling.MedianSpanUs([rank0, rank1]), 3); // spans 15, 35, 25
        Assert.Equal(15, CopyCeiling.MedianSpanUs([rank0, rank1[..1]]), 3); // only the steps every rank has
        Assert.Equal(0, CopyCeiling.MedianSpanUs([]));
    }

    [Fact]
    public void A_span_never_comes_out_shorter_than_the_longest_rank_so_percent_is_bounded_by_the_slowest_rank()
    {
        int seed = Random.Shared.Next();
        Random rng = new(seed);
        for (int trial = 0; trial < 200; trial++)
        {
            RankInterval[] step = [.. Enumerable.Range(0, rng.Next(1, 9)).Select(_ =>
            {
                long start = Us(rng.NextDouble() * 50);
                return new RankInterval(start, start + Us(1 + (rng.NextDouble() * 100)));
            })];
            double longest = step.Max(r => (r.End - r.Start) * 1e6 / Stopwatch.Frequency);
            double span = CopyCeiling.SpanUs(step);
            Assert.True(span >= longest - 1e-6, $"span {span} µs is shorter than the longest rank's {longest} µs (seed {seed})");
            Assert.True(CopyCeiling.Percent(1e6, 1e12, span) <= CopyCeiling.Percent(1e6, 1e12, longest) + 1e-9, $"seed {seed}");
        }
    }

    [Fact]
    public void Nothing_to_measure_gives_zero_and_a_backwards_interval_is_refused()
    {
        Assert.Equal(0, CopyCeiling.Percent(1e9, 0, 10));
        Assert.Equal(0, CopyCeiling.Percent(1e9, 1e12, 0));
        Assert.Throws<ArgumentException>(() => CopyCeiling.SpanUs([]));
        Assert.Throws<ArgumentException>(() => CopyCeiling.SpanUs([new RankInterval(Us(10), Us(5))]));
    }
}

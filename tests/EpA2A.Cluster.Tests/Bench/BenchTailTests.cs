using EpA2A.Tools.Bench;

namespace EpA2A.Cluster.Tests.Bench;

/// <summary>
/// The bench's tail count: an iteration is slow when the slowest rank's dispatch + combine exceeds 1.5x the median,
/// and is blamed on a lost core when some rank's launching thread was preempted in it.
/// </summary>
public sealed class BenchTailTests
{
    [Fact]
    public void A_slow_iteration_counts_as_preempted_when_any_rank_lost_its_core_in_it()
    {
        // Iterations 0-4: rank 0 always 100 µs; rank 1 is slow in iterations 2 (preempted) and 4 (not preempted).
        BenchRankPoint a = Point([50, 50, 50, 50, 50], [50, 50, 50, 50, 50], [0, 0, 0, 1, 0]);
        BenchRankPoint b = Point([50, 50, 400, 50, 300], [50, 50, 50, 50, 50], [0, 0, 2, 0, 0]);
        (int slow, int slowPreempted, int all, int allPreempted) = BenchSummary.Tails([a, b]);
        Assert.Equal(2, slow);
        Assert.Equal(1, slowPreempted);
        Assert.Equal(5, all);
        Assert.Equal(2, allPreempted);
    }

    [Fact]
    public void Unknown_preemption_counts_are_not_blamed()
    {
        BenchRankPoint a = Point([50, 500], [50, 50], [-1, -1]);
        (int slow, int slowPreempted, _, int allPreempted) = BenchSummary.Tails([a]);
        Assert.Equal(1, slow);
        Assert.Equal(0, slowPreempted);
        Assert.Equal(0, allPreempted);
    }

    private static BenchRankPoint Point(double[] dispatch, double[] combine, long[] preempted)
    {
        BenchRankPoint p = new() { Name = "p" };
        p.DispatchWall.AddRange(dispatch);
        p.CombineWall.AddRange(combine);
        p.Preemptions.AddRange(preempted);
        return p;
    }
}

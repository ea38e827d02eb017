using System.Diagnostics;

namespace EpA2A.Tools;

/// <summary>One rank's part of one timed step, in <see cref="Stopwatch"/> timestamps: a clock every rank process of one host shares (CLOCK_MONOTONIC).</summary>
internal readonly record struct RankInterval(long Start, long End);

/// <summary>
/// Ceiling %: how close a step came to the device copy ceiling (its bytes read + written over the measured
/// device-to-device copy bandwidth). The bytes are every rank's, so the time is every rank's too: the span from
/// the earliest start to the latest end over the ranks of one step. One rank's own time against every rank's
/// bytes is not a bound (ranks that run one after the other each look twice as fast as the GPU allows).
/// Used by `epa2a-tools gpu-check` and `epa2a-tools bench`.
/// </summary>
internal static class CopyCeiling
{
    /// <summary>The step's time over all ranks, µs: the latest end minus the earliest start.</summary>
    /// <exception cref="ArgumentException">No interval, or one that ends before it starts.</exception>
    public static double SpanUs(IReadOnlyList<RankInterval> ranks)
    {
        ArgumentNullException.ThrowIfNull(ranks);
        if (ranks.Count == 0)
        {
            throw new ArgumentException("a step needs at least one rank's interval", nameof(ranks));
        }

        long start = long.MaxValue, end = long.MinValue;
        for (int r = 0; r < ranks.Count; r++)
        {
            if (ranks[r].End < ranks[r].Start)
            {
                throw new ArgumentException($"rank {r}'s interval ends ({ranks[r].End}) before it starts ({ranks[r].Start})", nameof(ranks));
            }

            start = Math.Min(start, ranks[r].Start);
            end = Math.Max(end, ranks[r].End);
        }

        return (end - start) * 1e6 / Stopwatch.Frequency;
    }

    /// <summary>
    /// The median over steps of <see cref="SpanUs"/>: <paramref name="perRank"/>[r][i] is rank r's interval in step i.
    /// Steps not every rank has are left out; 0 when there is none.
    /// </summary>
    public static double MedianSpanUs(IReadOnlyList<IReadOnlyList<RankInterval>> perRank)
    {
        ArgumentNullException.ThrowIfNull(perRank);
        if (perRank.Count == 0)
        {
            return 0;
        }

        int steps = perRank.Min(r => r.Count);
        if (steps == 0)
        {
            return 0;
        }

        double[] spans = new double[steps];
        for (int i = 0; i < steps; i++)
        {
            spans[i] = SpanUs([.. perRank.Select(r => r[i])]);
        }

        Array.Sort(spans);
        return spans[steps / 2];
    }

    /// <summary>100 * (bytes / bytesPerSecond) / span: the share of the copy ceiling a step of that span reached; 0 when either is unknown.</summary>
    public static double Percent(double allRanksBytes, double bytesPerSecond, double spanUs) =>
        spanUs > 0 && bytesPerSecond > 0 ? 100.0 * (allRanksBytes / bytesPerSecond) / (spanUs * 1e-6) : 0;

    /// <summary>Intervals from parallel lists of start and end timestamps.</summary>
    public static List<RankInterval> Intervals(IReadOnlyList<long> starts, IReadOnlyList<long> ends)
    {
        ArgumentNullException.ThrowIfNull(starts);
        ArgumentNullException.ThrowIfNull(ends);
        return [.. starts.Zip(ends, (s, e) => new RankInterval(s, e))];
    }
}

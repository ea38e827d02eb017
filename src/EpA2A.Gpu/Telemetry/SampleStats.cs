namespace EpA2A.Telemetry;

/// <summary>
/// The one definition of a sample's percentiles that every table, bench and check prints: nearest rank (the smallest
/// value with at least q of the sample at or below it), so a printed p99 is a time that was measured.
/// </summary>
public static class SampleStats
{
    /// <summary>The median (nearest rank); 0 for an empty sample.</summary>
    public static double Median(IEnumerable<double> sample) => Percentile(sample, 0.5);

    /// <summary>The nearest-rank <paramref name="q"/> quantile (q in [0, 1]); 0 for an empty sample.</summary>
    public static double Percentile(IEnumerable<double> sample, double q)
    {
        ArgumentNullException.ThrowIfNull(sample);
        double[] sorted = [.. sample.Order()];
        return PercentileOfSorted(sorted, q);
    }

    /// <summary>As <see cref="Percentile"/> for a sample already in ascending order (no copy).</summary>
    public static double PercentileOfSorted(ReadOnlySpan<double> sorted, double q)
    {
        if (q is < 0 or > 1 || double.IsNaN(q))
        {
            throw new ArgumentOutOfRangeException(nameof(q), q, "a quantile is in [0, 1]");
        }

        if (sorted.IsEmpty)
        {
            return 0;
        }

        int i = (int)Math.Ceiling(q * sorted.Length) - 1;
        return sorted[Math.Clamp(i, 0, sorted.Length - 1)];
    }
}

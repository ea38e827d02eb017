namespace EpA2A.Layer;

/// <summary>
/// How large the dispatch output grows when a step needs more rows than it holds: the needed rows rounded up to
/// <see cref="Granularity"/>, times the capacity factor, never past what a rank's output may hold. The one rule for
/// the host buffers (<see cref="DispatchCombineContext"/>) and the device buffers (the layer hands the CUDA backend
/// the rows it chose): every rank derives the same size from the same maximum, so growth stays collective.
/// </summary>
/// <param name="CapacityFactor">The multiplier (the original's `capacity`); the output starts at MaxTokens times it.</param>
/// <param name="MaxRows">The most rows a rank's output may hold (<see cref="Config.EpConfig.MaxOutputRows"/>).</param>
internal readonly record struct OutputGrowthPolicy(int CapacityFactor, int MaxRows)
{
    /// <summary>Growth rounds the row count up to a multiple of this before applying the capacity factor.</summary>
    public const int Granularity = 1024;

    /// <summary>Whether an output of <paramref name="heldRows"/> rows must grow to receive <paramref name="neededRows"/>.</summary>
    public static bool MustGrow(int heldRows, int neededRows) => neededRows > heldRows;

    /// <summary>The rows to allocate for <paramref name="neededRows"/>: at least those, at most <see cref="MaxRows"/> unless more are needed.</summary>
    public int RowsFor(int neededRows)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(neededRows);
        long target = (long)((neededRows + Granularity - 1) / Granularity) * Granularity * CapacityFactor;
        return (int)Math.Max(neededRows, Math.Min(target, MaxRows));
    }
}

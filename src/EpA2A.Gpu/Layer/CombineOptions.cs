namespace EpA2A.Layer;

/// <summary>How combine sums.</summary>
/// <param name="Weighted">
/// Multiply each expert output row by its routing weight before summing (needs weights at dispatch). Off by
/// default, as in the Python original, where the caller scales expert outputs itself.
/// </param>
public sealed record CombineOptions(bool Weighted = false)
{
    /// <summary>Plain sum.</summary>
    public static CombineOptions Unweighted { get; } = new();
}

namespace EpA2A.Reference;

/// <summary>A whole reference dispatch step, seen from every rank at once.</summary>
/// <typeparam name="T">Token element type (BFloat16, Half or float).</typeparam>
/// <param name="PerRank">What each destination rank received: [WorldSize].</param>
/// <param name="GlobalScatterIndices">
/// Per source rank, [Count * TopK]: the global row (across all ranks' outputs concatenated in rank order,
/// padding included) where each (token, k) landed; -1 for a dropped slot. Fed back as scatter indices, they
/// reproduce the same placement when there is no padding.
/// </param>
/// <param name="TokensPerSourceRank">Tokens each rank dispatched: [WorldSize].</param>
public sealed record ReferenceStep<T>(ReferenceDispatch<T>[] PerRank, int[][] GlobalScatterIndices, int[] TokensPerSourceRank)
    where T : unmanaged;

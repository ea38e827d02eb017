namespace EpA2A.Reference;

/// <summary>One rank's inputs to a step, flat and row-major.</summary>
/// <typeparam name="T">Token element type (BFloat16, Half or float).</typeparam>
/// <param name="Tokens">[Count, Hidden].</param>
/// <param name="Count">Tokens this rank dispatches.</param>
/// <param name="ExpertIds">[Count, TopK]; NumExperts marks a dropped slot.</param>
/// <param name="Weights">[Count, TopK] or null.</param>
/// <param name="ScatterIndices">[Count, TopK] global output rows or null.</param>
public sealed record RankInput<T>(T[] Tokens, int Count, int[] ExpertIds, float[]? Weights, int[]? ScatterIndices)
    where T : unmanaged;

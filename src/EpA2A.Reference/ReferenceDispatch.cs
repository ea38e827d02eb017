namespace EpA2A.Reference;

/// <summary>What one destination rank receives from a reference dispatch.</summary>
/// <typeparam name="T">Token element type (BFloat16, Half or float).</typeparam>
/// <param name="Output">Received rows, [Rows, Hidden], row-major; padding rows are zero.</param>
/// <param name="Rows">Rows received, padding included.</param>
/// <param name="Weights">One routing weight per row, [Rows] (0 on padding); null unless every rank sent weights.</param>
/// <param name="RowsPerLocalExpert">Rows received per local expert, without padding: [ExpertsPerRank].</param>
/// <param name="PaddedRowsPerLocalExpert">The same, rounded up to the expert alignment: [ExpertsPerRank].</param>
/// <param name="ExpertRowStarts">First row of each local expert's block: [ExpertsPerRank].</param>
public sealed record ReferenceDispatch<T>(
    T[] Output,
    int Rows,
    float[]? Weights,
    int[] RowsPerLocalExpert,
    int[] PaddedRowsPerLocalExpert,
    int[] ExpertRowStarts)
    where T : unmanaged;

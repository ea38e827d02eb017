namespace EpA2A.Layer;

/// <summary>
/// What combine needs from the dispatch that preceded it (the Python original's EPAllToAllLayoutDesc), plus
/// the receive-side facts a grouped GEMM needs. Valid only for the layer and dispatch that produced it.
/// </summary>
public sealed class EpAllToAllLayout
{
    internal EpAllToAllLayout(
        object owner,
        long epoch,
        long dispatchSequence,
        int numDispatchTokens,
        int[] tokensPerSourceRank,
        int[] topKIds,
        int[] scatterIndices,
        int recvRows,
        int[] rowsPerLocalExpert,
        int[] expertRowStarts,
        int[] paddedRowsPerLocalExpert,
        RowOrigins origins,
        float[]? sourceWeights)
    {
        Owner = owner;
        Epoch = epoch;
        DispatchSequence = dispatchSequence;
        NumDispatchTokens = numDispatchTokens;
        this.tokensPerSourceRank = tokensPerSourceRank;
        this.topKIds = topKIds;
        this.scatterIndices = scatterIndices;
        RecvRows = recvRows;
        this.rowsPerLocalExpert = rowsPerLocalExpert;
        this.expertRowStarts = expertRowStarts;
        this.paddedRowsPerLocalExpert = paddedRowsPerLocalExpert;
        Origins = origins;
        SourceWeights = sourceWeights;
    }

    private readonly int[] tokensPerSourceRank;
    private readonly int[] topKIds;
    private readonly int[] scatterIndices;
    private readonly int[] rowsPerLocalExpert;
    private readonly int[] expertRowStarts;
    private readonly int[] paddedRowsPerLocalExpert;

    /// <summary>Tokens this rank dispatched.</summary>
    public int NumDispatchTokens { get; }

    /// <summary>Tokens each rank dispatched in this step: [WorldSize].</summary>
    public ReadOnlySpan<int> TokensPerSourceRank => tokensPerSourceRank;

    /// <summary>This rank's expert ids as dispatched: [NumDispatchTokens * TopK], row-major.</summary>
    public ReadOnlySpan<int> TopKIds => topKIds;

    /// <summary>
    /// Where each of this rank's (token, k) went: a global row across all ranks' outputs concatenated in rank
    /// order (-1 for a dropped slot). Passing these as scatter indices reproduces the same placement.
    /// </summary>
    public ReadOnlySpan<int> ScatterIndices => scatterIndices;

    /// <summary>Rows this rank received (padding included): the row count of the dispatch output.</summary>
    public int RecvRows { get; }

    /// <summary>Rows received per local expert, without padding: [ExpertsPerRank].</summary>
    public ReadOnlySpan<int> RowsPerLocalExpert => rowsPerLocalExpert;

    /// <summary>Rows per local expert rounded up to the configured alignment (what a grouped GEMM iterates).</summary>
    public ReadOnlySpan<int> PaddedRowsPerLocalExpert => paddedRowsPerLocalExpert;

    /// <summary>First row of each local expert in the dispatch output: [ExpertsPerRank].</summary>
    public ReadOnlySpan<int> ExpertRowStarts => expertRowStarts;

    /// <summary>True when dispatch carried routing weights (weighted combine needs them).</summary>
    public bool HasWeights => SourceWeights is not null;

    /// <summary>The layer incarnation that made this layout.</summary>
    internal object Owner { get; }

    internal long Epoch { get; }

    internal long DispatchSequence { get; }

    /// <summary>For every received row: which source rank, token and k it came from (-1 for padding).</summary>
    internal RowOrigins Origins { get; }

    internal int[] TopKIdsArray => topKIds;

    /// <summary>This rank's routing weights as dispatched, [NumDispatchTokens * TopK], or null.</summary>
    internal float[]? SourceWeights { get; }
}

/// <summary>The origin of every received row: the local-combine mapping and the return address for combine.</summary>
internal sealed class RowOrigins(int rows)
{
    public int[] Source { get; } = Filled(rows);

    public int[] Token { get; } = Filled(rows);

    public int[] K { get; } = Filled(rows);

    private static int[] Filled(int rows)
    {
        int[] a = new int[rows];
        Array.Fill(a, -1);
        return a;
    }
}

namespace EpA2A.Layer;

/// <summary>
/// What every rank agrees on after the counts exchange: every rank's receive size, this rank's rows per local
/// expert, and tokens per source rank. The CPU backend derives it from the count table
/// (<see cref="RoutingPlan"/>); the CUDA backend reads it back from the device.
/// </summary>
public interface IRoutingPlan
{
    /// <summary>Tokens each rank dispatched this step.</summary>
    int[] TokensPerRank { get; }

    /// <summary>The largest receive size over all ranks (what collective growth must cover).</summary>
    int MaxRecvRows { get; }

    /// <summary>Rows rank <paramref name="rank"/> receives, padding included.</summary>
    int RecvRows(int rank);

    /// <summary>Rows of local expert <paramref name="localExpert"/> on <paramref name="rank"/>, unpadded.</summary>
    int ExpertRows(int rank, int localExpert);

    /// <summary>First row of local expert <paramref name="localExpert"/> on <paramref name="rank"/>.</summary>
    int ExpertStart(int rank, int localExpert);
}

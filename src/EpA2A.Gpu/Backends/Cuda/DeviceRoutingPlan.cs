using EpA2A.Config;
using EpA2A.Layer;

namespace EpA2A.Backends.Cuda;

/// <summary>
/// The plan as libepa2a reports it after the counts exchange: every rank's receive size and tokens, and this
/// rank's rows and starts per local expert (the device keeps the rest of the table).
/// </summary>
internal sealed class DeviceRoutingPlan : IRoutingPlan
{
    private readonly EpConfig config;
    private readonly int[] recvRows;
    private readonly int[] expertRows;
    private readonly int[] expertStarts;

    public DeviceRoutingPlan(EpConfig config, int[] recvRows, int[] tokensPerRank, int[] expertRows, int[] expertStarts)
    {
        this.config = config;
        this.recvRows = recvRows;
        this.expertRows = expertRows;
        this.expertStarts = expertStarts;
        TokensPerRank = tokensPerRank;
        MaxRecvRows = recvRows.Length == 0 ? 0 : recvRows.Max();
    }

    public int[] TokensPerRank { get; }

    public int MaxRecvRows { get; }

    public int RecvRows(int rank) => recvRows[rank];

    public int ExpertRows(int rank, int localExpert) => expertRows[ThisRank(rank, localExpert)];

    public int ExpertStart(int rank, int localExpert) => expertStarts[ThisRank(rank, localExpert)];

    private int ThisRank(int rank, int localExpert)
    {
        if (rank != config.Rank)
        {
            throw new ArgumentOutOfRangeException(nameof(rank), rank, $"the CUDA backend reports expert rows of this rank ({config.Rank}) only");
        }

        return localExpert;
    }
}

using EpA2A.Config;

namespace EpA2A.Layer;

/// <summary>
/// Where every (expert, source rank) block of rows lands on every rank, derived from the all-gathered
/// per-expert counts. Every rank computes the same plan from the same table, so all agree on every rank's
/// receive size without another exchange (and so grow their buffers together).
/// Row order on rank d: local expert, then source rank, then (inside a block) source token and k.
/// </summary>
public sealed class RoutingPlan : IRoutingPlan
{
    private readonly int[] blockStart; // [dst rank][local expert][src rank], row offset inside dst's output
    private readonly int[] expertStart; // [dst rank][local expert]
    private readonly int[] expertRows; // [dst rank][local expert], unpadded
    private readonly int[] recvRows; // [dst rank], padded

    private RoutingPlan(EpConfig config, int[] counts, int[] tokensPerRank, bool packed)
    {
        Config = config;
        Counts = counts;
        TokensPerRank = tokensPerRank;
        int w = config.WorldSize;
        int epr = config.ExpertsPerRank;
        int e = config.NumExperts;
        int align = packed ? 1 : config.ExpertAlignment;
        blockStart = new int[w * epr * w];
        expertStart = new int[w * epr];
        expertRows = new int[w * epr];
        recvRows = new int[w];
        for (int d = 0; d < w; d++)
        {
            int row = 0;
            for (int j = 0; j < epr; j++)
            {
                int expert = (d * epr) + j;
                expertStart[(d * epr) + j] = row;
                int inExpert = 0;
                for (int s = 0; s < w; s++)
                {
                    blockStart[(((d * epr) + j) * w) + s] = row + inExpert;
                    inExpert += counts[(s * e) + expert];
                }

                expertRows[(d * epr) + j] = inExpert;
                row += RoundUp(inExpert, align);
            }

            recvRows[d] = row;
        }

        MaxRecvRows = recvRows.Max();
    }

    /// <summary>The configuration the plan was made for.</summary>
    public EpConfig Config { get; }

    /// <summary>The table it was made from: [source rank, expert], non-dropped entries only.</summary>
    public int[] Counts { get; }

    /// <summary>Tokens each rank dispatched this step.</summary>
    public int[] TokensPerRank { get; }

    /// <summary>The largest receive size over all ranks (what collective growth must cover).</summary>
    public int MaxRecvRows { get; }

    /// <summary>Builds the plan from the all-gathered table.</summary>
    /// <param name="config">The layer's configuration.</param>
    /// <param name="counts">[source rank, expert] counts of non-dropped entries.</param>
    /// <param name="tokensPerRank">Tokens dispatched by each rank.</param>
    /// <param name="packed">True when scatter indices fix the rows (no alignment padding then).</param>
    public static RoutingPlan FromCounts(EpConfig config, int[] counts, int[] tokensPerRank, bool packed)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(counts);
        ArgumentNullException.ThrowIfNull(tokensPerRank);
        if (counts.Length != config.WorldSize * config.NumExperts)
        {
            throw new ArgumentException($"count table has {counts.Length} entries, expected WorldSize*NumExperts = {config.WorldSize * config.NumExperts}", nameof(counts));
        }

        return new RoutingPlan(config, counts, tokensPerRank, packed);
    }

    /// <summary>Rows rank <paramref name="rank"/> receives, padding included.</summary>
    public int RecvRows(int rank) => recvRows[rank];

    /// <summary>First global row of <paramref name="rank"/> when all ranks' outputs are concatenated in rank order.</summary>
    public int GlobalBase(int rank)
    {
        int b = 0;
        for (int r = 0; r < rank; r++)
        {
            b += recvRows[r];
        }

        return b;
    }

    /// <summary>First row of the block that source <paramref name="source"/> fills for <paramref name="expert"/>.</summary>
    public int BlockStart(int expert, int source)
    {
        int w = Config.WorldSize;
        return blockStart[(expert * w) + source];
    }

    /// <summary>Rows of local expert <paramref name="localExpert"/> on <paramref name="rank"/>, unpadded.</summary>
    public int ExpertRows(int rank, int localExpert) => expertRows[(rank * Config.ExpertsPerRank) + localExpert];

    /// <summary>First row of local expert <paramref name="localExpert"/> on <paramref name="rank"/>.</summary>
    public int ExpertStart(int rank, int localExpert) => expertStart[(rank * Config.ExpertsPerRank) + localExpert];

    private static int RoundUp(int value, int multiple) => (value + multiple - 1) / multiple * multiple;
}

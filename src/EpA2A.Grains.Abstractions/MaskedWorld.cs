using EpA2A.Config;

namespace EpA2A.Grains;

/// <summary>
/// The group a masking layer runs on while ranks are lost: the surviving ranks, renumbered 0..m-1 in rank order, one
/// node, each with its own experts. An expert of a lost rank, and a dropped slot, map to the survivors' drop id.
/// </summary>
public sealed class MaskedWorld
{
    private readonly int[] indexOf;

    /// <summary>The survivors of <paramref name="spec"/>'s group, given as the ranks that are not masked.</summary>
    public MaskedWorld(LayerSpec spec, IReadOnlyCollection<int> masked)
    {
        ArgumentNullException.ThrowIfNull(spec);
        ArgumentNullException.ThrowIfNull(masked);
        Spec = spec;
        Members = [.. Enumerable.Range(0, spec.WorldSize).Where(r => !masked.Contains(r))];
        if (Members.Length == 0)
        {
            throw new ArgumentException("every rank is masked: there is no group to serve", nameof(masked));
        }

        indexOf = [.. Enumerable.Repeat(-1, spec.WorldSize)];
        for (int i = 0; i < Members.Length; i++)
        {
            indexOf[Members[i]] = i;
        }

        ExpertsPerRank = spec.NumExperts / spec.WorldSize;
    }

    /// <summary>The layer's spec (the whole group).</summary>
    public LayerSpec Spec { get; }

    /// <summary>The surviving ranks, in rank order: member i is rank Members[i] of the group.</summary>
    public int[] Members { get; }

    /// <summary>Experts per rank (as in the whole group).</summary>
    public int ExpertsPerRank { get; }

    /// <summary>The drop id of the survivors' layer.</summary>
    public int DroppedId => Members.Length * ExpertsPerRank;

    /// <summary>The index of <paramref name="rank"/> among the survivors, or -1 when it is masked.</summary>
    public int IndexOf(int rank) => (uint)rank < (uint)indexOf.Length ? indexOf[rank] : -1;

    /// <summary>The survivors' layer configuration for group rank <paramref name="rank"/> (one node, the intra-node algorithm).</summary>
    public EpConfig ToConfig(int rank)
    {
        int index = IndexOf(rank);
        if (index < 0)
        {
            throw new ArgumentException($"rank {rank} is masked: it has no place among the survivors {string.Join(", ", Members)}", nameof(rank));
        }

        int m = Members.Length;
        return new EpConfig(Spec.MaxTokens, Spec.Hidden, Spec.TopK, DroppedId, index, m, m, Spec.TokenType, numSms: Spec.NumSms,
            enableLocalCombine: Spec.EnableLocalCombine, useAot: Spec.UseAot, expertAlignment: Spec.ExpertAlignment);
    }

    /// <summary>
    /// Rewrites a group expert id in place into the survivors' numbering; returns true when the slot was kept by the
    /// caller but is dropped now because its expert's rank is masked.
    /// </summary>
    public bool Map(ref int expert)
    {
        if (expert == Spec.NumExperts)
        {
            expert = DroppedId;
            return false;
        }

        int index = IndexOf(expert / ExpertsPerRank);
        if (index < 0)
        {
            expert = DroppedId;
            return true;
        }

        expert = (index * ExpertsPerRank) + (expert % ExpertsPerRank);
        return false;
    }
}

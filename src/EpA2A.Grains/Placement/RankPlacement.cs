using System.Globalization;
using Orleans.Placement;
using Orleans.Runtime;
using Orleans.Runtime.MembershipService.SiloMetadata;
using Orleans.Runtime.Placement;

namespace EpA2A.Grains.Placement;

/// <summary>Silo metadata keys that say which rank of which group a silo serves.</summary>
public static class RankMetadata
{
    /// <summary>The group the silo's GPU belongs to.</summary>
    public const string Group = "epa2a.group";

    /// <summary>The rank the silo serves.</summary>
    public const string Rank = "epa2a.rank";

    /// <summary>The GPU index, when there is one.</summary>
    public const string Gpu = "epa2a.gpu";
}

/// <summary>Places a rank grain on the silo whose metadata names its group and rank.</summary>
[GenerateSerializer]
[Immutable]
[SuppressReferenceTracking]
public sealed class RankPlacementStrategy : PlacementStrategy
{
    /// <summary>The one instance.</summary>
    public static RankPlacementStrategy Instance { get; } = new();

    /// <summary>
    /// False: a rank grain is not registered in Orleans' grain directory. Its placement already names exactly one silo
    /// (the one serving its group and rank), so the directory adds no single-activation guarantee, only a hazard: when
    /// the silo holding a grain's directory entry dies, Orleans deactivates that grain wherever it runs. A healthy
    /// rank's front door was deactivated in the middle of the next step (its calls and the coordinator's probes queued
    /// behind the running step), the coordinator took the healthy rank for lost, and a masked group lost 4-6 s.
    /// </summary>
    public override bool IsUsingGrainDirectory => false;
}

/// <summary>Marks a grain class for <see cref="RankPlacementStrategy"/>.</summary>
[AttributeUsage(AttributeTargets.Class, AllowMultiple = false)]
public sealed class RankPlacementAttribute : PlacementAttribute
{
    /// <summary>Creates the attribute.</summary>
    public RankPlacementAttribute()
        : base(RankPlacementStrategy.Instance)
    {
    }
}

/// <summary>
/// Orleans' metadata filters compare the caller's metadata, not the grain key, so rank placement needs its
/// own director: it reads the group and rank from the key "group/rank" and picks the one silo that serves
/// them, or fails with <see cref="NoSiloForRankException"/> (after a short wait for a silo that just joined,
/// whose metadata may not have reached this silo's cache yet).
/// </summary>
public sealed class RankPlacementDirector(ISiloMetadataCache metadata) : IPlacementDirector
{
    private static readonly TimeSpan JoinGrace = TimeSpan.FromSeconds(1);

    /// <inheritdoc />
    public async Task<SiloAddress> OnAddActivation(PlacementStrategy strategy, PlacementTarget target, IPlacementContext context)
    {
        ArgumentNullException.ThrowIfNull(context);
        (string group, int rank) = GrainKeys.ParseRank(target.GrainIdentity.Key.ToString()!);
        string rankText = rank.ToString(CultureInfo.InvariantCulture);
        DateTime giveUp = DateTime.UtcNow + JoinGrace;
        while (true)
        {
            foreach (SiloAddress silo in context.GetCompatibleSilos(target))
            {
                var md = metadata.GetSiloMetadata(silo).Metadata;
                if (md.TryGetValue(RankMetadata.Group, out string? g) && g == group &&
                    md.TryGetValue(RankMetadata.Rank, out string? r) && r == rankText)
                {
                    return silo;
                }
            }

            if (DateTime.UtcNow >= giveUp)
            {
                throw new NoSiloForRankException($"no active silo serves group '{group}' rank {rank} (silo metadata {RankMetadata.Group}={group}, {RankMetadata.Rank}={rank})", rank);
            }

            await Task.Delay(100).ConfigureAwait(false);
        }
    }
}

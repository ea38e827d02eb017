using EpA2A.Experts;
using EpA2A.Grains.Placement;
using EpA2A.Grains.Ranks;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Orleans.Runtime.MembershipService.SiloMetadata;

namespace EpA2A.Grains.Hosting;

/// <summary>Makes a silo serve one rank of a group.</summary>
public static class EpA2ASiloBuilderExtensions
{
    /// <summary>
    /// Declares the rank in the silo's metadata (epa2a.group, epa2a.rank, epa2a.gpu), registers rank
    /// placement, the rank runtime and the built-in expert compute (replace <see cref="IExpertCompute"/> to
    /// run real experts), and turns on activity propagation so a step is one trace across silos.
    /// </summary>
    public static ISiloBuilder AddEpA2ARank(this ISiloBuilder builder, Action<RankSiloOptions> configure)
    {
        ArgumentNullException.ThrowIfNull(builder);
        ArgumentNullException.ThrowIfNull(configure);
        RankSiloOptions options = new();
        configure(options);
        if (options.Rank < 0)
        {
            throw new ArgumentException($"RankSiloOptions.Rank = {options.Rank} must not be negative", nameof(configure));
        }

        if (string.IsNullOrWhiteSpace(options.Group) || options.Group.Contains('/', StringComparison.Ordinal))
        {
            throw new ArgumentException($"RankSiloOptions.Group = '{options.Group}' must be a non-empty name without '/'", nameof(configure));
        }

        if (options.ChunkBytes < 1024)
        {
            throw new ArgumentException($"RankSiloOptions.ChunkBytes = {options.ChunkBytes} must be at least 1024", nameof(configure));
        }

        Dictionary<string, string> metadata = new()
        {
            [RankMetadata.Group] = options.Group,
            [RankMetadata.Rank] = options.Rank.ToString(System.Globalization.CultureInfo.InvariantCulture),
        };
        if (options.Gpu is int gpu)
        {
            metadata[RankMetadata.Gpu] = gpu.ToString(System.Globalization.CultureInfo.InvariantCulture);
        }

        builder.UseSiloMetadata(metadata);
        builder.AddActivityPropagation();
        builder.Services.AddPlacementDirector<RankPlacementStrategy, RankPlacementDirector>();
        builder.Services.Configure<RankSiloOptions>(o =>
        {
            o.Group = options.Group;
            o.Rank = options.Rank;
            o.Gpu = options.Gpu;
            o.Backend = options.Backend;
            o.ChunkBytes = options.ChunkBytes;
        });
        builder.Services.TryAddSingleton<IExpertCompute, DeterministicExpertCompute>();
        builder.Services.AddSingleton<RankRuntime>();
        return builder;
    }
}

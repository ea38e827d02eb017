using EpA2A.Experts;
using EpA2A.Grains.Placement;
using EpA2A.Grains.Ranks;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.DependencyInjection.Extensions;
using Microsoft.Extensions.Options;
using Orleans.Runtime.MembershipService.SiloMetadata;

namespace EpA2A.Grains.Hosting;

/// <summary>Makes a silo serve one rank of a group.</summary>
public static class EpA2ASiloBuilderExtensions
{
    /// <summary>
    /// Declares the rank in the silo's metadata (epa2a.group, epa2a.rank, epa2a.gpu), registers rank
    /// placement, the rank runtime and the built-in expert compute (replace <see cref="IExpertCompute"/> to
    /// run real experts), and turns on activity propagation so a step is one trace across silos.
    /// <see cref="RankSiloOptions"/> is bound from the section "EpA2A:Rank", then <paramref name="configure"/>
    /// runs on it; it is validated when the silo starts (<see cref="RankSiloOptionsValidator"/>).
    /// </summary>
    public static ISiloBuilder AddEpA2ARank(this ISiloBuilder builder, Action<RankSiloOptions>? configure = null)
    {
        ArgumentNullException.ThrowIfNull(builder);
        IConfigurationSection section = builder.Configuration.GetSection(RankSiloOptions.SectionName);
        OptionsBuilder<RankSiloOptions> options = builder.Services.AddOptions<RankSiloOptions>().Bind(section);
        if (configure is not null)
        {
            options.Configure(configure);
        }

        options.ValidateOnStart();
        builder.Services.TryAddEnumerable(ServiceDescriptor.Singleton<IValidateOptions<RankSiloOptions>, RankSiloOptionsValidator>());

        // Orleans takes a silo's metadata as a dictionary while the silo is built, before options exist: the same
        // two steps as the options (bind, then configure) give the values the rank runtime will see.
        RankSiloOptions declared = section.Get<RankSiloOptions>() ?? new();
        configure?.Invoke(declared);
        Dictionary<string, string> metadata = new()
        {
            [RankMetadata.Group] = declared.Group,
            [RankMetadata.Rank] = declared.Rank.ToString(System.Globalization.CultureInfo.InvariantCulture),
        };
        if (declared.Gpu is int gpu)
        {
            metadata[RankMetadata.Gpu] = gpu.ToString(System.Globalization.CultureInfo.InvariantCulture);
        }

        builder.UseSiloMetadata(metadata);
        builder.AddActivityPropagation();
        builder.Services.AddPlacementDirector<RankPlacementStrategy, RankPlacementDirector>();
        builder.Services.TryAddSingleton<IExpertCompute, DeterministicExpertCompute>();
        builder.Services.AddSingleton<RankRuntime>();
        return builder;
    }
}

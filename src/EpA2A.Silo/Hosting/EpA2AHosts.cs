using System.Net;

using EpA2A.Experts;
using EpA2A.Experts.SwiGlu;
using EpA2A.Grains.Hosting;
using EpA2A.Silo.Telemetry;

using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

using Orleans.Configuration;

namespace EpA2A.Silo.Hosting;

/// <summary>Builds the hosts the command line runs: a silo serving one rank, and a cluster client.</summary>
public static class EpA2AHosts
{
    /// <summary>A silo host for one rank; with <paramref name="declaredDead"/>, a fatal error (the cluster declaring this silo dead) is reported there instead of ending the process.</summary>
    public static IHost BuildSilo(SiloSettings settings, LogLevel logLevel = LogLevel.Warning, DeclaredDeadSignal? declaredDead = null)
    {
        ArgumentNullException.ThrowIfNull(settings);
        HostApplicationBuilder builder = Host.CreateApplicationBuilder();
        builder.Logging.SetMinimumLevel(logLevel);
        builder.Configuration.AddInMemoryCollection(settings.Configuration);
        if (settings.OwnsTelemetry)
        {
            builder.AddEpA2ATelemetry(portOffset: settings.Rank, instance: $"{settings.Group}/rank-{settings.Rank}");
        }

        if (declaredDead is not null)
        {
            builder.Services.AddSingleton<IFatalErrorHandler>(declaredDead);
        }

        // The weights are read before the silo starts: a missing or broken file ends the command before it joins.
        IExpertCompute? experts = settings.Weights is { } weights
            ? new SwiGluExpertCompute(SwiGluWeightsFile.ReadRank(weights, settings.Rank, settings.WorldSize ?? throw new ArgumentException("a silo with SwiGLU weights needs the world size", nameof(settings))))
            : null;
        if (settings.ExpertDelay > TimeSpan.Zero)
        {
            experts = new DelayedExpertCompute(experts ?? new DeterministicExpertCompute(), settings.ExpertDelay);
        }

        if (experts is not null)
        {
            builder.Services.AddSingleton(experts);
        }

        builder.UseOrleans(silo =>
        {
            switch (settings.Clustering)
            {
                case ClusteringKind.Redis:
                    silo.UseRedisClustering(settings.RedisConnection ?? throw new ArgumentException("Redis clustering needs a connection string", nameof(settings)));
                    // Other hosts dial what is advertised; listening on every address keeps a local client's loopback path too.
                    silo.ConfigureEndpoints(settings.AdvertisedAddress ?? AdvertisedAddress.OfThisHost(), settings.SiloPort, settings.GatewayPort, listenOnAnyHostAddress: true);
                    break;
                default:
                    silo.UseLocalhostClustering(settings.SiloPort, settings.GatewayPort, settings.Primary);
                    break;
            }

            silo.Configure<ClusterOptions>(o =>
            {
                o.ClusterId = settings.ClusterId;
                o.ServiceId = settings.ServiceId;
            });

            // A group cannot step without every rank, so a dead silo must be noticed in seconds, not the
            // default tens of seconds: its rank is re-placed on a restarted silo only once it is declared dead.
            silo.Configure<ClusterMembershipOptions>(o =>
            {
                o.ProbeTimeout = TimeSpan.FromSeconds(1);

                // A silo that received a message within MaxProbeTimeout x NumMissedProbesLimit is not voted dead (by
                // default 4 s x 2 = 8 s): a host whose cable is pulled mid-step was declared dead only ~8.4 s later, and
                // until then the client's messages routed through its gateway (to the coordinator, to other ranks) were
                // lost. A window of 2 s has it declared dead within ~3 s, and the client drops its gateway a second later.
                o.MaxProbeTimeout = TimeSpan.FromSeconds(1);
                o.NumMissedProbesLimit = 2;
                o.NumVotesForDeathDeclaration = 1;
                o.TableRefreshTimeout = TimeSpan.FromSeconds(2);
                o.IAmAliveTablePublishTimeout = TimeSpan.FromSeconds(2);
                o.DeathVoteExpirationTimeout = TimeSpan.FromSeconds(10);
            });
            // The settings' rank fields over the EpA2A:Rank section; a RankSiloOptions field that SiloSettings does
            // not carry is still set by configuration (SiloSettings.Configuration, appsettings.json, the environment).
            silo.AddEpA2ARank(o =>
            {
                o.Group = settings.Group;
                o.Rank = settings.Rank;
                o.Gpu = settings.Gpu;
                o.Backend = settings.Backend;
            });
        });
        return builder.Build();
    }

    /// <summary>A cluster client host that reaches the silos' gateways; <paramref name="configure"/> adds to the host (e.g. telemetry).</summary>
    public static IHost BuildClient(ClusteringKind clustering, IReadOnlyList<int> gatewayPorts, string? redis, string clusterId = "epa2a", string serviceId = "epa2a", Action<IHostApplicationBuilder>? configure = null)
    {
        ArgumentNullException.ThrowIfNull(gatewayPorts);
        HostApplicationBuilder builder = Host.CreateApplicationBuilder();
        builder.Logging.SetMinimumLevel(LogLevel.Error);
        configure?.Invoke(builder);
        builder.UseOrleansClient(client =>
        {
            if (clustering == ClusteringKind.Redis)
            {
                client.UseRedisClustering(redis ?? throw new ArgumentException("Redis clustering needs a connection string", nameof(redis)));
            }
            else
            {
                client.UseLocalhostClustering([.. gatewayPorts]);
            }

            client.Configure<ClusterOptions>(o =>
            {
                o.ClusterId = clusterId;
                o.ServiceId = serviceId;
            });
            // A gateway whose silo was declared dead (killed, or its host cut off) leaves the client's list within
            // seconds, not the default minute: until then messages routed through it are lost and only deadlines end them.
            client.Configure<GatewayOptions>(o => o.GatewayListRefreshPeriod = TimeSpan.FromSeconds(1));
            client.AddActivityPropagation();
        });
        return builder.Build();
    }
}

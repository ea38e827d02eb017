using EpA2A.Experts;
using EpA2A.Grains.Hosting;
using Microsoft.Extensions.DependencyInjection;
using Orleans.Configuration;
using Orleans.TestingHost;

namespace EpA2A.Cluster.Tests;

/// <summary>
/// Four real Orleans silos in this process, silo i serving rank i of group "g" on the CPU backend, with
/// membership tuned so a dead silo is noticed in seconds. One cluster per fixture.
/// </summary>
public sealed class RankCluster : IAsyncLifetime
{
    public const string Group = "g";
    public const int Silos = 4;

    private int? forcedRank;

    public InProcessTestCluster Cluster { get; private set; } = null!;

    public IGrainFactory Grains => Cluster.Client;

    public async ValueTask InitializeAsync()
    {
        InProcessTestClusterBuilder builder = new(Silos);
        builder.ConfigureSilo((options, silo) =>
        {
            int rank = forcedRank ?? int.Parse(options.SiloName.Split('_')[1], System.Globalization.CultureInfo.InvariantCulture);
            silo.AddEpA2ARank(o =>
            {
                o.Group = Group;
                o.Rank = rank;
                o.ChunkBytes = 16 * 1024; // small, so multi-chunk messages are exercised
            });
            silo.Services.AddSingleton<IExpertCompute, StallingExpertCompute>();
            silo.Configure<ClusterMembershipOptions>(o =>
            {
                o.ProbeTimeout = TimeSpan.FromSeconds(1);
                o.NumMissedProbesLimit = 2;
                o.NumVotesForDeathDeclaration = 1;
                o.TableRefreshTimeout = TimeSpan.FromSeconds(1);
                o.IAmAliveTablePublishTimeout = TimeSpan.FromSeconds(1);
                o.DeathVoteExpirationTimeout = TimeSpan.FromSeconds(5);
            });
            silo.Configure<SiloMessagingOptions>(o => o.ResponseTimeout = TimeSpan.FromSeconds(10));
        });
        builder.ConfigureClient(client => client.AddActivityPropagation());
        Cluster = builder.Build();
        await Cluster.DeployAsync();
    }

    /// <summary>Kills the silo serving <paramref name="rank"/> (no graceful shutdown of its grains).</summary>
    public async Task KillRankAsync(int rank)
    {
        InProcessSiloHandle victim = Cluster.Silos.Single(s => RankOf(s) == rank);
        await Cluster.KillSiloAsync(victim);
    }

    /// <summary>Starts a new silo that serves <paramref name="rank"/>.</summary>
    public async Task StartRankAsync(int rank)
    {
        forcedRank = rank;
        try
        {
            InProcessSiloHandle silo = await Cluster.StartAdditionalSiloAsync();
            ranksByName[silo.Name] = rank;
        }
        finally
        {
            forcedRank = null;
        }
    }

    public async ValueTask DisposeAsync() => await Cluster.DisposeAsync();

    private readonly Dictionary<string, int> ranksByName = [];

    private int RankOf(InProcessSiloHandle silo) =>
        ranksByName.TryGetValue(silo.Name, out int r) ? r : int.Parse(silo.Name.Split('_')[1], System.Globalization.CultureInfo.InvariantCulture);
}

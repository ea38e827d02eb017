using System.CommandLine;
using System.Globalization;
using System.Net;

using EpA2A.Silo.Hosting;

using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

namespace EpA2A.Silo.Commands;

/// <summary>`epa2a silo`: one silo serving one rank, until stopped (for multi-process and multi-host clusters).</summary>
internal static class SiloCommand
{
    public static Command Create()
    {
        Option<int> rank = new("--rank") { Description = "The rank this silo serves", Required = true };
        Option<int> world = new("--world-size") { Description = "Ranks in the group (checked against --rank)", Required = true };
        Option<string> group = new("--group") { Description = "Group name", DefaultValueFactory = _ => "default" };
        Option<string> backend = new("--backend") { Description = "cpu or cuda", DefaultValueFactory = _ => "cpu" };
        Option<int?> gpu = new("--gpu") { Description = "GPU index (cuda backend)" };
        Option<int> portBase = new("--port-base") { Description = "Silo port = base + rank; gateway = base + 100 + rank", DefaultValueFactory = _ => 11111 };
        Option<int?> primaryPort = new("--primary-port") { Description = "Localhost clustering: the membership primary's silo port (default: --port-base, rank 0's silo). Another silo's port lets every rank restart without taking membership down" };
        Option<string> clustering = new("--clustering") { Description = "localhost (rank 0 is primary) or redis", DefaultValueFactory = _ => "localhost" };
        Option<string?> redis = new("--redis") { Description = "Redis connection string (with --clustering redis)" };
        Option<string> advertise = new("--advertise") { Description = "With --clustering redis: the address other hosts reach this silo at (an IP or a host name); auto: this host's own (an up, non-loopback interface, the routed one first). Loopback only when given", DefaultValueFactory = _ => "auto" };
        Option<string> clusterId = new("--cluster-id") { Description = "Orleans cluster id", DefaultValueFactory = _ => "epa2a" };
        Option<int> expertDelay = new("--expert-delay-ms") { Description = "Fault drill: this rank's experts wait this long every step (a straggler)", DefaultValueFactory = _ => 0 };

        TelemetryCommandOptions telemetry = new();
        Command command = new("silo", "Run one silo serving one rank until Ctrl-C.")
        {
            rank, world, group, backend, gpu, portBase, primaryPort, clustering, redis, advertise, clusterId, expertDelay,
        };
        telemetry.AddTo(command);
        command.SetAction(async (p, ct) =>
        {
            int r = p.GetValue(rank);
            int w = p.GetValue(world);
            if (r < 0 || r >= w)
            {
                throw new ArgumentException($"--rank {r} must be in [0, --world-size {w})");
            }

            string b = p.GetValue(backend)!;
            if (b is not ("cpu" or "cuda"))
            {
                throw new ArgumentException($"--backend '{b}' is not cpu or cuda");
            }

            ClusteringKind kind = p.GetValue(clustering) switch
            {
                "localhost" => ClusteringKind.Localhost,
                "redis" => ClusteringKind.Redis,
                string other => throw new ArgumentException($"--clustering '{other}' is not localhost or redis"),
                null => ClusteringKind.Localhost,
            };
            int basePort = p.GetValue(portBase);
            int delayMs = p.GetValue(expertDelay);
            if (delayMs < 0)
            {
                throw new ArgumentException($"--expert-delay-ms {delayMs} must not be negative");
            }

            IPAddress? advertised = kind == ClusteringKind.Redis ? AdvertisedAddress.Parse(p.GetValue(advertise)) : null;
            using IHost silo = EpA2AHosts.BuildSilo(
                new SiloSettings
                {
                    Group = p.GetValue(group)!,
                    Rank = r,
                    Backend = b,
                    Gpu = p.GetValue(gpu),
                    SiloPort = basePort + r,
                    GatewayPort = basePort + 100 + r,
                    Primary = new IPEndPoint(IPAddress.Loopback, p.GetValue(primaryPort) ?? basePort),
                    Clustering = kind,
                    RedisConnection = p.GetValue(redis),
                    AdvertisedAddress = advertised,
                    ClusterId = p.GetValue(clusterId)!,
                    ExpertDelay = TimeSpan.FromMilliseconds(delayMs),
                    Configuration = telemetry.ToConfiguration(p),
                },
                LogLevel.Information);
            await silo.StartAsync(ct);
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"epa2a silo: rank {r} of {w} in group '{p.GetValue(group)}' ({b}), silo port {basePort + r}, gateway {basePort + 100 + r}, advertised at {advertised?.ToString() ?? "127.0.0.1 (localhost clustering)"}, pid {Environment.ProcessId}; Ctrl-C to stop"));
            await silo.WaitForShutdownAsync(ct);
            return 0;
        });
        return command;
    }
}

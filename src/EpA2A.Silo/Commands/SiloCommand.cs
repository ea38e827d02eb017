using System.CommandLine;
using System.Globalization;
using System.Net;

using EpA2A.Grains;
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
        Option<string> backend = new("--backend") { Description = string.Join(" or ", EpBackendKinds.Names), DefaultValueFactory = _ => EpBackendKind.Cpu.ToName() };
        Option<int?> gpu = new("--gpu") { Description = "GPU index (cuda backend)" };
        Option<int> portBase = new("--port-base") { Description = "Silo port = base + rank; gateway = base + 100 + rank", DefaultValueFactory = _ => 11111 };
        Option<int?> primaryPort = new("--primary-port") { Description = "Localhost clustering: the membership primary's silo port (default: --port-base, rank 0's silo). Another silo's port lets every rank restart without taking membership down" };
        Option<string> clustering = new("--clustering") { Description = "localhost (rank 0 is primary) or redis", DefaultValueFactory = _ => "localhost" };
        Option<string?> redis = new("--redis") { Description = "Redis connection string (with --clustering redis)" };
        Option<string> advertise = new("--advertise") { Description = "With --clustering redis: the address other hosts reach this silo at (an IP or a host name); auto: this host's own (an up, non-loopback interface, the routed one first). Loopback only when given", DefaultValueFactory = _ => "auto" };
        Option<string> clusterId = new("--cluster-id") { Description = "Orleans cluster id", DefaultValueFactory = _ => "epa2a" };
        Option<string?> weights = new("--weights") { Description = "Serve SwiGLU experts from this directory's experts-rank{r}.safetensors (written by `epa2a weights`) instead of the built-in deterministic experts" };
        Option<int> expertDelay = new("--expert-delay-ms") { Description = "Fault drill: this rank's experts wait this long every step (a straggler)", DefaultValueFactory = _ => 0 };

        TelemetryCommandOptions telemetry = new();
        Command command = new("silo", "Run one silo serving one rank until Ctrl-C.")
        {
            rank, world, group, backend, gpu, portBase, primaryPort, clustering, redis, advertise, clusterId, expertDelay, weights,
        };
        telemetry.AddTo(command);
        Option<int> gatewayOffset = new("--gateway-offset") { Description = "Gateway port = port base + this + rank (at least the world size, so silo and gateway ports never meet)", DefaultValueFactory = _ => 100 };
        command.Options.Add(gatewayOffset);
        command.SetAction(async (p, ct) =>
        {
            int r = p.GetValue(rank);
            int w = p.GetValue(world);
            OptionRules.Require(w >= 1, $"--world-size {w} must be at least 1");
            OptionRules.Require(r >= 0 && r < w, $"--rank {r} must be in [0, --world-size {w})");
            EpBackendKind b = OptionRules.Backend(p.GetValue(backend));
            ClusteringKind kind = OptionRules.Clustering(p.GetValue(clustering), p.GetValue(redis));
            int basePort = p.GetValue(portBase);
            int offset = p.GetValue(gatewayOffset);
            OptionRules.Ports(basePort, offset, w, "--world-size");
            int delayMs = p.GetValue(expertDelay);
            OptionRules.Require(delayMs >= 0, $"--expert-delay-ms {delayMs} must not be negative");
            OptionRules.Require(p.GetValue(gpu) is null or >= 0, $"--gpu {p.GetValue(gpu)} must not be negative");
            IPAddress? advertised = kind == ClusteringKind.Redis ? Advertised(p.GetValue(advertise)) : null;
            SiloSettings settings = new()
            {
                Group = p.GetValue(group)!,
                Rank = r,
                Backend = b,
                Gpu = p.GetValue(gpu),
                SiloPort = basePort + r,
                GatewayPort = basePort + offset + r,
                Primary = new IPEndPoint(IPAddress.Loopback, p.GetValue(primaryPort) ?? basePort),
                Clustering = kind,
                RedisConnection = p.GetValue(redis),
                AdvertisedAddress = advertised,
                ClusterId = p.GetValue(clusterId)!,
                ExpertDelay = TimeSpan.FromMilliseconds(delayMs),
                Weights = OptionRules.Weights(p.GetValue(weights), [r]),
                WorldSize = w,
                Configuration = telemetry.ToConfiguration(p),
            };
            return await ServeAsync(settings, w, ct);
        });
        return command;
    }

    /// <summary>--advertise as an address; a bad one is a usage error (exit code 2) naming the option.</summary>
    private static IPAddress Advertised(string? text)
    {
        try
        {
            return AdvertisedAddress.Parse(text);
        }
        catch (ArgumentException e)
        {
            throw new UsageException(e.Message, e);
        }
    }

    /// <summary>
    /// Serves the rank until stopped. A silo the cluster declared dead (it was paused, or cut off, past the probe
    /// limit) cannot rejoin under its old identity: instead of ending the process, the host is stopped and a new one
    /// starts on the same ports, a new generation that the others admit as a fresh member. A silo whose membership table
    /// vanished (Redis restarted empty) does the same: a new host re-creates the table and its row.
    /// </summary>
    private static async Task<int> ServeAsync(SiloSettings settings, int world, CancellationToken ct)
    {
        for (int incarnation = 1; ; incarnation++)
        {
            try
            {
                SiloStartChecks.RequireFreePorts((settings.SiloPort, "silo"), (settings.GatewayPort, "gateway"));
            }
            catch (IOException e)
            {
                throw new UsageException($"rank {settings.Rank}: {e.Message}", e);
            }

            DeclaredDeadSignal declaredDead = new();
            IHost silo = EpA2AHosts.BuildSilo(settings, LogLevel.Information, declaredDead);
            using CancellationTokenSource watch = new();
            try
            {
                await silo.StartAsync(ct);
                if (await SiloStartChecks.FindLiveDuplicateAsync(silo, settings.Group, settings.Rank, TimeSpan.FromSeconds(2), TimeSpan.FromSeconds(10), ct) is string other)
                {
                    throw new UsageException($"rank {settings.Rank} of group '{settings.Group}' is already served by the live silo {other}: a second silo for one rank is refused (stop that one first)");
                }

                Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"epa2a silo: rank {settings.Rank} of {world} in group '{settings.Group}' ({settings.Backend.ToName()}), silo port {settings.SiloPort}, gateway {settings.GatewayPort}, advertised at {settings.AdvertisedAddress?.ToString() ?? "127.0.0.1 (localhost clustering)"}, pid {Environment.ProcessId}{(incarnation > 1 ? $", restarted in process (start {incarnation})" : string.Empty)}; Ctrl-C to stop"));
                Task shutdown = silo.WaitForShutdownAsync(ct);
                Task<string> tableGone = settings.Clustering == ClusteringKind.Redis
                    ? MembershipTableWatch.WaitUntilGoneAsync(silo, TimeSpan.FromSeconds(1), watch.Token)
                    : new TaskCompletionSource<string>().Task;
                Task first = await Task.WhenAny(shutdown, declaredDead.Task, tableGone);
                if (first == shutdown)
                {
                    await shutdown;
                    return ExitCodes.Ok;
                }

                if (first == tableGone)
                {
                    Console.WriteLine($"epa2a silo: rank {settings.Rank}: the membership table of cluster '{settings.ClusterId}' in Redis {settings.RedisConnection} is gone ({tableGone.Result}; Redis restarted empty, or its keys were deleted); rejoining: restarting the silo in this process");
                    await MembershipTableWatch.RecreateAsync(silo, TimeSpan.FromSeconds(5));
                }
                else
                {
                    Console.WriteLine($"epa2a silo: rank {settings.Rank} was declared dead by the cluster ({declaredDead.Task.Result}); restarting the silo in this process");
                }
            }
            finally
            {
                await watch.CancelAsync();
                try
                {
                    await silo.StopAsync(CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(10), CancellationToken.None);
                }
                catch (Exception e) when (e is TimeoutException or OrleansException or OperationCanceledException or InvalidOperationException)
                {
                    // A silo declared dead may not stop cleanly; its successor needs only its ports.
                }

                silo.Dispose();
            }
        }
    }
}

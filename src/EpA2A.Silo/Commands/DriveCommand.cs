using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using EpA2A.Config;
using EpA2A.Grains;
using EpA2A.Numerics;
using EpA2A.Silo.Hosting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;

namespace EpA2A.Silo.Commands;

/// <summary>
/// `epa2a drive`: a cluster client in its own process. Connects to running `epa2a silo` processes (localhost
/// gateways or Redis membership), configures a layer, and runs checked steps through the grains, one line
/// per step. With --continue-on-failure it keeps going after a failed step (a failure-injection harness).
/// </summary>
internal static class DriveCommand
{
    public static Command Create()
    {
        Option<int> world = new("--world-size") { Description = "Ranks in the group", Required = true };
        Option<string> group = new("--group") { Description = "Group name", DefaultValueFactory = _ => "default" };
        Option<string> layer = new("--layer") { Description = "Layer name", DefaultValueFactory = _ => "layer0" };
        Option<string> clustering = new("--clustering") { Description = "localhost or redis", DefaultValueFactory = _ => "localhost" };
        Option<string?> redis = new("--redis") { Description = "Redis connection string (with --clustering redis)" };
        Option<int> portBase = new("--port-base") { Description = "Silo port base; gateways are base + 100 + rank (localhost clustering)", DefaultValueFactory = _ => 11111 };
        Option<string> clusterId = new("--cluster-id") { Description = "Orleans cluster id", DefaultValueFactory = _ => "epa2a" };
        Option<int> steps = new("--steps") { Description = "Steps to run", DefaultValueFactory = _ => 10 };
        Option<int?> local = new("--local-world-size") { Description = "Ranks per node" };
        Option<int> maxTokens = new("--max-tokens") { Description = "Tokens per rank per step, at most", DefaultValueFactory = _ => 64 };
        Option<int> hidden = new("--hidden") { Description = "Elements per token", DefaultValueFactory = _ => 256 };
        Option<int> topK = new("--topk") { Description = "Experts per token", DefaultValueFactory = _ => 4 };
        Option<int> experts = new("--experts") { Description = "Experts in the group", DefaultValueFactory = _ => 16 };
        Option<string> tokenType = new("--token-type") { Description = "bf16, fp16 or fp32", DefaultValueFactory = _ => "bf16" };
        Option<double> drop = new("--drop") { Description = "Probability that a slot is dropped", DefaultValueFactory = _ => 0.1 };
        Option<int> seed = new("--seed") { Description = "Seed of the random routing", DefaultValueFactory = _ => 1 };
        Option<double> timeout = new("--timeout-seconds") { Description = "Step deadline", DefaultValueFactory = _ => 10 };
        Option<bool> keepGoing = new("--continue-on-failure") { Description = "Keep stepping after a failed step" };
        Option<int> interval = new("--interval-ms") { Description = "Pause between steps", DefaultValueFactory = _ => 0 };

        Command command = new("drive", "Run checked steps through the grains of running silos, from a separate client process.")
        {
            world, group, layer, clustering, redis, portBase, clusterId, steps, local, maxTokens, hidden, topK, experts, tokenType, drop, seed, timeout, keepGoing, interval,
        };
        command.SetAction(async (p, ct) =>
        {
            LayerSpec spec = new LayerSpec
            {
                MaxTokens = p.GetValue(maxTokens),
                Hidden = p.GetValue(hidden),
                TopK = p.GetValue(topK),
                NumExperts = p.GetValue(experts),
                WorldSize = p.GetValue(world),
                LocalWorldSize = p.GetValue(local),
                TokenType = LocalCommand.ParseTokenType(p.GetValue(tokenType)!),
                StepTimeout = TimeSpan.FromSeconds(p.GetValue(timeout)),
            }.Validated();
            ClusteringKind kind = p.GetValue(clustering) == "redis" ? ClusteringKind.Redis : ClusteringKind.Localhost;
            int basePort = p.GetValue(portBase);
            using IHost host = EpA2AHosts.BuildClient(kind, [.. Enumerable.Range(0, spec.WorldSize).Select(r => basePort + 100 + r)], p.GetValue(redis), p.GetValue(clusterId)!);
            await host.StartAsync(ct);
            IClusterClient client = host.Services.GetRequiredService<IClusterClient>();
            Drive drive = new(new ExpertLayerClient(client, p.GetValue(group)!, p.GetValue(layer)!), spec, p.GetValue(steps), p.GetValue(seed), p.GetValue(drop), p.GetValue(keepGoing), TimeSpan.FromMilliseconds(p.GetValue(interval)));
            int failures = spec.TokenType switch
            {
                TokenType.BFloat16 => await drive.RunAsync<BFloat16>(Console.Out, ct),
                TokenType.Float16 => await drive.RunAsync<Half>(Console.Out, ct),
                _ => await drive.RunAsync<float>(Console.Out, ct),
            };
            await host.StopAsync(CancellationToken.None);
            return failures == 0 ? 0 : 1;
        });
        return command;
    }

    private sealed record Drive(ExpertLayerClient Client, LayerSpec Spec, int Steps, int Seed, double DropRatio, bool KeepGoing, TimeSpan Interval)
    {
        public async Task<int> RunAsync<T>(TextWriter output, CancellationToken cancellationToken)
            where T : unmanaged
        {
            await ConfigureWithRetryAsync(output, cancellationToken);
            Random rng = new(Seed);
            PhaseTable table = new();
            int failures = 0;
            for (int s = 1; s <= Steps && !cancellationToken.IsCancellationRequested; s++)
            {
                long start = Stopwatch.GetTimestamp();
                try
                {
                    (StepReport report, double worst, TimeSpan roundTrip) = await StepChecker.RunAsync<T>(Client, Spec, rng, DropRatio, skewed: false, weighted: false, cancellationToken);
                    bool ok = worst <= 1.0;
                    failures += ok ? 0 : 1;
                    output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"step {s}: {(ok ? "ok" : "MISMATCH")}, {report.Ranks.Sum(r => r.ReceivedRows)} rows, {roundTrip.TotalMilliseconds:0.0} ms"));
                    table.Add("Client round trip", roundTrip.TotalMicroseconds);
                }
                catch (Exception e) when (e is not OperationCanceledException || !cancellationToken.IsCancellationRequested)
                {
                    failures++;
                    string message = e.Message.ReplaceLineEndings(" ");
                    output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"step {s}: FAILED after {Stopwatch.GetElapsedTime(start).TotalMilliseconds:0} ms: {e.GetType().Name}: {message}"));
                    if (!KeepGoing)
                    {
                        break;
                    }
                }

                output.Flush();
                if (Interval > TimeSpan.Zero)
                {
                    await Task.Delay(Interval, cancellationToken);
                }
            }

            output.Write(table.Render());
            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"drive: {failures} of {Steps} steps failed"));
            return failures;
        }

        // The silos may still be joining: retry forming the group for a while, saying why each try failed.
        private async Task ConfigureWithRetryAsync(TextWriter output, CancellationToken cancellationToken)
        {
            DateTime giveUp = DateTime.UtcNow + TimeSpan.FromSeconds(60);
            while (true)
            {
                try
                {
                    await Client.ConfigureAsync(Spec);
                    CoordinatorInfo where = await Client.Coordinator.DescribeAsync();
                    output.WriteLine($"drive: layer '{Client.Layer}' formed over {Spec.WorldSize} ranks; its coordinator runs in process {where.ProcessId} (silo {where.Silo})");
                    output.Flush();
                    return;
                }
                catch (Exception e) when (DateTime.UtcNow < giveUp && e is not ArgumentException)
                {
                    output.WriteLine($"drive: group not ready ({e.Message.ReplaceLineEndings(" ")}); retrying");
                    output.Flush();
                    await Task.Delay(500, cancellationToken);
                }
            }
        }
    }
}

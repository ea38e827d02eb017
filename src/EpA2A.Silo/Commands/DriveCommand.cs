using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using EpA2A.Config;
using EpA2A.Experts.SwiGlu;
using EpA2A.Grains;
using EpA2A.Numerics;
using EpA2A.Silo.Hosting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Logging;

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
        Option<bool> masking = new("--masking") { Description = "Configure the layer to mask lost ranks (LostRankPolicy.Mask): serve on the survivors, their experts' slots dropped, until they are back" };
        Option<int> interval = new("--interval-ms") { Description = "Pause between steps", DefaultValueFactory = _ => 0 };
        Option<bool> takeOver = new("--take-over") { Description = "Re-configure the layer even while another client is stepping it (that client's next step then fails, naming this one)" };
        Option<double> connectTimeout = new("--connect-timeout-seconds") { Description = "Give up when no gateway answers, or the group does not form, within this", DefaultValueFactory = _ => 60 };
        Option<string?> weights = new("--weights") { Description = "The silos serve SwiGLU experts from this directory (`epa2a weights`): check steps against the reference SwiGLU on these weights" };
        Option<int> gatewayOffset = new("--gateway-offset") { Description = "Gateway port = port base + this + rank (as the silos were started)", DefaultValueFactory = _ => 100 };

        Command command = new("drive", "Run checked steps through the grains of running silos, from a separate client process.")
        {
            world, group, layer, clustering, redis, portBase, clusterId, steps, local, maxTokens, hidden, topK, experts, tokenType, drop, seed, timeout, keepGoing, masking, interval, takeOver, connectTimeout, gatewayOffset, weights,
        };
        command.SetAction(async (p, ct) =>
        {
            int stepCount = p.GetValue(steps);
            OptionRules.Require(stepCount >= 0, $"--steps {stepCount} must not be negative");
            OptionRules.Require(p.GetValue(interval) >= 0, $"--interval-ms {p.GetValue(interval)} must not be negative");
            double dropRatio = OptionRules.Probability(p.GetValue(drop), "--drop");
            TimeSpan stepTimeout = OptionRules.Seconds(p.GetValue(timeout), "--timeout-seconds");
            TimeSpan connectBound = OptionRules.Seconds(p.GetValue(connectTimeout), "--connect-timeout-seconds");
            ClusteringKind kind = OptionRules.Clustering(p.GetValue(clustering), p.GetValue(redis));
            int basePort = p.GetValue(portBase);
            int offset = p.GetValue(gatewayOffset);
            OptionRules.Require(p.GetValue(world) >= 1, $"--world-size {p.GetValue(world)} must be at least 1");
            OptionRules.Ports(basePort, offset, p.GetValue(world), "--world-size");
            LayerSpec spec = OptionRules.Spec(() => new LayerSpec
            {
                MaxTokens = p.GetValue(maxTokens),
                Hidden = p.GetValue(hidden),
                TopK = p.GetValue(topK),
                NumExperts = p.GetValue(experts),
                WorldSize = p.GetValue(world),
                LocalWorldSize = p.GetValue(local),
                TokenType = OptionRules.TokenType(p.GetValue(tokenType)!),
                StepTimeout = stepTimeout,
                OnLostRank = p.GetValue(masking) ? LostRankPolicy.Mask : LostRankPolicy.FailAndReform,
            });
            SwiGluWeights[]? swiglu = OptionRules.SwiGluFor(p.GetValue(weights), spec);
            // A start that fails is reported as one line below; the host's own log of it is a stack trace.
            using IHost host = EpA2AHosts.BuildClient(
                kind,
                [.. Enumerable.Range(0, spec.WorldSize).Select(r => basePort + offset + r)],
                p.GetValue(redis),
                p.GetValue(clusterId)!,
                configure: b => b.Logging.AddFilter("Microsoft.Extensions.Hosting", LogLevel.None));
            await StartWithDeadlineAsync(host, connectBound, kind == ClusteringKind.Redis ? $"Redis {p.GetValue(redis)}" : $"gateways on ports {basePort + offset}-{basePort + offset + spec.WorldSize - 1}", ct);
            IClusterClient client = host.Services.GetRequiredService<IClusterClient>();
            ExpertLayerClient layerClient = new(client, p.GetValue(group)!, p.GetValue(layer)!, clientName: $"epa2a drive (process {Environment.ProcessId} on {Environment.MachineName})");
            Drive drive = new(layerClient, spec, stepCount, p.GetValue(seed), dropRatio, p.GetValue(keepGoing), TimeSpan.FromMilliseconds(p.GetValue(interval)))
            {
                TakeOver = p.GetValue(takeOver),
                ConnectBound = connectBound,
                SwiGlu = swiglu,
            };
            (int mismatches, int failures) = spec.TokenType switch
            {
                TokenType.BFloat16 => await drive.RunAsync<BFloat16>(Console.Out, ct),
                TokenType.Float16 => await drive.RunAsync<Half>(Console.Out, ct),
                _ => await drive.RunAsync<float>(Console.Out, ct),
            };
            await host.StopAsync(CancellationToken.None).WaitAsync(TimeSpan.FromSeconds(10), CancellationToken.None).ContinueWith(_ => { }, TaskScheduler.Default);
            return mismatches > 0 ? ExitCodes.Mismatch : failures > 0 ? ExitCodes.ClusterFailed : ExitCodes.Ok;
        });
        return command;
    }

    /// <summary>Starts a cluster client, or fails naming what it tried to reach once <paramref name="bound"/> has passed.</summary>
    internal static async Task StartWithDeadlineAsync(IHost host, TimeSpan bound, string reaching, CancellationToken cancellationToken)
    {
        using CancellationTokenSource cts = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        cts.CancelAfter(bound);
        try
        {
            await host.StartAsync(cts.Token).WaitAsync(bound, cancellationToken);
        }
        catch (Exception e) when (!cancellationToken.IsCancellationRequested && e is OperationCanceledException or TimeoutException or OrleansException)
        {
            throw new TimeoutException($"no silo could be reached within {bound.TotalSeconds:0.#} s through {reaching} (are the silos running, with this --cluster-id?): {RemoteFailure.Describe(e)}", e);
        }
    }

    private sealed record Drive(ExpertLayerClient Client, LayerSpec Spec, int Steps, int Seed, double DropRatio, bool KeepGoing, TimeSpan Interval)
    {
        public bool TakeOver { get; init; }

        public TimeSpan ConnectBound { get; init; } = TimeSpan.FromSeconds(60);

        /// <summary>Every rank's SwiGLU weights when the silos serve them (--weights): the check's reference experts.</summary>
        public SwiGluWeights[]? SwiGlu { get; init; }

        public async Task<(int Mismatches, int Failures)> RunAsync<T>(TextWriter output, CancellationToken cancellationToken)
            where T : unmanaged
        {
            await ConfigureWithRetryAsync(output, cancellationToken);
            Random rng = new(Seed);
            PhaseTable table = new();
            int failures = 0;
            int mismatches = 0;
            for (int s = 1; s <= Steps && !cancellationToken.IsCancellationRequested; s++)
            {
                long start = Stopwatch.GetTimestamp();
                try
                {
                    (StepReport report, double worst, TimeSpan roundTrip) = await StepChecker.RunAsync<T>(Client, Spec, rng, DropRatio, skewed: false, weighted: false, cancellationToken, SwiGlu);
                    bool ok = worst <= 1.0;
                    mismatches += ok ? 0 : 1;
                    output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"step {s}: {(ok ? "ok" : "MISMATCH")}, {report.Ranks.Sum(r => r.ReceivedRows)} rows, {roundTrip.TotalMilliseconds:0.0} ms{(report.MaskedRanks is { Count: > 0 } m ? $", masked ranks [{string.Join(", ", m)}]: {report.MaskedSlots} slots dropped" : string.Empty)}"));
                    table.Add("Client round trip", roundTrip.TotalMicroseconds);
                }
                catch (Exception e) when (e is not OperationCanceledException || !cancellationToken.IsCancellationRequested)
                {
                    failures++;
                    string message = e is TimeoutException or OrleansException ? RemoteFailure.Describe(e, innermost: false) : RemoteFailure.Clean(e.Message);
                    output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"step {s}: FAILED after {Stopwatch.GetElapsedTime(start).TotalMilliseconds:0} ms: {e.GetType().Name}: {message}"));

                    // Another client re-configured the layer: every further step would be refused the same way.
                    if (!KeepGoing || e is LayerSpecConflictException or ArgumentException)
                    {
                        output.Flush();
                        if (e is LayerSpecConflictException)
                        {
                            await Console.Error.WriteLineAsync($"epa2a drive: {message}");
                        }

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
            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"drive: {failures + mismatches} of {Steps} steps failed ({mismatches} mismatched)"));
            return (mismatches, failures);
        }

        // The silos may still be joining: retry forming the group for a while, saying why each try failed. A bad
        // config or a layer held by another client is not cured by retrying: those end the run at once.
        private async Task ConfigureWithRetryAsync(TextWriter output, CancellationToken cancellationToken)
        {
            DateTime giveUp = DateTime.UtcNow + ConnectBound;
            while (true)
            {
                try
                {
                    await Client.ConfigureAsync(Spec, TakeOver).WaitAsync(ConnectBound, cancellationToken);
                    CoordinatorInfo where = await Client.Coordinator.DescribeAsync().WaitAsync(ConnectBound, cancellationToken);
                    output.WriteLine($"drive: layer '{Client.Layer}' formed over {Spec.WorldSize} ranks; its coordinator runs in process {where.ProcessId} (silo {where.Silo})");
                    output.Flush();
                    return;
                }
                catch (Exception e) when (DateTime.UtcNow < giveUp && e is not (ArgumentException or LayerSpecConflictException or OperationCanceledException))
                {
                    output.WriteLine($"drive: group not ready ({(e is TimeoutException or OrleansException ? RemoteFailure.Describe(e, innermost: false) : RemoteFailure.Clean(e.Message))}); retrying");
                    output.Flush();
                    await Task.Delay(500, cancellationToken);
                }
            }
        }
    }
}

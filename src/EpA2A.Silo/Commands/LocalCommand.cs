using System.CommandLine;
using System.Globalization;
using System.Net;

using EpA2A.Config;
using EpA2A.Grains;
using EpA2A.LowLatency;
using EpA2A.Numerics;
using EpA2A.Silo.Hosting;
using EpA2A.Silo.Telemetry;

using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;

namespace EpA2A.Silo.Commands;

/// <summary>
/// `epa2a local`: a cluster of N silos in this process (CPU backend, localhost clustering), one per rank,
/// driven by a cluster client through the grains: random routing every step, each step checked against the
/// reference, then a per-phase latency table.
/// </summary>
internal static class LocalCommand
{
    public static Command Create()
    {
        Option<int> ranks = new("--ranks") { Description = "Silos (ranks) to start", DefaultValueFactory = _ => 4 };
        Option<int?> local = new("--local-world-size") { Description = "Ranks per node (default: all; smaller runs the inter-node algorithm)" };
        Option<int> steps = new("--steps") { Description = "Steps to run", DefaultValueFactory = _ => 10 };
        Option<int> maxTokens = new("--max-tokens") { Description = "Tokens per rank per step, at most", DefaultValueFactory = _ => 128 };
        Option<int> hidden = new("--hidden") { Description = "Elements per token", DefaultValueFactory = _ => 1024 };
        Option<int> topK = new("--topk") { Description = "Experts per token", DefaultValueFactory = _ => 8 };
        Option<int> experts = new("--experts") { Description = "Experts in the group (a multiple of --ranks)", DefaultValueFactory = _ => 64 };
        Option<string> tokenType = new("--token-type") { Description = "bf16, fp16 or fp32", DefaultValueFactory = _ => "bf16" };
        Option<double> drop = new("--drop") { Description = "Probability that a slot is dropped", DefaultValueFactory = _ => 0.1 };
        Option<bool> skewed = new("--skewed") { Description = "Power-law expert popularity instead of uniform" };
        Option<bool> weighted = new("--weighted") { Description = "Send routing weights and combine weighted" };
        Option<bool> localCombine = new("--local-combine") { Description = "A token crosses to a rank once (single node)" };
        Option<int> seed = new("--seed") { Description = "Seed of the random routing", DefaultValueFactory = _ => 1 };
        Option<int> portBase = new("--port-base") { Description = "First silo port; gateways start 100 above", DefaultValueFactory = _ => 11111 };
        Option<double> timeout = new("--timeout-seconds") { Description = "Step deadline", DefaultValueFactory = _ => 30 };
        Option<string> mode = new("--mode") { Description = "normal, or low-latency (the decode layer: bf16, one node)", DefaultValueFactory = _ => "normal" };
        Option<bool> fp8 = new("--fp8") { Description = "Low-latency mode: FP8 e4m3 dispatch (--hidden a multiple of 128)" };
        Option<bool> pow2 = new("--pow2-scales") { Description = "Low-latency FP8: power-of-two (UE8M0) scales" };
        Option<string?> weights = new("--weights") { Description = "Serve SwiGLU experts from this directory (`epa2a weights`, one file per rank) and check steps against the reference SwiGLU" };

        TelemetryCommandOptions telemetry = new();
        Command command = new("local", "Start a local cluster of silos (CPU backend) and run checked steps through the grains.")
        {
            ranks, local, steps, maxTokens, hidden, topK, experts, tokenType, drop, skewed, weighted, localCombine, seed, portBase, timeout, mode, fp8, pow2, weights,
        };
        telemetry.AddTo(command);
        command.SetAction(async (p, ct) =>
        {
            int stepCount = p.GetValue(steps);
            OptionRules.Require(stepCount >= 0, $"--steps {stepCount} must not be negative");
            OptionRules.Require(p.GetValue(ranks) >= 1, $"--ranks {p.GetValue(ranks)} must be at least 1");
            OptionRules.Ports(p.GetValue(portBase), LocalRun.GatewayOffset, p.GetValue(ranks), "--ranks");
            double dropRatio = OptionRules.Probability(p.GetValue(drop), "--drop");
            TimeSpan stepTimeout = OptionRules.Seconds(p.GetValue(timeout), "--timeout-seconds");
            LayerSpec spec = OptionRules.Spec(() => new LayerSpec
            {
                MaxTokens = p.GetValue(maxTokens),
                Hidden = p.GetValue(hidden),
                TopK = p.GetValue(topK),
                NumExperts = p.GetValue(experts),
                WorldSize = p.GetValue(ranks),
                LocalWorldSize = p.GetValue(local),
                TokenType = OptionRules.TokenType(p.GetValue(tokenType)!),
                Mode = ParseMode(p.GetValue(mode)!),
                LowLatencyFormat = p.GetValue(fp8) ? LowLatencyFormat.Fp8 : LowLatencyFormat.Bf16,
                PowerOfTwoScales = p.GetValue(pow2),
                EnableLocalCombine = p.GetValue(localCombine),
                StepTimeout = stepTimeout,
            });
            LocalRun run = new(spec, stepCount, p.GetValue(seed), dropRatio, p.GetValue(skewed), p.GetValue(weighted), p.GetValue(portBase))
            {
                Telemetry = telemetry.ToConfiguration(p),
                Weights = p.GetValue(weights),
                SwiGlu = OptionRules.SwiGluFor(p.GetValue(weights), spec),
            };
            return await run.ExecuteAsync(Console.Out, ct);
        });
        return command;
    }

    internal static LayerMode ParseMode(string text) => text.ToUpperInvariant() switch
    {
        "NORMAL" => LayerMode.Normal,
        "LOW-LATENCY" or "LOWLATENCY" or "LL" => LayerMode.LowLatency,
        _ => throw new ArgumentException($"--mode '{text}' is not normal or low-latency"),
    };
}

/// <summary>One run of `epa2a local`.</summary>
internal sealed record LocalRun(LayerSpec Spec, int Steps, int Seed, double Drop, bool Skewed, bool Weighted, int PortBase)
{
    public const string Group = "local";

    public const string LayerName = "layer0";

    /// <summary>Gateway port = port base + this + rank; silo ports are port base + rank, so at most this many ranks.</summary>
    public const int GatewayOffset = 100;

    /// <summary>EpA2A:Telemetry settings from the command line; the process has one pipeline (one Prometheus port: the base).</summary>
    public IReadOnlyDictionary<string, string?> Telemetry { get; init; } = new Dictionary<string, string?>();

    /// <summary>The SwiGLU weights directory the silos serve experts from, or null for the built-in deterministic experts.</summary>
    public string? Weights { get; init; }

    /// <summary>Every rank's weights of <see cref="Weights"/>, for the step check's reference SwiGLU.</summary>
    public Experts.SwiGlu.SwiGluWeights[]? SwiGlu { get; init; }

    public async Task<int> ExecuteAsync(TextWriter output, CancellationToken cancellationToken)
    {
        List<IHost> silos = [];
        IPEndPoint primary = new(IPAddress.Loopback, PortBase);
        try
        {
            for (int r = 0; r < Spec.WorldSize; r++)
            {
                IHost silo = EpA2AHosts.BuildSilo(
                    new SiloSettings
                    {
                        Group = Group,
                        Rank = r,
                        SiloPort = PortBase + r,
                        GatewayPort = PortBase + GatewayOffset + r,
                        Primary = primary,
                        OwnsTelemetry = false,
                        Weights = Weights,
                        WorldSize = Spec.WorldSize,
                    },
                    Microsoft.Extensions.Logging.LogLevel.Error);
                await silo.StartAsync(cancellationToken);
                silos.Add(silo);
            }

            // Listeners are process-wide, so the client host carries the one telemetry pipeline of all these silos.
            using IHost clientHost = EpA2AHosts.BuildClient(
                ClusteringKind.Localhost,
                [.. Enumerable.Range(0, Spec.WorldSize).Select(r => PortBase + GatewayOffset + r)],
                null,
                configure: b =>
                {
                    b.Configuration.AddInMemoryCollection(Telemetry);
                    b.AddEpA2ATelemetry(instance: $"{Group}/all-ranks");
                });
            await clientHost.StartAsync(cancellationToken);
            IClusterClient client = clientHost.Services.GetRequiredService<IClusterClient>();
            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"epa2a local: {Spec.WorldSize} silos (CPU backend), {Spec.WorldSize / (Spec.LocalWorldSize ?? Spec.WorldSize)} node(s), hidden {Spec.Hidden}, top-{Spec.TopK} of {Spec.NumExperts} experts, {Spec.TokenType}{(SwiGlu is { } w ? $", SwiGLU experts (ffn {w[0].Ffn}) from {Weights}" : string.Empty)}{(Spec.Mode == LayerMode.LowLatency ? $", low-latency {Spec.LowLatencyDispatch.Format}{(Spec.LowLatencyDispatch.PowerOfTwoScales ? " (pow2 scales)" : "")}" : "")}, seed {Seed}"));
            int failures = Spec.TokenType switch
            {
                TokenType.BFloat16 => await RunStepsAsync<BFloat16>(client, output, cancellationToken),
                TokenType.Float16 => await RunStepsAsync<Half>(client, output, cancellationToken),
                _ => await RunStepsAsync<float>(client, output, cancellationToken),
            };
            await clientHost.StopAsync(cancellationToken);
            return failures == 0 ? 0 : 1;
        }
        finally
        {
            foreach (IHost silo in Enumerable.Reverse(silos))
            {
                await silo.StopAsync(CancellationToken.None);
                silo.Dispose();
            }
        }
    }

    private async Task<int> RunStepsAsync<T>(IClusterClient client, TextWriter output, CancellationToken cancellationToken)
        where T : unmanaged
    {
        ExpertLayerClient layer = new(client, Group, LayerName);
        await layer.ConfigureAsync(Spec);
        IReadOnlyList<RankInfo> placement = await layer.Coordinator.DescribeGroupAsync();
        foreach (RankInfo info in placement)
        {
            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  rank {info.Rank} on silo {info.Silo} ({info.Backend.ToName()})"));
        }

        Random rng = new(Seed);
        using PhaseMetricsCollector phases = new(LayerName);
        List<double> roundTrips = [];
        int failures = 0;
        for (int s = 0; s < Steps; s++)
        {
            (StepReport report, double worst, TimeSpan roundTrip) = await StepChecker.RunAsync<T>(layer, Spec, rng, Drop, Skewed, Weighted, cancellationToken, SwiGlu);
            bool ok = worst <= 1.0;
            failures += ok ? 0 : 1;
            int rows = report.Ranks.Sum(r => r.ReceivedRows);
            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  step {report.Step}: {rows} rows received, {(ok ? "matches the reference" : $"MISMATCH (worst {worst:0.00}x tolerance)")}, {roundTrip.TotalMilliseconds:0.0} ms"));
            roundTrips.Add(roundTrip.TotalMicroseconds);
        }

        // The table is read from the EpA2A meter's own measurements (epa2a.phase.duration, epa2a.step.duration):
        // the numbers an exporter sends to Prometheus, unbucketed. Only the client's round trip is timed here.
        PhaseTable table;
        lock (phases.Table)
        {
            table = phases.Table.Copy();
        }

        foreach (double micros in roundTrips)
        {
            table.Add("client round trip", micros);
        }

        output.WriteLine();
        output.WriteLine("Per-phase latency over all ranks and steps from the EpA2A meter (CPU backend, grain transport):");
        output.Write(table.Render());
        output.WriteLine(failures == 0 ? $"all {Steps} steps match the reference" : $"{failures} of {Steps} steps did NOT match the reference");
        return failures;
    }
}

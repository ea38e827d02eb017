using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Experts;
using EpA2A.Grains;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Silo.Hosting;
using EpA2A.Telemetry;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;

namespace EpA2A.Tools.Bench;

/// <summary>One size of the grain-path measurement: a client's step through the grains against the same step in process.</summary>
internal sealed record BenchGrainSize(int Tokens, int Hidden, double GrainStepMedianUs, double GrainStepP99Us, double InProcessStepMedianUs, double OverheadUs);

/// <summary>The grain path's cost over the in-process layer, CPU backend, World silos in this process.</summary>
internal sealed record BenchGrainOverhead(int World, List<BenchGrainSize> Sizes)
{
    private const int Steps = 20;
    private const int PortBase = 11611;

    /// <summary>
    /// Starts World silos (CPU backend, localhost clustering) and a client in this process, and times whole steps
    /// (dispatch, the built-in deterministic experts, combine on every rank) through ExpertLayerClient; then the same
    /// steps through an in-process group of layers with the same experts. The difference is what the grains add.
    /// </summary>
    public static async Task<BenchGrainOverhead> MeasureAsync(int world, TextWriter console, CancellationToken ct)
    {
        await console.WriteLineAsync($"== grain path: {world} silos in this process (CPU backend), {Steps} steps per size").ConfigureAwait(false);
        List<IHost> silos = [];
        List<BenchGrainSize> sizes = [];
        IPEndPoint primary = new(IPAddress.Loopback, PortBase);
        try
        {
            for (int r = 0; r < world; r++)
            {
                IHost silo = EpA2AHosts.BuildSilo(
                    new SiloSettings { Group = "bench", Rank = r, SiloPort = PortBase + r, GatewayPort = PortBase + 100 + r, Primary = primary, OwnsTelemetry = false },
                    Microsoft.Extensions.Logging.LogLevel.Error);
                await silo.StartAsync(ct).ConfigureAwait(false);
                silos.Add(silo);
            }

            using IHost clientHost = EpA2AHosts.BuildClient(ClusteringKind.Localhost, [.. Enumerable.Range(0, world).Select(r => PortBase + 100 + r)], null);
            await clientHost.StartAsync(ct).ConfigureAwait(false);
            IClusterClient client = clientHost.Services.GetRequiredService<IClusterClient>();
            foreach ((int tokens, int hidden) in new[] { (1, 2048), (128, 2048) })
            {
                sizes.Add(await MeasureSizeAsync(client, world, tokens, hidden, ct).ConfigureAwait(false));
            }

            await clientHost.StopAsync(ct).ConfigureAwait(false);
        }
        finally
        {
            foreach (IHost silo in Enumerable.Reverse(silos))
            {
                await silo.StopAsync(CancellationToken.None).ConfigureAwait(false);
                silo.Dispose();
            }
        }

        return new BenchGrainOverhead(world, sizes);
    }

    private static async Task<BenchGrainSize> MeasureSizeAsync(IClusterClient client, int world, int tokens, int hidden, CancellationToken ct)
    {
        const int topK = 8;
        int experts = Math.Max(world, 256 / world * world);
        LayerSpec spec = new LayerSpec { MaxTokens = tokens, Hidden = hidden, TopK = topK, NumExperts = experts, WorldSize = world, StepTimeout = TimeSpan.FromSeconds(30) }.Validated();
        Random rng = new(tokens);
        BFloat16[][] input = [.. Enumerable.Range(0, world).Select(_ => Enumerable.Range(0, tokens * hidden).Select(_ => BFloat16.FromSingle((float)rng.NextDouble())).ToArray())];
        int[][] ids = [.. Enumerable.Range(0, world).Select(_ => BenchRouting.Draw(tokens, topK, experts, null, rng))];

        ExpertLayerClient layer = new(client, "bench", $"bench-t{tokens}-h{hidden}");
        await layer.ConfigureAsync(spec).ConfigureAwait(false);
        List<double> grain = [];
        for (int s = 0; s < Steps + 3; s++)
        {
            long t0 = Stopwatch.GetTimestamp();
            await layer.StepAsync<BFloat16>([.. Enumerable.Range(0, world).Select(r => new RankStepInput<BFloat16>(input[r], tokens, ids[r]))], cancellationToken: ct).ConfigureAwait(false);
            if (s >= 3)
            {
                grain.Add(Stopwatch.GetElapsedTime(t0).TotalMicroseconds);
            }
        }

        EpConfig config = spec.ToConfig(0);
        using InProcessGroup group = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(30) });
        List<double> local = [];
        for (int s = 0; s < Steps + 3; s++)
        {
            long t0 = Stopwatch.GetTimestamp();
            await group.RunAsync(async (l, r) =>
            {
                DispatchResult<BFloat16> d = await l.DispatchAsync(Tensor.Create(input[r], [tokens, hidden]), Tensor.Create(ids[r], [tokens, topK])).ConfigureAwait(false);
                BFloat16[] rows = new BFloat16[(int)d.Output.FlattenedLength];
                d.Output.FlattenTo(rows);
                BFloat16[] expertOut = DeterministicExperts.ApplyToBlocks<BFloat16>(rows, hidden, r * config.ExpertsPerRank, d.Layout.ExpertRowStarts, d.Layout.RowsPerLocalExpert);
                return await l.CombineAsync(Tensor.Create(expertOut, [d.Layout.RecvRows, hidden]), d.Layout).ConfigureAwait(false);
            }).ConfigureAwait(false);
            if (s >= 3)
            {
                local.Add(Stopwatch.GetElapsedTime(t0).TotalMicroseconds);
            }
        }

        double g = SampleStats.Median(grain);
        double l = SampleStats.Median(local);
        await Console.Out.WriteLineAsync(string.Create(CultureInfo.InvariantCulture, $"  tokens {tokens}, hidden {hidden}: grain step {g:0} us, in-process step {l:0} us")).ConfigureAwait(false);
        return new BenchGrainSize(tokens, hidden, g, SampleStats.Percentile(grain, 0.99), l, g - l);
    }
}

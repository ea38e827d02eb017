using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Numerics.Tensors;
using System.Text.Json;
using EpA2A.Config;
using EpA2A.Grains;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Reference;
using EpA2A.Telemetry;
using OpenTelemetry;
using OpenTelemetry.Exporter;
using OpenTelemetry.Metrics;
using OpenTelemetry.Trace;

namespace EpA2A.Tools.TelemetryOverhead;

/// <summary>
/// `epa2a-tools telemetry-overhead`: the cost of telemetry on the layer's hot path. Runs the same steps (dispatch +
/// combine on every rank of an in-process CPU group) with nothing listening, and with everything on (every span
/// sampled and exported over OTLP, metrics to a Prometheus endpoint and OTLP), alternating in rounds; prints a
/// table and writes JSON.
/// </summary>
internal static class TelemetryOverheadCommand
{
    public static Command Create()
    {
        Option<int> steps = new("--steps") { Description = "Steps per round and mode", DefaultValueFactory = _ => 100 };
        Option<int> rounds = new("--rounds") { Description = "Rounds (each runs both modes)", DefaultValueFactory = _ => 5 };
        Option<int> ranks = new("--ranks") { Description = "Ranks in the in-process group", DefaultValueFactory = _ => 4 };
        Option<int> hidden = new("--hidden") { Description = "Elements per token", DefaultValueFactory = _ => 1024 };
        Option<int> tokens = new("--max-tokens") { Description = "Tokens per rank per step", DefaultValueFactory = _ => 128 };
        Option<string> output = new("--out") { Description = "JSON results file", DefaultValueFactory = _ => "benchmarks/results/telemetry-overhead.json" };
        Command command = new("telemetry-overhead", "Measure the per-step cost of telemetry (all off vs all on) on an in-process CPU group.")
        {
            steps, rounds, ranks, hidden, tokens, output,
        };
        command.SetAction(async (p, ct) =>
        {
            EpConfig config = new(maxTokens: p.GetValue(tokens), hidden: p.GetValue(hidden), topK: 8, numExperts: 16 * p.GetValue(ranks), rank: 0, worldSize: p.GetValue(ranks), localWorldSize: p.GetValue(ranks));
            return await RunAsync(config, p.GetValue(steps), p.GetValue(rounds), p.GetValue(output)!, Console.Out, ct);
        });
        return command;
    }

    private static async Task<int> RunAsync(EpConfig config, int steps, int rounds, string outputFile, TextWriter output, CancellationToken ct)
    {
        using InProcessGroup group = new(config, new EpLayerOptions { LayerName = "overhead" });
        Random rng = new(7);
        RankInput<BFloat16>[] inputs = RoutingGenerator.Draw<BFloat16>(config, [.. Enumerable.Repeat(config.MaxTokens, config.WorldSize)], 0.05, false, false, rng);
        int prometheusPort = FreePort();
        await StepsAsync(group, config, inputs, 20, ct); // warm-up

        List<double> off = [];
        List<double> on = [];
        for (int r = 0; r < rounds; r++)
        {
            off.AddRange(await StepsAsync(group, config, inputs, steps, ct));
            using (TracerProvider tracing = Sdk.CreateTracerProviderBuilder().AddSource(EpTelemetry.Name).SetSampler(new AlwaysOnSampler()).AddOtlpExporter(Otlp).Build())
            using (MeterProvider metrics = Sdk.CreateMeterProviderBuilder().AddMeter(EpTelemetry.Name).AddPrometheusHttpListener(o => o.Port = prometheusPort).AddOtlpExporter(Otlp).Build())
            {
                on.AddRange(await StepsAsync(group, config, inputs, steps, ct));
            }
        }

        double offMedian = SampleStats.Median(off);
        double onMedian = SampleStats.Median(on);
        double overhead = (onMedian / offMedian) - 1;
        output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"telemetry overhead: {config.WorldSize} ranks in process (CPU backend), {config.MaxTokens} tokens x {config.Hidden} bf16 per rank, top-{config.TopK} of {config.NumExperts}; {rounds} rounds x {steps} steps per mode"));
        output.WriteLine("| telemetry | steps | p50 µs/step | mean µs/step | p95 µs/step |");
        output.WriteLine("|-----------|-------|-------------|--------------|-------------|");
        output.WriteLine(Row("all off", off));
        output.WriteLine(Row("all on", on));
        output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"overhead (median step, on vs off): {overhead * 100:+0.0;-0.0} % ({onMedian - offMedian:+0.0;-0.0} µs per step of {8 * config.WorldSize} phases)"));

        string? folder = Path.GetDirectoryName(Path.GetFullPath(outputFile));
        if (folder is not null)
        {
            Directory.CreateDirectory(folder);
        }

        await File.WriteAllTextAsync(
            outputFile,
            JsonSerializer.Serialize(
                new
                {
                    benchmark = "telemetry-overhead",
                    backend = EpBackendKind.Cpu.ToName(),
                    ranks = config.WorldSize,
                    tokensPerRank = config.MaxTokens,
                    hidden = config.Hidden,
                    topK = config.TopK,
                    experts = config.NumExperts,
                    stepsPerMode = off.Count,
                    off = Summary(off),
                    on = Summary(on),
                    overheadMedian = overhead,
                    on_means = "every span sampled and exported over OTLP (batch, to an unanswered endpoint), metrics on a Prometheus endpoint and OTLP",
                    machine = $"{Environment.ProcessorCount} cores, {System.Runtime.InteropServices.RuntimeInformation.OSDescription}",
                },
                JsonOptions),
            ct);
        output.WriteLine($"wrote {outputFile}");
        return 0;
    }

    private static readonly JsonSerializerOptions JsonOptions = new() { WriteIndented = true };

    private static void Otlp(OtlpExporterOptions o) => o.Endpoint = new Uri(string.Create(CultureInfo.InvariantCulture, $"http://127.0.0.1:{FreePort()}"));

    private static async Task<List<double>> StepsAsync(InProcessGroup group, EpConfig config, RankInput<BFloat16>[] inputs, int steps, CancellationToken ct)
    {
        List<double> micros = [];
        for (int s = 0; s < steps; s++)
        {
            long start = Stopwatch.GetTimestamp();
            DispatchResult<BFloat16>[] dispatched = await group.RunAsync((l, r) => l.DispatchAsync(
                Tensor.Create(inputs[r].Tokens, [inputs[r].Count, config.Hidden]),
                Tensor.Create(inputs[r].ExpertIds, [inputs[r].Count, config.TopK]),
                cancellationToken: ct));
            await group.RunAsync((l, r) => l.CombineAsync(dispatched[r].Output, dispatched[r].Layout, cancellationToken: ct));
            micros.Add(Stopwatch.GetElapsedTime(start).TotalMicroseconds);
        }

        return micros;
    }

    private static string Row(string name, List<double> values) =>
        string.Create(CultureInfo.InvariantCulture, $"| {name,-9} | {values.Count,5} | {SampleStats.Median(values),11:0.0} | {values.Average(),12:0.0} | {SampleStats.Percentile(values, 0.95),11:0.0} |");

    private static object Summary(List<double> values) => new { p50Micros = SampleStats.Median(values), meanMicros = values.Average(), p95Micros = SampleStats.Percentile(values, 0.95) };

    private static int FreePort()
    {
        using System.Net.Sockets.TcpListener l = new(System.Net.IPAddress.Loopback, 0);
        l.Start();
        return ((System.Net.IPEndPoint)l.LocalEndpoint).Port;
    }
}

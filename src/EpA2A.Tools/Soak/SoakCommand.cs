using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Experts;
using EpA2A.Grains;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Reference;
using EpA2A.Silo.Commands;
using EpA2A.Silo.Hosting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;

namespace EpA2A.Tools.Soak;

/// <summary>
/// `epa2a-tools soak`: many steps with random shapes (token counts, drops, skew, weights, three layer configurations:
/// bf16/fp16/fp32, intra- and inter-node, local combine, alignment) through the grains of four silos in this
/// process and through an in-process group, each step checked against the reference; managed memory, handles and
/// threads sampled after a full GC and compared between the first and the last tenth of the run.
/// </summary>
internal static class SoakCommand
{
    public static Command Create()
    {
        Option<int> steps = new("--steps") { Description = "Steps per path", DefaultValueFactory = _ => 10_000 };
        Option<string> path = new("--path") { Description = "grains, layer or both", DefaultValueFactory = _ => "both" };
        Option<int> seed = new("--seed") { Description = "Seed of the random shapes", DefaultValueFactory = _ => 1 };
        Option<int> portBase = new("--port-base") { Description = "First silo port; gateways start 100 above", DefaultValueFactory = _ => 11311 };
        Option<int> killEvery = new("--kill-every") { Description = "--path processes: SIGKILL a rank's silo every this many steps (and start it again)", DefaultValueFactory = _ => 1000 };
        Option<string?> json = new("--json") { Description = "--path processes: write the results to this JSON file" };

        Command command = new("soak", "Run many random checked steps (grains of 4 silos, in-process group; or 4 silo processes on Redis with masking and a kill every N steps) and report whether memory, handles and threads stay flat.")
        {
            steps, path, seed, portBase, killEvery, json,
        };
        command.SetAction(async (p, ct) =>
        {
            int n = p.GetValue(steps);
            string which = p.GetValue(path)!;
            if (n < 20)
            {
                throw new ArgumentException($"--steps {n}: at least 20, so that the first and last tenths hold samples");
            }

            if (which is not ("grains" or "layer" or "both" or "processes"))
            {
                throw new ArgumentException($"--path '{which}' is not grains, layer, both or processes");
            }

            if (which == "processes")
            {
                int every = p.GetValue(killEvery);
                if (every < 10 || every > n)
                {
                    throw new ArgumentException($"--kill-every {every}: in [10, --steps]");
                }

                bool passed = await new ProcessSoak(n, every, p.GetValue(seed), p.GetValue(portBase), p.GetValue(json)).RunAsync(Console.Out, ct);
                Console.WriteLine(passed ? "soak: PASS" : "soak: FAIL");
                return passed ? 0 : 1;
            }

            SoakRun run = new(n, p.GetValue(seed), p.GetValue(portBase));
            bool ok = true;
            if (which is "grains" or "both")
            {
                ok &= await run.GrainsAsync(Console.Out, ct);
            }

            if (which is "layer" or "both")
            {
                ok &= await run.LayerAsync(Console.Out, ct);
            }

            Console.WriteLine(ok ? "soak: PASS" : "soak: FAIL");
            return ok ? 0 : 1;
        });
        return command;
    }
}

/// <summary>One soak: the layer configurations, the random shapes, the resource samples.</summary>
internal sealed class SoakRun(int steps, int seed, int portBase)
{
    public const string Group = "soak";
    public const int World = 4;

    /// <summary>Three layers that differ in every dimension the data plane cares about.</summary>
    public static readonly LayerSpec[] Layers =
    [
        new() { MaxTokens = 64, Hidden = 64, TopK = 4, NumExperts = 16, WorldSize = World, TokenType = TokenType.BFloat16 },
        new() { MaxTokens = 48, Hidden = 96, TopK = 2, NumExperts = 8, WorldSize = World, LocalWorldSize = 2, TokenType = TokenType.Float16, ExpertAlignment = 8 },
        new() { MaxTokens = 32, Hidden = 40, TopK = 6, NumExperts = 32, WorldSize = World, TokenType = TokenType.Float32, EnableLocalCombine = true },
    ];

    /// <summary>Through the grains: four silos in this process (localhost clustering) and a cluster client.</summary>
    public async Task<bool> GrainsAsync(TextWriter output, CancellationToken cancellationToken)
    {
        List<IHost> silos = [];
        try
        {
            for (int r = 0; r < World; r++)
            {
                IHost silo = EpA2AHosts.BuildSilo(
                    new SiloSettings
                    {
                        Group = Group,
                        Rank = r,
                        SiloPort = portBase + r,
                        GatewayPort = portBase + 100 + r,
                        Primary = new IPEndPoint(IPAddress.Loopback, portBase),
                        OwnsTelemetry = false,
                    },
                    Microsoft.Extensions.Logging.LogLevel.Error);
                await silo.StartAsync(cancellationToken);
                silos.Add(silo);
            }

            using IHost clientHost = EpA2AHosts.BuildClient(ClusteringKind.Localhost, [.. Enumerable.Range(0, World).Select(r => portBase + 100 + r)], null);
            await clientHost.StartAsync(cancellationToken);
            IClusterClient client = clientHost.Services.GetRequiredService<IClusterClient>();
            ExpertLayerClient[] layers = [.. Layers.Select((_, i) => new ExpertLayerClient(client, Group, $"soak{i}"))];
            for (int i = 0; i < layers.Length; i++)
            {
                await layers[i].ConfigureAsync(Layers[i]);
            }

            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"epa2a-tools soak: {steps} steps through the grains of {World} silos in this process, {Layers.Length} layers, seed {seed}"));
            bool ok = await RunAsync(output, async (rng, s) =>
            {
                int l = rng.Next(Layers.Length);
                LayerSpec spec = Layers[l];
                double drop = rng.NextDouble() * 0.5;
                bool skewed = rng.Next(2) == 0;
                bool weighted = rng.Next(2) == 0;
                (StepReport _, double worst, TimeSpan _) = spec.TokenType switch
                {
                    TokenType.BFloat16 => await StepChecker.RunAsync<BFloat16>(layers[l], spec, rng, drop, skewed, weighted, cancellationToken),
                    TokenType.Float16 => await StepChecker.RunAsync<Half>(layers[l], spec, rng, drop, skewed, weighted, cancellationToken),
                    _ => await StepChecker.RunAsync<float>(layers[l], spec, rng, drop, skewed, weighted, cancellationToken),
                };
                return worst <= 1.0 ? null : string.Create(CultureInfo.InvariantCulture, $"layer soak{l}: {worst:0.00}x the tolerance off the reference");
            });
            await clientHost.StopAsync(cancellationToken);
            return ok;
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

    /// <summary>In process: one <see cref="InProcessGroup"/> per layer configuration (the model runner's path).</summary>
    public async Task<bool> LayerAsync(TextWriter output, CancellationToken cancellationToken)
    {
        EpLayerOptions options = new() { StepTimeout = TimeSpan.FromSeconds(30) };
        InProcessGroup[] groups = [.. Layers.Select(spec => new InProcessGroup(spec.ToConfig(0), options))];
        try
        {
            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"epa2a-tools soak: {steps} steps through in-process groups of {World} ranks, {Layers.Length} layers, seed {seed}"));
            return await RunAsync(output, async (rng, s) =>
            {
                int l = rng.Next(Layers.Length);
                EpConfig config = Layers[l].ToConfig(0);
                return config.TokenType switch
                {
                    TokenType.BFloat16 => await LayerStepAsync<BFloat16>(groups[l], config, rng, cancellationToken),
                    TokenType.Float16 => await LayerStepAsync<Half>(groups[l], config, rng, cancellationToken),
                    _ => await LayerStepAsync<float>(groups[l], config, rng, cancellationToken),
                };
            });
        }
        finally
        {
            foreach (InProcessGroup group in groups)
            {
                group.Dispose();
            }
        }
    }

    /// <summary>One random step on every rank of a group: dispatch, the built-in experts, combine, against the reference.</summary>
    private static async Task<string?> LayerStepAsync<T>(InProcessGroup group, EpConfig config, Random rng, CancellationToken cancellationToken)
        where T : unmanaged
    {
        int[] counts = [.. Enumerable.Range(0, config.WorldSize).Select(_ => rng.Next(0, config.MaxTokens + 1))];
        bool weighted = rng.Next(2) == 0;
        RankInput<T>[] inputs = RoutingGenerator.Draw<T>(config, counts, rng.NextDouble() * 0.5, rng.Next(2) == 0, weighted, rng);
        ReferenceStep<T> reference = ReferenceAllToAll.Dispatch(config, inputs);
        if (config.ExpertAlignment == 1 && rng.Next(4) == 0)
        {
            // Scatter indices that fix every row where the plain order puts it: the scatter path, checkable as is.
            inputs = [.. inputs.Select((x, r) => x with { ScatterIndices = [.. reference.GlobalScatterIndices[r].Select(g => Math.Max(g, 0))] })];
        }

        DeterministicExpertCompute experts = new();
        Tensor<T>[] combined = await group.RunAsync(async (layer, r) =>
        {
            RankInput<T> input = inputs[r];
            DispatchResult<T> d = await layer.DispatchAsync(
                Tensor.Create(input.Tokens, [input.Count, config.Hidden]),
                Tensor.Create(input.ExpertIds, [input.Count, config.TopK]),
                input.Weights is { } w ? Tensor.Create(w, [input.Count, config.TopK]) : null,
                input.ScatterIndices is { } si ? Tensor.Create(si, [input.Count, config.TopK]) : null,
                cancellationToken);
            Tensor<T> rows = await experts.ComputeAsync("soak", layer.Config, d, cancellationToken);
            return await layer.CombineAsync(rows, d.Layout, new CombineOptions(weighted), cancellationToken);
        });

        T[][] expertOutputs = [.. reference.PerRank.Select((d, r) =>
            DeterministicExperts.ApplyToBlocks<T>(d.Output, config.Hidden, r * config.ExpertsPerRank, d.ExpertRowStarts, d.RowsPerLocalExpert))];
        T[][] expected = ReferenceAllToAll.Combine(config, inputs, reference, expertOutputs, weighted);
        float relative = config.TokenType switch { TokenType.BFloat16 => 1f / 128f, TokenType.Float16 => 1f / 1024f, _ => 1e-6f };
        for (int r = 0; r < config.WorldSize; r++)
        {
            T[] got = new T[(int)combined[r].FlattenedLength];
            combined[r].FlattenTo(got);
            if (got.Length != expected[r].Length)
            {
                return $"rank {r}: {got.Length} combined elements, the reference {expected[r].Length}";
            }

            for (int i = 0; i < got.Length; i++)
            {
                float want = TokenConvert.ToSingle(expected[r][i]);
                float have = TokenConvert.ToSingle(got[i]);
                if (!(Math.Abs(want - have) <= (Math.Abs(want) * relative) + 1e-3f))
                {
                    return string.Create(CultureInfo.InvariantCulture, $"{config.TokenType} rank {r} element {i}: {have}, the reference {want}");
                }
            }
        }

        return null;
    }

    /// <summary>Runs the steps, sampling resources 50 times; prints progress, the samples' windows and the verdict.</summary>
    private async Task<bool> RunAsync(TextWriter output, Func<Random, int, Task<string?>> step)
    {
        Random rng = new(seed);
        int every = Math.Max(1, steps / 50);
        List<ResourceSample> samples = [ResourceSample.Take(0)];
        Stopwatch clock = Stopwatch.StartNew();
        int failures = 0;
        for (int s = 1; s <= steps; s++)
        {
            string? problem;
            try
            {
                problem = await step(rng, s);
            }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                problem = $"{e.GetType().Name}: {e.Message}";
            }

            if (problem is not null)
            {
                failures++;
                output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  step {s} FAILED (seed {seed}): {problem}"));
            }

            if (s % every == 0)
            {
                samples.Add(ResourceSample.Take(s));
            }

            if (s % Math.Max(1, steps / 10) == 0)
            {
                output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  {s} steps, {failures} failed, {clock.Elapsed.TotalSeconds:0.0} s"));
                output.Flush();
            }
        }

        bool flat = ResourceSample.Report(samples, steps, output);
        output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  {steps} steps in {clock.Elapsed.TotalSeconds:0.0} s ({clock.Elapsed.TotalMilliseconds / steps:0.00} ms/step), {failures} failed; resources {(flat ? "flat" : "GROWING")}"));
        return failures == 0 && flat;
    }
}

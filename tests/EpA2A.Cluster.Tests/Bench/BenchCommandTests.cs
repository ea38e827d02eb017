using System.Text.Json;
using EpA2A.Cluster.Tests.MultiProcess;
using EpA2A.Tools.Bench;

namespace EpA2A.Cluster.Tests.Bench;

/// <summary>
/// `epa2a-tools bench` on the CPU backend, in process: a small sweep writes its JSON, markdown and PNG with every point
/// timed and checked; an option the bench cannot run is an ArgumentException before anything is drawn or written.
/// </summary>
public sealed class BenchCommandTests : IDisposable
{
    private const int World = 4;
    private const int TopK = 4;

    private static readonly byte[] PngSignature = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A];
    private static readonly int[] Tokens = [1, 16];
    private static readonly string[] Layouts = ["intra", "inter"];
    private static readonly string[] Routings = ["uniform", "skewed"];

    private readonly string directory = Directory.CreateTempSubdirectory("epa2a-bench-test-").FullName;

    public static TheoryData<string> InvalidRuns() => [.. Invalid.Keys];

    /// <summary>Runs the bench must refuse, each with a word its message must contain.</summary>
    private static Dictionary<string, (Func<string, BenchRun> Make, string Names)> Invalid { get; } = new()
    {
        ["routing zipf"] = (o => Run(o, routing: ["uniform", "zipf"]), "--routing"),
        ["layout ring"] = (o => Run(o, layouts: ["ring"]), "--layouts"),
        ["hidden 63"] = (o => Run(o, hidden: [64, 63]), "hidden a multiple of 8"),
        ["backend tpu"] = (o => Run(o, backend: "tpu"), "--backend tpu"),
        ["no tokens"] = (o => Run(o, tokens: []), "tokens >= 1"),
        ["tokens 0"] = (o => Run(o, tokens: [0, 16]), "tokens >= 1"),
        ["experts not a multiple of the ranks"] = (o => Run(o, experts: 18), "experts a multiple of --ranks"),
        ["top-17 of 16 experts"] = (o => Run(o, topK: 17), "--topk"),
        ["top-0"] = (o => Run(o, topK: 0), "--topk"),
        ["local 0"] = (o => Run(o, local: 0), "--local"),
        ["ranks not a multiple of local"] = (o => Run(o, local: 3), "a multiple of --local"),
    };

    [Fact]
    public async Task A_cpu_sweep_writes_json_markdown_and_png_with_every_point_timed()
    {
        int seed = Random.Shared.Next();
        string output = Path.Combine(directory, "results");
        using StringWriter console = new();

        int exit = await Run(output, seed: seed).ExecuteAsync(console, TestContext.Current.CancellationToken);

        string log = $"seed {seed}, console:\n{console}";
        Assert.True(exit == 0, $"exit code {exit}; {log}");
        string json = Assert.Single(Directory.GetFiles(output, "bench-cpu-*.json"));
        string stem = Path.Combine(output, Path.GetFileNameWithoutExtension(json));
        Assert.True(File.Exists($"{stem}.md") && File.Exists($"{stem}.png"), $"{string.Join(", ", Directory.GetFiles(output))}; {log}");

        using JsonDocument summary = JsonDocument.Parse(await File.ReadAllTextAsync(json, TestContext.Current.CancellationToken));
        JsonElement[] points = [.. summary.RootElement.GetProperty("Points").EnumerateArray()];
        string[] expected = [.. from layout in Layouts from routing in Routings from tokens in Tokens select $"{layout}-{routing}-h64-t{tokens}"];
        Assert.Equal(expected.Order(), points.Select(p => p.GetProperty("Name").GetString()!).Order());
        foreach (JsonElement p in points)
        {
            string where = $"seed {seed}, point {p}";
            Assert.False(p.TryGetProperty("Cuda", out _), where);
            JsonElement cpu = p.GetProperty("Cpu");
            Assert.False(cpu.TryGetProperty("Error", out _), where);
            Assert.False(cpu.TryGetProperty("Skipped", out _), where);
            foreach (string phase in new[] { "Dispatch", "Combine" })
            {
                JsonElement stat = cpu.GetProperty(phase);
                Assert.True(stat.GetProperty("Samples").GetInt32() == 2 && stat.GetProperty("Median").GetDouble() > 0, $"{where}: {phase} {stat}");
            }

            // One row per routed entry, over all ranks of the single routing set.
            Assert.True(p.GetProperty("RecvRows").GetDouble() == World * p.GetProperty("Tokens").GetInt32() * TopK, where);
            string layout = p.GetProperty("Name").GetString()!.Split('-')[0];
            Assert.True(p.GetProperty("Layout").GetString() == layout && p.GetProperty("Local").GetInt32() == (layout == "intra" ? World : 2), where);
        }

        string markdown = await File.ReadAllTextAsync($"{stem}.md", TestContext.Current.CancellationToken);
        Assert.Contains("| point | dispatch µs med / p99 | combine µs med / p99 | samples |", markdown, StringComparison.Ordinal);
        Assert.All(expected, name => Assert.Contains($"| {name} | ", markdown, StringComparison.Ordinal));
        Assert.Contains(markdown, console.ToString(), StringComparison.Ordinal);
        byte[] png = await File.ReadAllBytesAsync($"{stem}.png", TestContext.Current.CancellationToken);
        Assert.Equal(PngSignature, png[..PngSignature.Length]);
    }

    /// <summary>
    /// Two `epa2a-tools bench` processes with one seed draw the same routing: every point's busiest rank receives the
    /// same rows (a fresh draw differs at one point or another: about 1000 rows each, spread over tens of rows).
    /// </summary>
    [Fact]
    public async Task The_same_seed_draws_the_same_routing_in_another_process()
    {
        int seed = Random.Shared.Next();
        string[] arguments = ["bench", "--backend", "cpu", "--ranks", "4", "--local", "2", "--topk", "4", "--experts", "16", "--tokens", "64,256", "--hidden", "64", "--layouts", "intra", "--sets", "2", "--iterations", "1", "--warmup", "0", "--peer", "none", "--no-grains", "--seed", $"{seed}"];
        using ChildProcess first = ChildProcess.Epa2aTools("bench 1", [.. arguments, "--out", Path.Combine(directory, "1")]);
        using ChildProcess second = ChildProcess.Epa2aTools("bench 2", [.. arguments, "--out", Path.Combine(directory, "2")]);
        int[] exits = await Task.WhenAll(first.WaitForExitAsync(TimeSpan.FromMinutes(1)), second.WaitForExitAsync(TimeSpan.FromMinutes(1)));
        Assert.True(exits.All(e => e == 0), $"seed {seed}: exit codes {string.Join(", ", exits)}:\n{string.Join('\n', first.Lines)}\n{string.Join('\n', second.Lines)}");

        string[] rows = await Task.WhenAll(BusiestRanksAsync("1"), BusiestRanksAsync("2"));

        Assert.True(rows[0] == rows[1], $"seed {seed}: busiest ranks' rows {rows[0]} in one run, {rows[1]} in the other");

        async Task<string> BusiestRanksAsync(string run)
        {
            string json = Assert.Single(Directory.GetFiles(Path.Combine(directory, run), "bench-cpu-*.json"));
            using JsonDocument summary = JsonDocument.Parse(await File.ReadAllTextAsync(json, TestContext.Current.CancellationToken));
            return string.Join(", ", summary.RootElement.GetProperty("Points").EnumerateArray().Select(p => $"{p.GetProperty("Name").GetString()}: {p.GetProperty("MaxRankRecvRows").GetInt32()}"));
        }
    }

    [Theory]
    [MemberData(nameof(InvalidRuns))]
    public async Task An_option_the_bench_cannot_run_is_an_ArgumentException_before_anything_runs(string name)
    {
        (Func<string, BenchRun> make, string names) = Invalid[name];
        string output = Path.Combine(directory, "results");
        using StringWriter console = new();

        // Run synchronously under a deadline: an option that slipped through could draw routing forever.
        Task<int> run = Task.Run(() => make(output).ExecuteAsync(console, TestContext.Current.CancellationToken), TestContext.Current.CancellationToken);
        Exception? thrown = await Record.ExceptionAsync(() => run.WaitAsync(TimeSpan.FromSeconds(20), TestContext.Current.CancellationToken));

        if (thrown is null || thrown.GetType() != typeof(ArgumentException))
        {
            Assert.Fail($"{name}: {thrown?.ToString() ?? "no exception"}");
        }

        Assert.Contains(names, thrown.Message, StringComparison.Ordinal);
        Assert.Equal(string.Empty, console.ToString());
        Assert.False(Directory.Exists(output), $"{name}: {output} was created");
    }

    public void Dispose() => Directory.Delete(directory, recursive: true);

    private static BenchRun Run(
        string output,
        string backend = "cpu",
        int[]? tokens = null,
        int[]? hidden = null,
        string[]? layouts = null,
        string[]? routing = null,
        int experts = 16,
        int topK = TopK,
        int local = 2,
        int seed = 42) => new()
        {
            Backend = backend,
            Tokens = tokens ?? Tokens,
            Hidden = hidden ?? [64],
            Layouts = layouts ?? Layouts,
            Routing = routing ?? Routings,
            World = World,
            Local = local,
            TopK = topK,
            Experts = experts,
            Sets = 1,
            Iterations = 2,
            Warmup = 1,
            Seed = seed,
            Grains = false,
            Peer = "none",
            Out = output,
        };
}

using System.Diagnostics;
using System.Globalization;
using System.Net.Http.Headers;
using EpA2A.Cluster.Tests.MultiProcess;
using EpA2A.Grains;
using EpA2A.Numerics;
using EpA2A.Silo.Hosting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;

namespace EpA2A.Cluster.Tests.Telemetry;

/// <summary>
/// The dashboards checked for real: `epa2a silo` processes, each with its own Prometheus endpoint (base + rank), run
/// good, hot-expert and bad steps; a real `prometheus` scrapes them; every dashboard query must parse and return
/// series, and `promtool check metrics` must accept each silo's exposition.
/// </summary>
[Collection(ProcessCluster.Collection)]
public sealed class PrometheusDashboardTests
{
    private const int World = 2;
    private const string Group = "prom";

    private static readonly LayerSpec Spec = new()
    {
        MaxTokens = 64,
        Hidden = 64,
        TopK = 4,
        NumExperts = 8,
        WorldSize = World,
        StepTimeout = TimeSpan.FromSeconds(10),
    };

    [Fact]
    public async Task Every_dashboard_query_returns_series_from_a_real_prometheus_scraping_real_silos()
    {
        string? prometheus = FindOnPath("prometheus");
        string? promtool = FindOnPath("promtool");
        Assert.SkipWhen(prometheus is null || promtool is null, "prometheus/promtool are not installed (.ci/run installs Debian's prometheus)");
        CancellationToken ct = TestContext.Current.CancellationToken;
        int portBase = 30000 + (Random.Shared.Next(0, 40) * 200);
        int metricsBase = FreePortPair();
        string clusterId = "prom-" + Guid.NewGuid().ToString("N")[..8];
        int[] metricsPorts = [.. Enumerable.Range(0, World).Select(r => metricsBase + r)];

        List<ChildProcess> silos = [];
        try
        {
            for (int r = 0; r < World; r++)
            {
                silos.Add(ChildProcess.Epa2a(
                    $"silo{r}", "silo", "--rank", Text(r), "--world-size", Text(World), "--group", Group, "--cluster-id", clusterId,
                    "--port-base", Text(portBase), "--prometheus-port-base", Text(metricsBase)));
            }

            using PrometheusServer server = await PrometheusServer.StartAsync(prometheus!, metricsPorts, TimeSpan.FromSeconds(30));
            foreach (ChildProcess silo in silos)
            {
                await silo.WaitForLineAsync(l => l.StartsWith("epa2a silo: rank", StringComparison.Ordinal), TimeSpan.FromSeconds(60));
            }

            await RunStepsAsync(portBase, clusterId, ct);
            await CheckExpositionsAsync(promtool!, metricsPorts, ct);

            List<(string Where, string Query)> queries = [.. DashboardQueries.Files().SelectMany(DashboardQueries.Read)];
            Assert.True(queries.Count >= 20, $"only {queries.Count} queries found in {string.Join(", ", DashboardQueries.Files())}");
            List<string> failures = await EvaluateUntilAllHaveSeriesAsync(server, queries, TimeSpan.FromSeconds(60));
            Assert.True(failures.Count == 0, $"{failures.Count} of {queries.Count} dashboard queries failed:\n{string.Join('\n', failures)}\nprometheus log:\n{string.Join('\n', server.Log.TakeLast(10))}");
            TestContext.Current.TestOutputHelper?.WriteLine($"{queries.Count} dashboard queries returned series from prometheus scraping {World} silos");
        }
        finally
        {
            foreach (ChildProcess silo in silos)
            {
                silo.Dispose();
            }
        }
    }

    /// <summary>Checked steps, a step whose experts all live on rank 0 (its output grows), and a step rank 1 rejects (NaN weight), and a step whose scatter indices every rank rejects after the counts exchange (an aborted operation on each).</summary>
    private static async Task RunStepsAsync(int portBase, string clusterId, CancellationToken ct)
    {
        using IHost clientHost = EpA2AHosts.BuildClient(ClusteringKind.Localhost, [.. Enumerable.Range(0, World).Select(r => portBase + 100 + r)], null, clusterId);
        await clientHost.StartAsync(ct);
        ExpertLayerClient client = new(clientHost.Services.GetRequiredService<IClusterClient>(), Group, "dash");
        await client.ConfigureAsync(Spec);
        int seed = Environment.TickCount;
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed);
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1, weighted: true, skewed: true);

        int n = Spec.MaxTokens;
        RankStepInput<BFloat16>[] hot = [.. Enumerable.Range(0, World).Select(r => new RankStepInput<BFloat16>(
            [.. Enumerable.Range(0, n * Spec.Hidden).Select(i => (BFloat16)((i % 7) + r))],
            n,
            [.. Enumerable.Range(0, n * Spec.TopK).Select(i => i % Spec.TopK)]))];
        StepOutcome<BFloat16> grown = await client.StepAsync(hot, cancellationToken: ct);
        Assert.Equal(n * Spec.TopK * World, grown.Report.Ranks.Single(r => r.Rank == 0).ReceivedRows);

        // A NaN weight: rank 1 rejects its input (a rejected input) before its operation begins.
        RankStepInput<BFloat16>[] nan = [.. Enumerable.Range(0, World).Select(r => new RankStepInput<BFloat16>(
            [.. Enumerable.Range(0, 2 * Spec.Hidden).Select(i => (BFloat16)((i % 5) + 1))], 2, [0, 1, 4, 5, 2, 3, 6, 7], [.. Enumerable.Repeat(r == 1 ? float.NaN : 0.25f, 2 * Spec.TopK)]))];
        Exception rejected = await Assert.ThrowsAnyAsync<Exception>(() => client.StepAsync(nan, weighted: true, cancellationToken: ct));
        Assert.Contains("not finite", rejected.Message, StringComparison.Ordinal);

        // Scatter indices far past every rank's rows pass each rank's local checks and fail after the counts
        // exchange, inside the operation on every rank: each rank counts an aborted operation, whatever the timing.
        RankStepInput<BFloat16>[] bad = [.. Enumerable.Range(0, World).Select(r => new RankStepInput<BFloat16>(
            [.. Enumerable.Range(0, 2 * Spec.Hidden).Select(i => (BFloat16)((i % 5) + 1))], 2, [0, 1, 4, 5, 2, 3, 6, 7], null,
            [.. Enumerable.Range(0, 2 * Spec.TopK).Select(i => 1_000_000 + (r * 100) + i)]))];
        Exception e = await Assert.ThrowsAnyAsync<Exception>(() => client.StepAsync(bad, cancellationToken: ct));
        Assert.Contains("scatterIndices", e.Message, StringComparison.Ordinal);
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 2);
        await clientHost.StopAsync(ct);
    }

    /// <summary>promtool check metrics on each silo's text exposition, fetched with HttpClient and piped in.</summary>
    private static async Task CheckExpositionsAsync(string promtool, int[] ports, CancellationToken ct)
    {
        using HttpClient http = new() { Timeout = TimeSpan.FromSeconds(10) };
        foreach (int port in ports)
        {
            using HttpRequestMessage request = new(HttpMethod.Get, new Uri(string.Create(CultureInfo.InvariantCulture, $"http://localhost:{port}/metrics")));
            request.Headers.Accept.Add(new MediaTypeWithQualityHeaderValue("text/plain"));
            using HttpResponseMessage response = await http.SendAsync(request, ct);
            response.EnsureSuccessStatusCode();
            string exposition = await response.Content.ReadAsStringAsync(ct);
            Assert.Contains("epa2a_phase_duration_seconds_bucket", exposition, StringComparison.Ordinal);
            Assert.Contains("le=\"1E-06\"", exposition, StringComparison.OrdinalIgnoreCase);
            Assert.Contains("le=\"10\"", exposition, StringComparison.Ordinal);

            ProcessStartInfo start = new(promtool, ["check", "metrics"])
            {
                RedirectStandardInput = true,
                RedirectStandardOutput = true,
                RedirectStandardError = true,
            };
            using Process check = Process.Start(start)!;
            Task<string> stdout = check.StandardOutput.ReadToEndAsync(ct);
            Task<string> stderr = check.StandardError.ReadToEndAsync(ct);
            await check.StandardInput.WriteAsync(exposition.AsMemory(), ct);
            check.StandardInput.Close();
            using CancellationTokenSource bound = CancellationTokenSource.CreateLinkedTokenSource(ct);
            bound.CancelAfter(TimeSpan.FromSeconds(30));
            await check.WaitForExitAsync(bound.Token);
            string said = (await stdout) + (await stderr);
            Assert.True(check.ExitCode == 0, $"promtool check metrics on port {port} exited {check.ExitCode}:\n{said}");
        }
    }

    /// <summary>
    /// Evaluates every query until each that parses returns at least one series (rates need two scrapes after the
    /// steps), or the bound passes; then lists the queries that failed to parse or returned nothing.
    /// </summary>
    private static async Task<List<string>> EvaluateUntilAllHaveSeriesAsync(PrometheusServer server, List<(string Where, string Query)> queries, TimeSpan within)
    {
        DateTime giveUp = DateTime.UtcNow + within;
        while (true)
        {
            List<string> errors = [];
            List<string> empty = [];
            foreach ((string where, string query) in queries)
            {
                (string? error, int series) = await server.QueryAsync(query);
                if (error is not null)
                {
                    errors.Add($"ERROR  {where}: {query}\n       {error}");
                }
                else if (series == 0)
                {
                    empty.Add($"EMPTY  {where}: {query}");
                }
            }

            if (empty.Count == 0 || DateTime.UtcNow > giveUp)
            {
                return [.. errors, .. empty];
            }

            await Task.Delay(1000);
        }
    }

    /// <summary>Two consecutive loopback ports that are free now (the Prometheus endpoints of ranks 0 and 1).</summary>
    private static int FreePortPair()
    {
        for (int attempt = 0; attempt < 50; attempt++)
        {
            int port = ChildProcess.FreePort();
            if (port < 65535 && IsFree(port + 1))
            {
                return port;
            }
        }

        throw new InvalidOperationException("no two consecutive free ports on loopback");
    }

    private static bool IsFree(int port)
    {
        try
        {
            using System.Net.Sockets.TcpListener l = new(System.Net.IPAddress.Loopback, port);
            l.Start();
            return true;
        }
        catch (System.Net.Sockets.SocketException)
        {
            return false;
        }
    }

    private static string Text(int value) => value.ToString(CultureInfo.InvariantCulture);

    private static string? FindOnPath(string name) =>
        (Environment.GetEnvironmentVariable("PATH") ?? string.Empty).Split(':', StringSplitOptions.RemoveEmptyEntries)
            .Select(d => Path.Combine(d, name))
            .FirstOrDefault(File.Exists);
}

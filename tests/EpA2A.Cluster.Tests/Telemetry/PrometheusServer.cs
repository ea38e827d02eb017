using System.Globalization;
using System.Net.Http.Json;
using System.Text.Json;
using EpA2A.Cluster.Tests.MultiProcess;

namespace EpA2A.Cluster.Tests.Telemetry;

/// <summary>
/// A real `prometheus` on loopback with a generated config (1 s scrapes of the given targets), its storage in a
/// temporary folder, and the HTTP API's instant queries. Disposing kills it and deletes the folder.
/// </summary>
public sealed class PrometheusServer : IDisposable
{
    private readonly ChildProcess process;
    private readonly string folder;

    private PrometheusServer(string binary, IEnumerable<int> targets)
    {
        folder = Directory.CreateTempSubdirectory("epa2a-prometheus-").FullName;
        Port = ChildProcess.FreePort();
        string config = Path.Combine(folder, "prometheus.yml");
        string list = string.Join(", ", targets.Select(p => string.Create(CultureInfo.InvariantCulture, $"'localhost:{p}'")));
        File.WriteAllText(config, $"""
            global:
              scrape_interval: 1s
              scrape_timeout: 1s
              evaluation_interval: 1s
            scrape_configs:
              - job_name: epa2a
                static_configs:
                  - targets: [{list}]
            """);
        process = ChildProcess.Start(
            "prometheus",
            binary,
            $"--config.file={config}",
            $"--storage.tsdb.path={Path.Combine(folder, "data")}",
            string.Create(CultureInfo.InvariantCulture, $"--web.listen-address=127.0.0.1:{Port}"));
        Http = new HttpClient { BaseAddress = new Uri(string.Create(CultureInfo.InvariantCulture, $"http://127.0.0.1:{Port}/")), Timeout = TimeSpan.FromSeconds(10) };
    }

    public int Port { get; }

    public HttpClient Http { get; }

    public IReadOnlyCollection<string> Log => process.Lines;

    /// <summary>Starts prometheus and waits (bounded) until it answers /-/ready.</summary>
    public static async Task<PrometheusServer> StartAsync(string binary, IEnumerable<int> targets, TimeSpan within)
    {
        PrometheusServer server = new(binary, targets);
        DateTime giveUp = DateTime.UtcNow + within;
        while (true)
        {
            try
            {
                using HttpResponseMessage ready = await server.Http.GetAsync(new Uri("-/ready", UriKind.Relative));
                if (ready.IsSuccessStatusCode)
                {
                    return server;
                }
            }
            catch (HttpRequestException)
            {
                // not listening yet
            }

            if (DateTime.UtcNow > giveUp || server.process.HasExited)
            {
                string log = string.Join('\n', server.Log.TakeLast(20));
                server.Dispose();
                throw new TimeoutException($"prometheus was not ready within {within.TotalSeconds:0} s:\n{log}");
            }

            await Task.Delay(200);
        }
    }

    /// <summary>An instant query: (error or null, number of series).</summary>
    public async Task<(string? Error, int Series)> QueryAsync(string promql)
    {
        using HttpResponseMessage response = await Http.GetAsync(new Uri("api/v1/query?query=" + Uri.EscapeDataString(promql), UriKind.Relative));
        using JsonDocument body = await response.Content.ReadFromJsonAsync<JsonDocument>() ?? throw new InvalidDataException("empty answer");
        JsonElement root = body.RootElement;
        if (root.GetProperty("status").GetString() != "success")
        {
            return ($"{root.GetProperty("errorType").GetString()}: {root.GetProperty("error").GetString()}", 0);
        }

        JsonElement data = root.GetProperty("data");
        return data.GetProperty("resultType").GetString() is "vector" or "matrix"
            ? (null, data.GetProperty("result").GetArrayLength())
            : (null, 1);
    }

    public void Dispose()
    {
        process.Dispose();
        Http.Dispose();
        try
        {
            Directory.Delete(folder, recursive: true);
        }
        catch (IOException)
        {
            // a file still held open: the temp folder is cleaned up later
        }
    }
}

using System.Diagnostics;
using System.Text.Json;
using System.Text.Json.Serialization;

namespace EpA2A.Tools.Bench;

/// <summary>The PyTorch peer's report (bench/torch_peer.py).</summary>
internal sealed record BenchPeerReport
{
    [JsonPropertyName("device")]
    public string Device { get; init; } = string.Empty;

    [JsonPropertyName("torch")]
    public string Torch { get; init; } = string.Empty;

    [JsonPropertyName("points")]
    public List<BenchPeerPoint> Points { get; init; } = [];

    /// <summary>Why there is no peer result (no python, no torch, a failure); null when it ran.</summary>
    public string? Missing { get; init; }
}

internal sealed record BenchPeerPoint
{
    [JsonPropertyName("name")]
    public string Name { get; init; } = string.Empty;

    [JsonPropertyName("dispatch_us")]
    public BenchPeerStat Dispatch { get; init; } = new();

    [JsonPropertyName("combine_us")]
    public BenchPeerStat Combine { get; init; } = new();

    [JsonPropertyName("checked")]
    public bool Checked { get; init; }
}

internal sealed record BenchPeerStat
{
    [JsonPropertyName("median")]
    public double Median { get; init; }

    [JsonPropertyName("p99")]
    public double P99 { get; init; }
}

/// <summary>Runs bench/torch_peer.py on the manifest's routing files, on the same GPU, after the rank processes have exited.</summary>
internal static class BenchPeer
{
    public static async Task<BenchPeerReport?> RunAsync(string python, string dir, BenchManifest manifest, TextWriter console, CancellationToken ct)
    {
        if (python == "none")
        {
            return null;
        }

        string? script = FindScript();
        if (script is null)
        {
            await console.WriteLineAsync("bench: bench/torch_peer.py not found (run from the repository); no PyTorch peer").ConfigureAwait(false);
            return new BenchPeerReport { Missing = "bench/torch_peer.py not found" };
        }

        string output = Path.Combine(dir, "peer.json");
        ProcessStartInfo psi = new(python) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (string a in new[] { script, "--routing", dir, "--out", output, "--warmup", $"{manifest.Warmup}", "--iterations", $"{manifest.Iterations}" })
        {
            psi.ArgumentList.Add(a);
        }

        await console.WriteLineAsync($"== PyTorch peer: {python} {script}").ConfigureAwait(false);
        try
        {
            using Process p = Process.Start(psi)!;
            Task<string> stdout = p.StandardOutput.ReadToEndAsync(ct);
            Task<string> stderr = p.StandardError.ReadToEndAsync(ct);
            using CancellationTokenSource deadline = CancellationTokenSource.CreateLinkedTokenSource(ct);
            deadline.CancelAfter(TimeSpan.FromMinutes(8));
            try
            {
                await p.WaitForExitAsync(deadline.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                p.Kill(entireProcessTree: true);
                return new BenchPeerReport { Missing = "the PyTorch peer ran past 8 minutes" };
            }

            string log = await stdout.ConfigureAwait(false) + await stderr.ConfigureAwait(false);
            await File.WriteAllTextAsync(Path.Combine(dir, "peer.log"), log, ct).ConfigureAwait(false);
            if (p.ExitCode != 0 || !File.Exists(output))
            {
                string tail = string.Join('\n', log.Split('\n').TakeLast(8));
                await console.WriteLineAsync($"bench: the PyTorch peer failed ({p.ExitCode}):\n{tail}").ConfigureAwait(false);
                return new BenchPeerReport { Missing = $"the PyTorch peer exited with {p.ExitCode}: {tail}" };
            }

            return JsonSerializer.Deserialize<BenchPeerReport>(await File.ReadAllTextAsync(output, ct).ConfigureAwait(false));
        }
        catch (System.ComponentModel.Win32Exception e)
        {
            return new BenchPeerReport { Missing = $"cannot start {python}: {e.Message}" };
        }
    }

    private static string? FindScript()
    {
        foreach (string start in new[] { Environment.CurrentDirectory, AppContext.BaseDirectory })
        {
            for (DirectoryInfo? d = new(start); d is not null; d = d.Parent)
            {
                string candidate = Path.Combine(d.FullName, "bench", "torch_peer.py");
                if (File.Exists(candidate))
                {
                    return candidate;
                }
            }
        }

        return null;
    }
}

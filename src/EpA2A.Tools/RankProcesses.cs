using System.Diagnostics;
using System.Reflection;
using EpA2A.Cuda;
using EpA2A.Layer;

namespace EpA2A.Tools;

/// <summary>
/// What `epa2a-tools gpu-check` and `epa2a-tools bench` share to run one process of this program per rank on the GPU: starting
/// them, the NVSHMEM unique id handed from rank 0 through a file, and the GPU's name.
/// </summary>
internal static class RankProcesses
{
    /// <summary>The environment variable naming a command that each rank process runs under (empty: none).</summary>
    public const string WrapperVariable = "EPA2A_RANK_WRAPPER";

    private const string UidFile = "uid";

    /// <summary>
    /// Starts this program with <paramref name="args"/>; every stdout and stderr line goes to <paramref name="onLine"/>
    /// (the flag says stderr). Rank processes run with fewer runtime threads competing with their spinning GPU
    /// threads for the cores: no background GC, no spinning idle thread-pool workers, no tiered re-compilation in the
    /// middle of timed steps (each unless the environment already sets it).
    /// </summary>
    public static Process Start(IEnumerable<string> args, Action<string, bool> onLine, CoreAffinity? cores = null)
    {
        string self = Environment.ProcessPath ?? throw new InvalidOperationException("cannot find this program's path to start the rank processes");
        // EPA2A_RANK_WRAPPER (words split on spaces) runs each rank process under a wrapper of its own, e.g.
        // "compute-sanitizer --tool memcheck": the sanitizer then reports on every rank, which it does not when it
        // only follows the parent (scripts/gpu/sanitize.sh).
        string[] wrapper = (Environment.GetEnvironmentVariable(WrapperVariable) ?? string.Empty).Split(' ', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        ProcessStartInfo psi = new(wrapper.Length > 0 ? wrapper[0] : self) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (string w in wrapper.Skip(1))
        {
            psi.ArgumentList.Add(w);
        }

        if (wrapper.Length > 0)
        {
            psi.ArgumentList.Add(self);
        }

        if (Path.GetFileNameWithoutExtension(self) == "dotnet")
        {
            psi.ArgumentList.Add(Assembly.GetEntryAssembly()!.Location);
        }

        foreach (string a in args)
        {
            psi.ArgumentList.Add(a);
        }

        foreach ((string k, string v) in new[] { ("DOTNET_gcConcurrent", "0"), ("DOTNET_ThreadPool_UnfairSemaphoreSpinLimit", "0"), ("DOTNET_TieredCompilation", "0") })
        {
            if (!psi.Environment.ContainsKey(k))
            {
                psi.Environment[k] = v;
            }
        }

        // A rank's GPU worker on a core of its own (the rest of the process, NVSHMEM's proxy included, elsewhere):
        // see CoreAffinity for the stall this removes.
        foreach ((string k, string v) in cores?.ToEnvironment() ?? [])
        {
            psi.Environment.TryAdd(k, v);
        }

        Process p = new() { StartInfo = psi };
        p.OutputDataReceived += (_, e) =>
        {
            if (e.Data is { } line)
            {
                onLine(line, false);
            }
        };
        p.ErrorDataReceived += (_, e) =>
        {
            if (e.Data is { } line)
            {
                onLine(line, true);
            }
        };
        p.Start();
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();
        return p;
    }

    /// <summary>Waits for every rank process until <paramref name="limit"/>; false when some were still running (they are killed).</summary>
    public static async Task<bool> WaitAsync(IReadOnlyList<Process> ranks, TimeSpan limit, CancellationToken ct)
    {
        using CancellationTokenSource deadline = CancellationTokenSource.CreateLinkedTokenSource(ct);
        deadline.CancelAfter(limit);
        try
        {
            await Task.WhenAll(ranks.Select(p => p.WaitForExitAsync(deadline.Token))).ConfigureAwait(false);
            return true;
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
            return false;
        }
        finally
        {
            await KillAsync(ranks).ConfigureAwait(false);
        }
    }

    /// <summary>Kills every rank process still running (with its children) and waits for it.</summary>
    public static async Task KillAsync(IEnumerable<Process> ranks)
    {
        foreach (Process p in ranks)
        {
            if (!p.HasExited)
            {
                p.Kill(entireProcessTree: true);
                await p.WaitForExitAsync(CancellationToken.None).ConfigureAwait(false);
            }
        }
    }

    /// <summary>
    /// The one NVSHMEM bootstrap of a rank process: the unique id through a file in <paramref name="dir"/>, then the
    /// job joined on CUDA device <c>rank % gpus</c> (every rank on device 0 when <paramref name="gpus"/> is 0 or 1).
    /// </summary>
    public static async Task<NvshmemRuntime> JoinNvshmemAsync(string dir, int rank, int world, int gpus, CancellationToken ct)
    {
        byte[] uid = await ExchangeUniqueIdAsync(dir, rank, ct).ConfigureAwait(false);
        return await NvshmemRuntime.InitializeAsync(uid, rank, world, rank % Math.Max(1, gpus), ct).ConfigureAwait(false);
    }

    /// <summary>Rank 0 makes the NVSHMEM unique id and writes it into <paramref name="dir"/>; the others wait for it (60 s).</summary>
    private static async Task<byte[]> ExchangeUniqueIdAsync(string dir, int rank, CancellationToken ct)
    {
        string path = Path.Combine(dir, UidFile);
        if (rank == 0)
        {
            byte[] id = NvshmemRuntime.CreateUniqueId();
            await File.WriteAllBytesAsync(path + ".tmp", id, ct).ConfigureAwait(false);
            File.Move(path + ".tmp", path);
            return id;
        }

        Stopwatch sw = Stopwatch.StartNew();
        while (!File.Exists(path))
        {
            if (sw.Elapsed > TimeSpan.FromSeconds(60))
            {
                throw new TimeoutException($"rank {rank}: rank 0 wrote no unique id to {path} within 60 s");
            }

            await Task.Delay(10, ct).ConfigureAwait(false);
        }

        return await File.ReadAllBytesAsync(path, ct).ConfigureAwait(false);
    }

    /// <summary>The first GPU's name and driver version from nvidia-smi.</summary>
    public static (string Name, string Driver) GpuName()
    {
        try
        {
            ProcessStartInfo psi = new("nvidia-smi", "--query-gpu=name,driver_version --format=csv,noheader") { RedirectStandardOutput = true, UseShellExecute = false };
            using Process p = Process.Start(psi)!;
            string line = p.StandardOutput.ReadLine() ?? string.Empty;
            p.WaitForExit(10_000);
            string[] parts = line.Split(',', StringSplitOptions.TrimEntries);
            return parts.Length >= 2 ? (parts[0], parts[1]) : ("unknown GPU", "unknown");
        }
        catch (Exception e) when (e is System.ComponentModel.Win32Exception or InvalidOperationException)
        {
            return ("unknown GPU (no nvidia-smi)", "unknown");
        }
    }
}

/// <summary>The GPU phases of a CUDA layer's latest dispatch and combine (CUDA events), in µs; timing can be switched off.</summary>
internal sealed class GpuPhaseTimes : IGpuPhaseObserver
{
    private readonly Lock gate = new();
    private double prepare;
    private double sizeWait;
    private double send;
    private double combine;

    public bool WantsGpuTimes { get; set; } = true;

    public void OnPhase(int rank, Phase phase, TimeSpan elapsed, long tokens, long bytes)
    {
    }

    public void OnGpuPhase(int rank, Phase phase, TimeSpan gpuElapsed, long tokens)
    {
        lock (gate)
        {
            double us = gpuElapsed.TotalMicroseconds;
            switch (phase)
            {
                case Phase.DispatchPreprocess:
                    prepare = us;
                    break;
                case Phase.DispatchOutputSizeWait:
                    sizeWait = us;
                    break;
                case Phase.DispatchKernel:
                    send = us;
                    break;
                case Phase.CombineKernel:
                    combine = us;
                    break;
                default:
                    break;
            }
        }
    }

    /// <summary>Counting kernels, the GPU idle gap before the send, send + finish, and combine.</summary>
    public (double Prepare, double SizeWait, double Send, double Combine) Last()
    {
        lock (gate)
        {
            return (prepare, sizeWait, send, combine);
        }
    }
}

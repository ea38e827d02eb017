using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net;
using System.Net.Sockets;

namespace EpA2A.Cluster.Tests.MultiProcess;

/// <summary>
/// A real child process (redis-server, or `epa2a` or `epa2a-tools` run from this test's output folder) whose output lines are
/// kept, with bounded waits for a line and a hard kill (SIGKILL) for failure tests.
/// </summary>
public sealed class ChildProcess : IDisposable
{
    private readonly Process process;
    private readonly ConcurrentQueue<string> lines = new();
    private readonly ConcurrentQueue<(long At, string Line)> stamped = new();
    private readonly SemaphoreSlim arrived = new(0);

    private ChildProcess(string name, string file, IEnumerable<string> arguments)
    {
        Name = name;
        ProcessStartInfo start = new(file)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (string a in arguments)
        {
            start.ArgumentList.Add(a);
        }

        process = new Process { StartInfo = start, EnableRaisingEvents = true };
        process.OutputDataReceived += (_, e) => Add(e.Data);
        process.ErrorDataReceived += (_, e) => Add(e.Data);
        process.Start();
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
    }

    public string Name { get; }

    public bool HasExited => process.HasExited;

    /// <summary>The process id (what RankInfo.ProcessId and CoordinatorInfo.ProcessId report for a silo).</summary>
    public int Id => process.Id;

    public IReadOnlyCollection<string> Lines => lines;

    /// <summary>Every line with the <see cref="Stopwatch.GetTimestamp"/> it arrived at, so a drill can say when each happened.</summary>
    public IReadOnlyCollection<(long At, string Line)> StampedLines => stamped;

    /// <summary>Runs the epa2a command line that the test build carries (epa2a.dll beside the tests).</summary>
    public static ChildProcess Epa2a(string name, params string[] arguments) =>
        new(name, "dotnet", [Path.Combine(AppContext.BaseDirectory, "epa2a.dll"), .. arguments]);

    /// <summary>Runs the epa2a-tools command line that the test build carries (epa2a-tools.dll beside the tests).</summary>
    public static ChildProcess Epa2aTools(string name, params string[] arguments) =>
        new(name, "dotnet", [Path.Combine(AppContext.BaseDirectory, "epa2a-tools.dll"), .. arguments]);

    public static ChildProcess Start(string name, string file, params string[] arguments) => new(name, file, arguments);

    /// <summary>A TCP port free on loopback right now.</summary>
    public static int FreePort()
    {
        using TcpListener l = new(IPAddress.Loopback, 0);
        l.Start();
        return ((IPEndPoint)l.LocalEndpoint).Port;
    }

    /// <summary>Waits for a line (from now on, or already seen when <paramref name="skip"/> is 0) that satisfies <paramref name="match"/>.</summary>
    public async Task<string> WaitForLineAsync(Func<string, bool> match, TimeSpan within, int skip = 0)
    {
        DateTime giveUp = DateTime.UtcNow + within;
        int seen = 0;
        while (true)
        {
            foreach (string line in lines.Skip(skip).Skip(seen).ToArray())
            {
                seen++;
                if (match(line))
                {
                    return line;
                }
            }

            TimeSpan left = giveUp - DateTime.UtcNow;
            if (left <= TimeSpan.Zero)
            {
                throw new TimeoutException($"{Name}: no matching line within {within.TotalSeconds:0.#} s; last lines:\n{string.Join('\n', lines.TakeLast(15))}");
            }

            await arrived.WaitAsync(left < TimeSpan.FromMilliseconds(200) ? left : TimeSpan.FromMilliseconds(200));
        }
    }

    /// <summary>Waits for the process to exit by itself; returns its exit code (a timeout kills it and fails).</summary>
    public async Task<int> WaitForExitAsync(TimeSpan within)
    {
        try
        {
            await process.WaitForExitAsync().WaitAsync(within);
        }
        catch (TimeoutException)
        {
            Kill();
            throw new TimeoutException($"{Name}: still running after {within.TotalSeconds:0.#} s; last lines:\n{string.Join('\n', lines.TakeLast(15))}");
        }

        process.WaitForExit(); // drains the output readers
        return process.ExitCode;
    }

    /// <summary>SIGKILL: no shutdown, no goodbye to the cluster.</summary>
    public void Kill()
    {
        if (!process.HasExited)
        {
            process.Kill(entireProcessTree: true);
            process.WaitForExit(10_000);
        }
    }

    public void Dispose()
    {
        Kill();
        process.Dispose();
        arrived.Dispose();
    }

    private void Add(string? line)
    {
        if (line is not null)
        {
            stamped.Enqueue((Stopwatch.GetTimestamp(), line));
            lines.Enqueue(line);
            arrived.Release();
        }
    }
}

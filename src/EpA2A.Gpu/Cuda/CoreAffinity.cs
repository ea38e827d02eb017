using System.Globalization;
using EpA2A.Backends.Cuda;

namespace EpA2A.Cuda;

/// <summary>
/// Where a rank process's threads may run (Linux). A rank's GPU worker thread launches every kernel and polls the
/// device; when it shares a core with other busy threads (NVSHMEM's proxy thread, the runtime's workers, the other
/// ranks' pollers) the kernel scheduler can take the core from it for a whole tick (4 ms at HZ=250), and every
/// rank of the group waits that long in its next collective kernel. Giving the worker a core of its own, and
/// keeping every other thread of the process off it, removes that stall where it starts.
/// </summary>
/// <param name="WorkerCore">The core the GPU worker thread owns.</param>
/// <param name="OtherCores">The cores every other thread of the process (NVSHMEM's included) runs on.</param>
public sealed record CoreAffinity(int WorkerCore, IReadOnlyList<int> OtherCores)
{
    /// <summary>Environment variables that rank launchers set: <c>EPA2A_WORKER_CORE=3</c>, <c>EPA2A_OTHER_CORES=8-15</c>.</summary>
    public const string WorkerCoreVariable = "EPA2A_WORKER_CORE";

    /// <inheritdoc cref="WorkerCoreVariable"/>
    public const string OtherCoresVariable = "EPA2A_OTHER_CORES";

    /// <summary>
    /// The plan for rank <paramref name="localRank"/> of <paramref name="ranksOnHost"/> ranks on a host with
    /// <paramref name="cores"/> cores: worker of local rank r on core r, everything else on the cores after the
    /// workers'. Null when the host has fewer than two cores a rank (then pinning would only move the contention).
    /// </summary>
    public static CoreAffinity? Plan(int localRank, int ranksOnHost, int cores)
    {
        if (ranksOnHost < 1 || localRank < 0 || localRank >= ranksOnHost || cores < 2 * ranksOnHost)
        {
            return null;
        }

        return new CoreAffinity(localRank, [.. Enumerable.Range(ranksOnHost, cores - ranksOnHost)]);
    }

    /// <summary>The plan in the environment (both variables set and valid), else null.</summary>
    public static CoreAffinity? FromEnvironment()
    {
        string? worker = Environment.GetEnvironmentVariable(WorkerCoreVariable);
        string? others = Environment.GetEnvironmentVariable(OtherCoresVariable);
        if (string.IsNullOrWhiteSpace(worker) || string.IsNullOrWhiteSpace(others))
        {
            return null;
        }

        if (!int.TryParse(worker, NumberStyles.None, CultureInfo.InvariantCulture, out int core) || ParseCores(others) is not { Count: > 0 } rest)
        {
            throw new ArgumentException($"{WorkerCoreVariable}='{worker}' / {OtherCoresVariable}='{others}': expected a core number and a core list such as 8-15 or 8,9,12");
        }

        return new CoreAffinity(core, rest);
    }

    /// <summary>"8-11,14" → [8, 9, 10, 11, 14]; null when malformed.</summary>
    public static List<int>? ParseCores(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        List<int> cores = [];
        foreach (string part in text.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            string[] range = part.Split('-');
            if (range.Length is < 1 or > 2
                || !int.TryParse(range[0], NumberStyles.None, CultureInfo.InvariantCulture, out int first)
                || !int.TryParse(range[^1], NumberStyles.None, CultureInfo.InvariantCulture, out int last)
                || last < first || last >= 1024)
            {
                return null;
            }

            for (int c = first; c <= last; c++)
            {
                cores.Add(c);
            }
        }

        return cores;
    }

    /// <summary>The environment form of this plan, for a launcher.</summary>
    public IEnumerable<KeyValuePair<string, string>> ToEnvironment() =>
    [
        new(WorkerCoreVariable, WorkerCore.ToString(CultureInfo.InvariantCulture)),
        new(OtherCoresVariable, string.Join(',', OtherCores)),
    ];

    /// <summary>How often the kernel has taken the CPU from the calling thread while it could run (Linux; -1 elsewhere).</summary>
    public static long CurrentThreadInvoluntarySwitches() => ThreadCores.InvoluntarySwitches(ThreadCores.CurrentThreadId());

    /// <summary>On the worker thread, before NVSHMEM starts: the threads it creates inherit the other cores.</summary>
    internal void EnterSetup() => ThreadCores.PinCurrent(OtherCores);

    /// <summary>On the worker thread, after NVSHMEM started: the worker takes its core, every other thread leaves it.</summary>
    internal void TakeWorkerCore()
    {
        int self = ThreadCores.CurrentThreadId();
        ThreadCores.PinCurrent([WorkerCore]);
        ThreadCores.PinAllBut(self, OtherCores);
    }
}

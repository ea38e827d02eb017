using System.Globalization;
using System.Runtime.InteropServices;

namespace EpA2A.Backends.Cuda;

/// <summary>sched_setaffinity and the kernel's per-thread context-switch counters (Linux; no-ops elsewhere).</summary>
internal static partial class ThreadCores
{
    private const int MaskBytes = 128; // 1024 cores

    /// <summary>The kernel's id of the calling thread (0 where unknown).</summary>
    public static int CurrentThreadId() => OperatingSystem.IsLinux() ? gettid() : 0;

    public static void PinCurrent(IReadOnlyList<int> cores) => Pin(0, cores);

    /// <summary>Moves every thread of this process except <paramref name="exceptThread"/> onto <paramref name="cores"/>.</summary>
    public static void PinAllBut(int exceptThread, IReadOnlyList<int> cores)
    {
        if (!OperatingSystem.IsLinux())
        {
            return;
        }

        foreach (string task in Directory.EnumerateDirectories("/proc/self/task"))
        {
            if (int.TryParse(Path.GetFileName(task), NumberStyles.None, CultureInfo.InvariantCulture, out int tid) && tid != exceptThread)
            {
                Pin(tid, cores, ignoreGone: true);
            }
        }
    }

    /// <summary>Times the kernel took the CPU from thread <paramref name="tid"/> while it could run (-1 where unknown).</summary>
    public static long InvoluntarySwitches(int tid)
    {
        if (!OperatingSystem.IsLinux() || tid <= 0)
        {
            return -1;
        }

        try
        {
            foreach (string line in File.ReadLines($"/proc/self/task/{tid.ToString(CultureInfo.InvariantCulture)}/status"))
            {
                if (line.StartsWith("nonvoluntary_ctxt_switches:", StringComparison.Ordinal)
                    && long.TryParse(line.AsSpan("nonvoluntary_ctxt_switches:".Length).Trim(), NumberStyles.None, CultureInfo.InvariantCulture, out long n))
                {
                    return n;
                }
            }
        }
        catch (IOException)
        {
        }

        return -1;
    }

    private static unsafe void Pin(int tid, IReadOnlyList<int> cores, bool ignoreGone = false)
    {
        if (!OperatingSystem.IsLinux())
        {
            return;
        }

        byte* mask = stackalloc byte[MaskBytes];
        new Span<byte>(mask, MaskBytes).Clear();
        foreach (int c in cores)
        {
            if (c < 0 || c >= MaskBytes * 8)
            {
                throw new ArgumentOutOfRangeException(nameof(cores), c, "a core number must be in [0, 1024)");
            }

            mask[c >> 3] |= (byte)(1 << (c & 7));
        }

        if (sched_setaffinity(tid, MaskBytes, mask) != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            if (ignoreGone && errno == 3)
            {
                return; // ESRCH: the thread ended meanwhile
            }

            throw new InvalidOperationException($"sched_setaffinity(thread {tid}, cores {string.Join(',', cores)}) failed with errno {errno}: the cores must exist and be allowed to this process");
        }
    }

    [LibraryImport("libc", SetLastError = true)]
    private static unsafe partial int sched_setaffinity(int pid, nint cpusetsize, byte* mask);

    [LibraryImport("libc")]
    private static partial int gettid();
}

using System.Diagnostics;
using System.Globalization;

namespace EpA2A.Tools.Soak;

/// <summary>
/// This process' resources after a full, compacting GC: what a soak compares between the start and the end of a
/// run to tell a leak from a working set that has settled.
/// </summary>
internal sealed record ResourceSample(int Step, long ManagedBytes, long HeapBytes, long CommittedBytes, int Handles, int Threads, long WorkingSet)
{
    /// <summary>The first tenth of a run is warm-up (JIT, pools, the thread pool finding its size); it is not compared.</summary>
    public const double WarmUp = 0.1;

    public static ResourceSample Take(int step)
    {
        GC.Collect(GC.MaxGeneration, GCCollectionMode.Forced, blocking: true, compacting: true);
        GC.WaitForPendingFinalizers();
        long managed = GC.GetTotalMemory(forceFullCollection: true);
        GCMemoryInfo info = GC.GetGCMemoryInfo(GCKind.Any);
        using Process self = Process.GetCurrentProcess();
        return new ResourceSample(step, managed, info.HeapSizeBytes, info.TotalCommittedBytes, self.HandleCount, self.Threads.Count, self.WorkingSet64);
    }

    /// <summary>
    /// Prints the median of each measure over the first tenth after warm-up (steps 10–20 %) and over the last tenth
    /// (90–100 %), and whether each stayed flat: managed memory and GC heap within 2 MiB or 2 % (whichever is larger),
    /// handles within 16, threads within 8. Returns whether all did.
    /// </summary>
    public static bool Report(IReadOnlyList<ResourceSample> samples, int steps, TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(samples);
        ArgumentNullException.ThrowIfNull(output);
        ResourceSample[] first = [.. samples.Where(s => s.Step >= steps * WarmUp && s.Step <= steps * 2 * WarmUp)];
        ResourceSample[] last = [.. samples.Where(s => s.Step >= steps * (1 - WarmUp))];
        if (first.Length == 0 || last.Length == 0)
        {
            output.WriteLine("  too few resource samples to compare");
            return false;
        }

        const long MiB = 1 << 20;
        (string Name, Func<ResourceSample, long> Of, Func<long, long, bool>? Flat, long Unit)[] measures =
        [
            ("managed memory (GC.GetTotalMemory), MiB", s => s.ManagedBytes, (a, b) => b <= a + Math.Max(2 * MiB, a / 50), MiB),
            ("GC heap size (GCMemoryInfo.HeapSizeBytes), MiB", s => s.HeapBytes, (a, b) => b <= a + Math.Max(2 * MiB, a / 50), MiB),
            ("GC committed (GCMemoryInfo.TotalCommittedBytes), MiB", s => s.CommittedBytes, null, MiB),
            ("handles (Process.HandleCount)", s => s.Handles, (a, b) => b <= a + 16, 1),
            ("threads (Process.Threads)", s => s.Threads, (a, b) => b <= a + 8, 1),
            ("working set, MiB", s => s.WorkingSet, null, MiB),
        ];

        output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"  resources after a full GC, median of {first.Length} samples in steps {first[0].Step}-{first[^1].Step} vs {last.Length} in steps {last[0].Step}-{last[^1].Step}:"));
        output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"    {"measure",-54} {"start",10} {"first 10%",10} {"last 10%",10} {"max",10}  verdict"));
        bool flat = true;
        foreach ((string name, Func<ResourceSample, long> of, Func<long, long, bool>? isFlat, long unit) in measures)
        {
            long a = Median(first.Select(of));
            long b = Median(last.Select(of));
            long max = samples.Max(of);
            bool ok = isFlat?.Invoke(a, b) ?? true;
            flat &= ok;
            string verdict = isFlat is null ? "(not judged: the runtime's to manage)" : ok ? "flat" : "GROWING";
            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"    {name,-54} {Show(of(samples[0]), unit),10} {Show(a, unit),10} {Show(b, unit),10} {Show(max, unit),10}  {verdict}"));
        }

        return flat;
    }

    private static long Median(IEnumerable<long> values)
    {
        long[] sorted = [.. values.Order()];
        return sorted[sorted.Length / 2];
    }

    private static string Show(long value, long unit) =>
        unit == 1 ? value.ToString(CultureInfo.InvariantCulture) : (value / (double)unit).ToString("0.0", CultureInfo.InvariantCulture);
}

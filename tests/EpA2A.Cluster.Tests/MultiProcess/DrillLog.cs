using System.Globalization;
using EpA2A.Grains;

namespace EpA2A.Cluster.Tests.MultiProcess;

/// <summary>
/// Fault drills print their outage (fault to first good step) to the test output; with EPA2A_DRILL_LOG set to a file,
/// they also append it there, so a run from the command line keeps the numbers (the test runner shows the output of
/// failed tests only).
/// </summary>
internal static class DrillLog
{
    private static readonly Lock Gate = new();

    /// <summary>The line every fault drill prints, one format for both policies: "outage: &lt;policy&gt; &lt;kind&gt; &lt;ms&gt;" (fault to first good step).</summary>
    public static void Outage(LostRankPolicy policy, string kind, TimeSpan outage) =>
        Write(string.Create(CultureInfo.InvariantCulture, $"outage: {(policy == LostRankPolicy.Mask ? "mask" : "fail-and-re-form")} {kind} {outage.TotalMilliseconds:0}"));

    /// <summary>
    /// A masking drill's re-form time, fault to the coordinator's re-form on the survivors ("re-form: mask &lt;kind&gt; &lt;ms&gt;"):
    /// the bound of issue 18 (within 2T of the loss), where the outage also holds the client's next step.
    /// </summary>
    public static void Reform(string kind, TimeSpan reform) =>
        Write(string.Create(CultureInfo.InvariantCulture, $"re-form: mask {kind} {reform.TotalMilliseconds:0}"));

    /// <summary>
    /// When a coordinator in one of <paramref name="silos"/> first re-formed a layer without lost ranks after
    /// <paramref name="since"/> (its "masking lost ranks" line, logged once the survivors hold the re-formed layer), as
    /// time after it; null when none did.
    /// </summary>
    public static TimeSpan? ReformedAfter(IEnumerable<ChildProcess> silos, long since) =>
        silos.SelectMany(p => p.StampedLines)
            .Where(l => l.At >= since && l.Line.Contains("masking lost ranks", StringComparison.Ordinal))
            .Select(l => (TimeSpan?)System.Diagnostics.Stopwatch.GetElapsedTime(since, l.At))
            .Min();

    /// <summary>
    /// The lines in which a rank grain on one of <paramref name="silos"/> said, after <paramref name="since"/>, that Orleans
    /// deactivated it because the silo holding its grain-directory entry died (a healthy rank's front door going away
    /// mid-step; rank grains are kept out of the directory so that it cannot happen).
    /// </summary>
    public static string[] RankGrainsDeactivatedByDirectoryLoss(IEnumerable<ChildProcess> silos, long since) =>
        [.. silos.SelectMany(p => p.StampedLines.Where(l => l.At >= since && l.Line.Contains("deactivated on this silo (DirectoryFailure", StringComparison.Ordinal)).Select(l => $"{p.Name}: {l.Line.Trim()}"))];

    /// <summary>The lines in which a layer's coordinator on one of <paramref name="silos"/> said, after <paramref name="since"/>, that it was deactivated, and why.</summary>
    public static string[] CoordinatorsDeactivated(IEnumerable<ChildProcess> silos, long since) =>
        [.. silos.SelectMany(p => p.StampedLines.Where(l => l.At >= since && l.Line.Contains("coordinator ", StringComparison.Ordinal) && l.Line.Contains("deactivated on this silo", StringComparison.Ordinal)).Select(l => $"{p.Name}: {l.Line.Trim()}"))];

    /// <summary>
    /// Every line the processes printed from <paramref name="since"/> on, in arrival order, as "+ms name: line": the
    /// drill's phases (the coordinator's mask timing, Orleans' membership warnings, the client's steps) on one clock.
    /// </summary>
    public static IEnumerable<string> Timeline(long since, IEnumerable<ChildProcess> processes, int max = 200) =>
        processes.SelectMany(p => p.StampedLines.Where(l => l.At >= since && !string.IsNullOrWhiteSpace(l.Line) && !l.Line.TrimStart().StartsWith("at ", StringComparison.Ordinal) && !l.Line.Contains("Orleans.Runtime.Messaging.Connection", StringComparison.Ordinal)).Select(l => (l.At, p.Name, l.Line)))
            .OrderBy(l => l.At)
            .Take(max)
            .Select(l => string.Create(CultureInfo.InvariantCulture, $"+{System.Diagnostics.Stopwatch.GetElapsedTime(since, l.At).TotalMilliseconds:0} ms {l.Name}: {l.Line.Trim()}"));

    public static void Write(string summary, IEnumerable<string>? detail = null)
    {
        TestContext.Current.TestOutputHelper?.WriteLine(summary);
        string? path = Environment.GetEnvironmentVariable("EPA2A_DRILL_LOG");
        if (string.IsNullOrEmpty(path))
        {
            return;
        }

        lock (Gate)
        {
            File.AppendAllLines(path, [$"{DateTime.UtcNow:O} {summary}", .. (detail ?? []).Select(l => "    " + l)]);
        }
    }
}

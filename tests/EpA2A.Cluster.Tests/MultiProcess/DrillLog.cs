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

namespace EpA2A.Cluster.Tests.MultiProcess;

/// <summary>
/// Fault drills print their outage (fault to first good step) to the test output; with EPA2A_DRILL_LOG set to a file,
/// they also append it there, so a run from the command line keeps the numbers (the test runner shows the output of
/// failed tests only).
/// </summary>
internal static class DrillLog
{
    private static readonly Lock Gate = new();

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

using System.Globalization;

namespace EpA2A.Cluster.Tests.MultiProcess;

/// <summary>
/// Two real `epa2a drive` processes on one layer of two `epa2a silo` processes (localhost clustering), issue 17
/// finding 1: a second client with another spec is refused while the first steps; with --take-over it re-configures
/// the layer, and the first client's next step fails naming the re-configuration (exit 3), never a step under a spec
/// it did not configure.
/// </summary>
[Collection(ProcessCluster.Collection)]
public sealed class TwoClientProcessTests
{
    [Fact]
    public async Task A_second_client_re_configuring_the_layer_is_refused_unless_it_takes_over_and_then_the_first_fails_by_name()
    {
        int portBase = 30000 + (Random.Shared.Next(0, 100) * 200);
        string port = portBase.ToString(CultureInfo.InvariantCulture);
        using ChildProcess silo0 = ChildProcess.Epa2a("silo0", "silo", "--rank", "0", "--world-size", "2", "--group", "two", "--port-base", port);
        using ChildProcess silo1 = ChildProcess.Epa2a("silo1", "silo", "--rank", "1", "--world-size", "2", "--group", "two", "--port-base", port);
        await silo0.WaitForLineAsync(l => l.StartsWith("epa2a silo: rank", StringComparison.Ordinal), TimeSpan.FromSeconds(60));
        await silo1.WaitForLineAsync(l => l.StartsWith("epa2a silo: rank", StringComparison.Ordinal), TimeSpan.FromSeconds(60));
        string[] common = ["drive", "--world-size", "2", "--group", "two", "--port-base", port, "--timeout-seconds", "3", "--connect-timeout-seconds", "30"];

        // Experts 16 -> 32 under a client stepping with 16, then hidden 64 -> 128 under a client stepping with 32.
        await TakeOverAsync(common, ["--experts", "16", "--hidden", "64"], ["--experts", "32", "--hidden", "64"], "NumExperts 16 -> 32");
        await TakeOverAsync(common, ["--experts", "32", "--hidden", "64"], ["--experts", "32", "--hidden", "128"], "Hidden 64 -> 128");
    }

    private static async Task TakeOverAsync(string[] common, string[] mine, string[] theirs, string change)
    {
        using ChildProcess first = ChildProcess.Epa2a("first", [.. common, .. mine, "--steps", "100000", "--interval-ms", "100", "--continue-on-failure"]);
        await first.WaitForLineAsync(l => l.StartsWith("step 3:", StringComparison.Ordinal), TimeSpan.FromSeconds(90));

        using ChildProcess refused = ChildProcess.Epa2a("second", [.. common, .. theirs, "--steps", "3"]);
        Assert.Equal(3, await refused.WaitForExitAsync(TimeSpan.FromSeconds(60)));
        Assert.Contains(refused.Lines, l => l.Contains("is being stepped by epa2a drive", StringComparison.Ordinal) && l.Contains(change, StringComparison.Ordinal) && l.Contains("--take-over", StringComparison.Ordinal));

        int before = first.Lines.Count;
        using ChildProcess taker = ChildProcess.Epa2a("taker", [.. common, .. theirs, "--steps", "3", "--take-over"]);
        Assert.Equal(0, await taker.WaitForExitAsync(TimeSpan.FromSeconds(60)));
        Assert.Equal(3, taker.Lines.Count(l => l.StartsWith("step ", StringComparison.Ordinal) && l.Contains(": ok", StringComparison.Ordinal)));

        Assert.Equal(3, await first.WaitForExitAsync(TimeSpan.FromSeconds(30)));
        string failed = first.Lines.Skip(before).First(l => l.Contains("FAILED", StringComparison.Ordinal));
        Assert.Contains("LayerSpecConflictException", failed, StringComparison.Ordinal);
        Assert.Contains("re-configured by epa2a drive", failed, StringComparison.Ordinal);
        Assert.Contains(change.Split(" -> ")[0], failed, StringComparison.Ordinal);
        Assert.DoesNotContain(first.Lines, l => l.Contains("MISMATCH", StringComparison.Ordinal));
        Assert.DoesNotContain(first.Lines.Skip(before).SkipWhile(l => !l.Contains("FAILED", StringComparison.Ordinal)), l => l.StartsWith("step ", StringComparison.Ordinal) && l.Contains(": ok", StringComparison.Ordinal));
        TestContext.Current.TestOutputHelper?.WriteLine($"{change}: first client after the take-over:\n{string.Join('\n', first.Lines.Skip(before))}");
    }
}

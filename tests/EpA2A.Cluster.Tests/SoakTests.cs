using System.Globalization;
using EpA2A.Cluster.Tests.MultiProcess;
using EpA2A.Tools.Soak;

namespace EpA2A.Cluster.Tests;

/// <summary>
/// The soak (issue 5), reduced: `epa2a-tools soak --steps 500` in its own process (so the resources it measures are its
/// own, not this test host's) through the grains of four silos and through in-process groups, every step checked
/// against the reference; memory, handles and threads flat between the first and last tenth. The full 10,000-step
/// run is the same command (RELIABILITY.md has its numbers).
/// </summary>
public sealed class SoakTests
{
    [Fact]
    public async Task Five_hundred_random_steps_through_the_grains_and_in_process_all_match_the_reference_and_resources_stay_flat()
    {
        int seed = Environment.TickCount & 0xFFFF;
        int portBase = 18000 + (Random.Shared.Next(0, 10) * 200);
        using ChildProcess soak = ChildProcess.Epa2aTools("soak", "soak", "--steps", "500", "--seed", seed.ToString(CultureInfo.InvariantCulture), "--port-base", portBase.ToString(CultureInfo.InvariantCulture));
        int exit = await soak.WaitForExitAsync(TimeSpan.FromSeconds(150));
        string log = string.Join('\n', soak.Lines);
        TestContext.Current.TestOutputHelper?.WriteLine(log);
        Assert.True(exit == 0, $"seed {seed}: epa2a-tools soak exited with {exit}:\n{log}");
        Assert.Contains("soak: PASS", soak.Lines);
        Assert.Equal(2, soak.Lines.Count(l => l.Contains("500 steps in", StringComparison.Ordinal) && l.Contains(", 0 failed; resources flat", StringComparison.Ordinal)));
        Assert.DoesNotContain(soak.Lines, l => l.Contains("GROWING", StringComparison.Ordinal) || l.Contains("FAILED", StringComparison.Ordinal));
    }

    [Fact]
    public void The_resource_check_calls_steady_growth_growing_and_noise_flat()
    {
        const long MiB = 1 << 20;
        List<ResourceSample> noisy = [.. Enumerable.Range(0, 51).Select(i => Sample(i * 20, (80 * MiB) + ((i % 3) * MiB / 2), 200 + (i % 2), 30 + (i % 3)))];
        Assert.True(ResourceSample.Report(noisy, 1000, TextWriter.Null));

        // 10 KiB a step: 8 MiB more managed memory at the end than after warm-up.
        List<ResourceSample> leaking = [.. Enumerable.Range(0, 51).Select(i => Sample(i * 20, (80 * MiB) + (i * 20 * 10 * 1024), 200, 30))];
        Assert.False(ResourceSample.Report(leaking, 1000, TextWriter.Null));

        // A handle per 20 steps, or a thread per 50.
        Assert.False(ResourceSample.Report([.. Enumerable.Range(0, 51).Select(i => Sample(i * 20, 80 * MiB, 200 + i, 30))], 1000, TextWriter.Null));
        Assert.False(ResourceSample.Report([.. Enumerable.Range(0, 51).Select(i => Sample(i * 20, 80 * MiB, 200, 30 + (i * 20 / 50)))], 1000, TextWriter.Null));
    }

    private static ResourceSample Sample(int step, long managed, int handles, int threads) =>
        new(step, managed, managed + (1 << 20), managed * 2, handles, threads, managed * 3);
}

using EpA2A.Backends.Cuda;
using EpA2A.Cuda;

namespace EpA2A.Tests;

/// <summary>
/// The core plan of a rank process: the GPU worker gets a core of its own and every other thread stays off it, so
/// the scheduler never takes the launching thread away for a tick while the group waits on it.
/// </summary>
public sealed class CoreAffinityTests
{
    [Fact]
    public void Each_rank_worker_gets_its_own_core_and_the_other_threads_share_the_cores_after_the_workers()
    {
        CoreAffinity[] plans = [.. Enumerable.Range(0, 8).Select(r => CoreAffinity.Plan(r, 8, 16)!)];
        Assert.Equal(Enumerable.Range(0, 8), plans.Select(p => p.WorkerCore));
        Assert.All(plans, p => Assert.Equal(Enumerable.Range(8, 8), p.OtherCores));
        Assert.All(plans, p => Assert.DoesNotContain(p.WorkerCore, plans.SelectMany(q => q.OtherCores)));
    }

    [Theory]
    [InlineData(8, 15)]
    [InlineData(4, 4)]
    [InlineData(1, 1)]
    public void A_host_with_fewer_than_two_cores_a_rank_is_not_pinned(int ranks, int cores) =>
        Assert.Null(CoreAffinity.Plan(0, ranks, cores));

    [Theory]
    [InlineData("8-11,14", new[] { 8, 9, 10, 11, 14 })]
    [InlineData("3", new[] { 3 })]
    [InlineData(" 1 , 2 ", new[] { 1, 2 })]
    public void Core_lists_parse_as_ranges_and_single_cores(string text, int[] expected) =>
        Assert.Equal(expected, CoreAffinity.ParseCores(text));

    [Theory]
    [InlineData("11-8")]
    [InlineData("a")]
    [InlineData("1-2-3")]
    [InlineData("2000")]
    public void Malformed_core_lists_are_refused(string text) => Assert.Null(CoreAffinity.ParseCores(text));

    [Fact]
    public void The_environment_form_round_trips()
    {
        CoreAffinity plan = CoreAffinity.Plan(2, 4, 8)!;
        Dictionary<string, string> env = plan.ToEnvironment().ToDictionary();
        Assert.Equal("2", env[CoreAffinity.WorkerCoreVariable]);
        Assert.Equal(plan.OtherCores, CoreAffinity.ParseCores(env[CoreAffinity.OtherCoresVariable]));
    }

    [Fact]
    public void Pinning_a_thread_shows_in_its_allowed_cores_and_its_switch_counter_is_readable()
    {
        if (!OperatingSystem.IsLinux())
        {
            return;
        }

        int last = Environment.ProcessorCount - 1;
        string allowed = string.Empty;
        long switches = -2;
        Thread t = new(() =>
        {
            int tid = ThreadCores.CurrentThreadId();
            ThreadCores.PinCurrent([last]);
            allowed = File.ReadLines($"/proc/self/task/{tid}/status").Single(l => l.StartsWith("Cpus_allowed_list:", StringComparison.Ordinal));
            switches = ThreadCores.InvoluntarySwitches(tid);
        });
        t.Start();
        t.Join();
        Assert.EndsWith($"\t{last}", allowed);
        Assert.True(switches >= 0, $"nonvoluntary_ctxt_switches was not readable ({switches})");
    }
}

using EpA2A.Tools.GpuCheck;

namespace EpA2A.Cluster.Tests;

/// <summary>gpu-check's group deadlines come from the cases' work, not one fixed number for every group.</summary>
public sealed class GpuCheckDeadlineTests
{
    [Fact]
    public void A_bigger_case_gets_a_longer_budget_and_the_groups_fit_the_suites_time()
    {
        GpuCheckCase small = GpuCheckCase.Of("w2", null)[0];
        GpuCheckCase big = GpuCheckCase.Of("big", "8192x7168")[0];
        Assert.True(big.Budget > 4 * small.Budget, $"big {big.Budget}, small {small.Budget}");

        TimeSpan bigGroup = GpuCheckCase.GroupDeadline(GpuCheckCase.Of("big", null));
        TimeSpan w2Group = GpuCheckCase.GroupDeadline(GpuCheckCase.Of("w2", null));
        Assert.InRange(w2Group.TotalSeconds, 60, 180);

        // The H200 run that hit the old fixed 300 s: the 8192x7168 case alone took 165 s, mostly host checks.
        Assert.InRange(bigGroup.TotalSeconds, 300, 600);

        // One case more makes the deadline longer by at least that case's budget.
        GpuCheckCase[] w4 = GpuCheckCase.Of("w4", null);
        Assert.True(GpuCheckCase.GroupDeadline(w4) - GpuCheckCase.GroupDeadline(w4[..^1]) >= w4[^1].Budget);
    }
}

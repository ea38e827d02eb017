using EpA2A.Grains;
using EpA2A.Grains.Coordination;

namespace EpA2A.Cluster.Tests;

/// <summary>
/// The coordinator's rule for CUDA groups after a rank process restarted: which ranks must leave their NVSHMEM job
/// (it cannot be initialized twice in a process) so that every rank can join one fresh job. The GPU drill that runs
/// it for real is scripts/gpu/gpu-restart.sh (tests/gpu-results/gpu-restart-h100-2026-11-24.md).
/// </summary>
public sealed class GpuJobTests
{
    [Fact]
    public void Ranks_that_are_all_in_one_job_or_all_in_none_stay()
    {
        Assert.Null(ExpertLayerGrain.StaleGpuJobs([Rank(0, "A"), Rank(1, "A"), Rank(2, "A")]));
        Assert.Null(ExpertLayerGrain.StaleGpuJobs([Rank(0, null), Rank(1, null)]));
    }

    [Fact]
    public void Next_to_a_restarted_rank_every_rank_holding_the_old_job_restarts()
    {
        (int[] stale, string reason) = ExpertLayerGrain.StaleGpuJobs([Rank(0, "A"), Rank(1, "A"), Rank(2, null), Rank(3, "A")])
            ?? throw new Xunit.Sdk.XunitException("a restarted rank next to an old job must make the old job's ranks restart");

        Assert.Equal([0, 1, 3], stale);
        Assert.Contains("ranks 2 restarted", reason, StringComparison.Ordinal);
    }

    [Fact]
    public void Ranks_in_different_jobs_all_restart()
    {
        (int[] stale, string reason) = ExpertLayerGrain.StaleGpuJobs([Rank(0, "A"), Rank(1, "B")])
            ?? throw new Xunit.Sdk.XunitException("two jobs in one group must make every rank restart");

        Assert.Equal([0, 1], stale);
        Assert.Contains("2 different NVSHMEM jobs", reason, StringComparison.Ordinal);
    }

    private static RankInfo Rank(int rank, string? job) =>
        new("g", rank, "silo", 0, EpBackendKind.Cuda, 1000 + rank, GpuInitialized: job is not null, StepsInFlight: 0, GpuJob: job);
}

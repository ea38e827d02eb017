using Orleans.Concurrency;

namespace EpA2A.Grains;

/// <summary>
/// What the <see cref="IExpertLayerGrain"/> asks of a rank (key: "group/rank"): where it lives, the GPU job, the
/// layer's life cycle and its steps.
/// </summary>
public interface IRankControl : IGrainWithStringKey
{
    /// <summary>Where this rank lives.</summary>
    [AlwaysInterleave]
    Task<RankInfo> DescribeAsync();

    /// <summary>Rank 0 of a CUDA group: a fresh NVSHMEM unique id that every rank joins with.</summary>
    Task<byte[]> CreateUniqueIdAsync();

    /// <summary>Joins the group's NVSHMEM job (collective: every rank at once, with the same id).</summary>
    Task InitializeGpuAsync(byte[] uniqueId, int worldSize);

    /// <summary>Creates (or re-creates, for a new epoch) the layer's buffers with this rank's configuration.</summary>
    Task CreateLayerAsync(string layer, LayerSpec spec, long epoch);

    /// <summary>
    /// Creates (or replaces) the layer on the survivors of a masking layer: every rank but <paramref name="masked"/>,
    /// renumbered in rank order (<see cref="MaskedWorld"/>); this rank must be one of them.
    /// </summary>
    Task CreateMaskedLayerAsync(string layer, LayerSpec spec, long epoch, int[] masked);

    /// <summary>Releases the layer.</summary>
    Task DropLayerAsync(string layer);

    /// <summary>Runs the step: dispatch, experts, combine. Never throws for step failures: the report says.</summary>
    Task<RankStepReport> RunStepAsync(string layer, StepTicket ticket, bool weighted);

    /// <summary>Aborts whatever the layer is running (its waits end at once with an error).</summary>
    [AlwaysInterleave]
    Task AbortAsync(string layer, long epoch, string reason);

    /// <summary>
    /// CUDA backend: this rank's NVSHMEM job lost a member (or is not the group's). NVSHMEM cannot be initialized twice
    /// in one process, so the silo process exits with <c>RankRuntime.RestartExitCode</c> (75) right after answering, for
    /// its supervisor to start it again; the fresh process joins the group's next NVSHMEM job.
    /// </summary>
    [AlwaysInterleave]
    Task RestartForFreshGpuJobAsync(string reason);
}

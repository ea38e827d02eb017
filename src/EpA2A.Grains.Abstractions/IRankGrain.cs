using Orleans.Concurrency;

namespace EpA2A.Grains;

/// <summary>
/// One rank of a group (key: "group/rank"), pinned to the silo whose metadata names that group and rank.
/// It hosts the rank's layers and their buffers; the <see cref="IExpertLayerGrain"/> drives it.
/// Calls that carry data for a running step interleave with it.
/// </summary>
public interface IRankGrain : IGrainWithStringKey
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

    /// <summary>A chunk of a message from another rank's layer (the CPU backend's transport across silos).</summary>
    [AlwaysInterleave]
    Task DeliverAsync(string layer, TransportChunk chunk);

    /// <summary>Announces what this rank dispatches in a step; chunks follow.</summary>
    [AlwaysInterleave]
    Task BeginInputAsync(string layer, StepInputHeader header);

    /// <summary>A chunk of one input array of a step.</summary>
    [AlwaysInterleave]
    Task StageInputAsync(string layer, long step, InputPart part, int offset, Immutable<byte[]> data);

    /// <summary>Runs the step: dispatch, experts, combine. Never throws for step failures: the report says.</summary>
    Task<RankStepReport> RunStepAsync(string layer, StepTicket ticket, bool weighted);

    /// <summary>A slice of the step's combined output, [n, Hidden] of the token type, as bytes.</summary>
    [AlwaysInterleave]
    Task<Immutable<byte[]>> ReadOutputAsync(string layer, long step, int offset, int count);

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

/// <summary>A piece of one transport message; a message larger than the chunk size crosses in several.</summary>
[GenerateSerializer]
[Immutable]
public sealed record TransportChunk(
    [property: Id(0)] long Epoch,
    [property: Id(1)] long Sequence,
    [property: Id(2)] int Phase,
    [property: Id(3)] int Source,
    [property: Id(4)] int Index,
    [property: Id(5)] int Count,
    [property: Id(6)] int TotalBytes,
    [property: Id(7)] Immutable<byte[]> Data);

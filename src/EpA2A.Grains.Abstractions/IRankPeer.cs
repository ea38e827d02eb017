using Orleans.Concurrency;

namespace EpA2A.Grains;

/// <summary>What another rank's layer asks of a rank (key: "group/rank"): the CPU backend's messages across silos.</summary>
public interface IRankPeer : IGrainWithStringKey
{
    /// <summary>A chunk of a message from another rank's layer (the CPU backend's transport across silos).</summary>
    [AlwaysInterleave]
    Task DeliverAsync(string layer, TransportChunk chunk);
}

/// <summary>
/// A piece of one transport message; a message larger than the chunk size crosses in several. Immutable, so a call inside
/// one silo hands the receiver the sender's view of its bytes (see <see cref="TransportChunkData"/>).
/// </summary>
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
    [property: Id(7)] TransportChunkData Data);

using Orleans.Concurrency;

namespace EpA2A.Grains;

/// <summary>
/// What a client (<see cref="ExpertLayerClient"/>) asks of a rank (key: "group/rank"): stage a step's inputs and read
/// its combined output. Every call interleaves with the running step. Each may be sent again when its answer is lost
/// (the client asks again): a header or a chunk repeated for the step being staged is taken as the one already staged,
/// one that arrives after its step ran is refused, and a read changes nothing.
/// </summary>
public interface IRankStaging : IGrainWithStringKey
{
    /// <summary>Announces what this rank dispatches in a step; chunks follow.</summary>
    [AlwaysInterleave]
    Task BeginInputAsync(string layer, StepInputHeader header);

    /// <summary>
    /// Announces what this rank dispatches in a step and stages every part whole: <see cref="BeginInputAsync"/> and one
    /// <see cref="StageInputAsync"/> per part in a single call, with the same checks.
    /// </summary>
    [AlwaysInterleave]
    Task StageStepInputAsync(string layer, StepInput input);

    /// <summary>A chunk of one input array of a step.</summary>
    [AlwaysInterleave]
    Task StageInputAsync(string layer, long step, InputPart part, int offset, Immutable<byte[]> data);

    /// <summary>A slice of the step's combined output, [n, Hidden] of the token type, as bytes.</summary>
    [AlwaysInterleave]
    Task<Immutable<byte[]>> ReadOutputAsync(string layer, long step, int offset, int count);
}

namespace EpA2A.Grains;

/// <summary>Which input array a staged chunk belongs to.</summary>
public enum InputPart
{
    /// <summary>Token rows, [n, Hidden] of the token type.</summary>
    Tokens = 0,

    /// <summary>Expert ids, [n, TopK] int32.</summary>
    ExpertIds = 1,

    /// <summary>Routing weights, [n, TopK] fp32.</summary>
    Weights = 2,

    /// <summary>Scatter indices, [n, TopK] int32.</summary>
    ScatterIndices = 3,
}

/// <summary>
/// What a rank will dispatch in a step, announced before its chunks arrive. <paramref name="Epoch"/> is the group
/// incarnation the step's ticket belongs to (0: not checked): a rank whose layer was re-formed since refuses the
/// input at once, so a stale client cannot overwrite the input of the step that is now in progress.
/// </summary>
[GenerateSerializer]
[Immutable]
public sealed record StepInputHeader(
    [property: Id(0)] long Step,
    [property: Id(1)] int Tokens,
    [property: Id(2)] bool HasWeights,
    [property: Id(3)] bool HasScatterIndices,
    [property: Id(4)] long Epoch = 0);

/// <summary>
/// A rank's whole input of a step in one message: the header and every announced part (an absent optional part is
/// empty). The client sends this when the parts fit in one chunk (the usual case) instead of the header and then a
/// chunk per part; each part's bytes are written onto the wire from the caller's array and land in one array on the
/// rank, which the layer reads in place: a token row is copied twice on its way in, once each side of the wire.
/// </summary>
[GenerateSerializer]
[Immutable]
public sealed record StepInput(
    [property: Id(0)] StepInputHeader Header,
    [property: Id(1)] ReadOnlyMemory<byte> Tokens,
    [property: Id(2)] ReadOnlyMemory<byte> ExpertIds,
    [property: Id(3)] ReadOnlyMemory<byte> Weights,
    [property: Id(4)] ReadOnlyMemory<byte> ScatterIndices);

/// <summary>How one rank's part of a step went.</summary>
[GenerateSerializer]
[Immutable]
public sealed record RankStepReport(
    [property: Id(0)] int Rank,
    [property: Id(1)] bool Succeeded,
    [property: Id(2)] string? Error,
    [property: Id(3)] int? BlamedRank,
    [property: Id(4)] int ReceivedRows,
    [property: Id(5)] int OutputBytes,
    [property: Id(6)] IReadOnlyDictionary<string, double> PhaseMicroseconds,
    [property: Id(7)] int MaskedSlots = 0);

/// <summary>
/// How a step went on every rank that ran it. <paramref name="MaskedRanks"/>: ranks the group was serving without (a
/// layer that masks lost ranks, see <see cref="LostRankPolicy.Mask"/>): they ran nothing, and the slots of every
/// rank's tokens that picked one of their experts were dropped (<paramref name="MaskedSlots"/> of them in all).
/// </summary>
[GenerateSerializer]
[Immutable]
public sealed record StepReport(
    [property: Id(0)] long Step,
    [property: Id(1)] long Epoch,
    [property: Id(2)] IReadOnlyList<RankStepReport> Ranks,
    [property: Id(3)] double CoordinatorMicroseconds,
    [property: Id(4)] IReadOnlyList<int>? MaskedRanks = null,
    [property: Id(5)] int MaskedSlots = 0);

/// <summary>Where a rank lives.</summary>
[GenerateSerializer]
[Immutable]
public sealed record RankInfo(
    [property: Id(0)] string Group,
    [property: Id(1)] int Rank,
    [property: Id(2)] string Silo,
    [property: Id(3)] int? Gpu,
    [property: Id(4)] EpBackendKind Backend,
    [property: Id(5)] int ProcessId,
    [property: Id(6)] bool GpuInitialized = false,
    [property: Id(7)] int StepsInFlight = 0,
    [property: Id(8)] string? GpuJob = null);

/// <summary>
/// Where a layer's coordinator lives, and its group's state; <see cref="DirectoryOwner"/> is the silo holding the
/// coordinator's grain-directory registration as the coordinator's silo sees it (null when Orleans does not say).
/// </summary>
[GenerateSerializer]
[Immutable]
public sealed record CoordinatorInfo(
    [property: Id(0)] string Group,
    [property: Id(1)] string Layer,
    [property: Id(2)] string Silo,
    [property: Id(3)] int ProcessId,
    [property: Id(4)] long Epoch,
    [property: Id(5)] long LastStep,
    [property: Id(6)] bool Formed,
    [property: Id(7)] long? StepInProgress,
    [property: Id(8)] string? ConfiguredBy = null,
    [property: Id(9)] string? DirectoryOwner = null);

/// <summary>The identity of a step: its number and the group incarnation it runs in.</summary>
[GenerateSerializer]
[Immutable]
public sealed record StepTicket(
    [property: Id(0)] long Step,
    [property: Id(1)] long Epoch,
    [property: Id(2)] IReadOnlyList<int>? MaskedRanks = null)
{
    /// <summary>Whether <paramref name="rank"/> runs this step (it is not masked).</summary>
    public bool Runs(int rank) => MaskedRanks is null || !MaskedRanks.Contains(rank);

    /// <summary>Equal step and epoch (the masked ranks follow from them).</summary>
    public bool Equals(StepTicket? other) => other is not null && other.Step == Step && other.Epoch == Epoch;

    /// <inheritdoc />
    public override int GetHashCode() => HashCode.Combine(Step, Epoch);
}

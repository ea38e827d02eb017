using Orleans.Concurrency;

namespace EpA2A.Grains;

/// <summary>
/// Coordinates one layer of a group (key: "group/layer"): forms the group, configures every rank, and runs
/// steps with a deadline. A step that fails anywhere fails everywhere, with an error naming the rank, and
/// the next step re-forms the group first.
/// </summary>
public interface IExpertLayerGrain : IGrainWithStringKey
{
    /// <summary>
    /// Forms the group: waits for every rank and creates the layer on each with <paramref name="spec"/>. The same spec
    /// from another client is a no-op (a formed group stays formed); from the client that configured it, it re-forms. A different spec while another client has begun a step within
    /// the step bound (twice the step deadline plus a second) is refused with <see cref="LayerSpecConflictException"/>
    /// unless <paramref name="takeOver"/> is set; that client's next step then fails by name.
    /// </summary>
    /// <param name="spec">The layer's configuration.</param>
    /// <param name="client">Who configures (named in the errors other clients see).</param>
    /// <param name="takeOver">Re-configure even while another client is stepping the layer.</param>
    Task ConfigureAsync(LayerSpec spec, string client, bool takeOver);

    /// <summary>
    /// Gives a coordinator that lost its state (activated anew after its silo, or the silo holding its directory entry,
    /// went away) the spec a client had configured, without forming the group: the client's next
    /// <see cref="BeginStepAsync"/> forms it, so a masking layer masks a rank lost with that silo in the same step
    /// instead of failing one step to form and another to mask. A coordinator that has a spec already keeps it (the
    /// client's step is then checked against it as usual).
    /// </summary>
    /// <param name="spec">The spec the client configured.</param>
    /// <param name="client">Who configured it.</param>
    Task RestoreAsync(LayerSpec spec, string client);

    /// <summary>The configuration, or null before <see cref="ConfigureAsync"/>. A read: it answers while a step or a re-formation is in progress.</summary>
    [AlwaysInterleave]
    Task<LayerSpec?> GetSpecAsync();

    /// <summary>Where this coordinator lives (silo, process) and the state of its group. A read that interleaves.</summary>
    [AlwaysInterleave]
    Task<CoordinatorInfo> DescribeAsync();

    /// <summary>
    /// Where every rank lives: the ranks that answer within the step deadline (a stalled or lost rank is left out). A read
    /// that interleaves, so it never holds up a step.
    /// </summary>
    [AlwaysInterleave]
    Task<IReadOnlyList<RankInfo>> DescribeGroupAsync();

    /// <summary>
    /// Reserves the next step (re-forming the group first if the last step failed). Refused with
    /// <see cref="InvalidOperationException"/> while another step is begun and not yet run or abandoned.
    /// </summary>
    /// <param name="expected">The spec the caller configured (or adopted): a step runs only under it. A layer re-configured
    /// since is refused with <see cref="LayerSpecConflictException"/> naming who re-configured it and what changed.</param>
    /// <param name="client">Who steps (a client that stepped recently holds the layer against re-configuration).</param>
    Task<StepTicket> BeginStepAsync(LayerSpec expected, string client);

    /// <summary>Gives up a step that could not start (a rank could not take its input); the next step re-forms the group.</summary>
    /// <param name="ticket">The step.</param>
    /// <param name="reason">Why (logged).</param>
    /// <param name="unreachable">Ranks that did not answer the caller at all (no answer in time, or unreachable): a masking
    /// layer masks them at once and re-forms on the others, so the next step does not wait on them again.</param>
    Task AbandonStepAsync(StepTicket ticket, string reason, IReadOnlyList<int>? unreachable = null);

    /// <summary>
    /// Runs a step on every rank once their inputs are staged; throws <see cref="GroupStepFailedException"/> on failure.
    /// Asked again for the step last run (or running), it answers with that step's outcome and runs nothing: a client
    /// whose answer was lost can ask again safely.
    /// </summary>
    Task<StepReport> RunStepAsync(StepTicket ticket, bool weighted);
}

/// <summary>A step through the grains failed; <see cref="BlamedRanks"/> are the ranks that caused it.</summary>
[GenerateSerializer]
[Alias("epa2a.GroupStepFailedException")]
public sealed class GroupStepFailedException : Exception
{
    /// <summary>Creates the exception.</summary>
    public GroupStepFailedException(string message, long step, int[] blamedRanks, Exception? inner = null)
        : base(message, inner)
    {
        Step = step;
        BlamedRanks = blamedRanks;
    }

    /// <summary>Creates the exception.</summary>
    public GroupStepFailedException()
    {
    }

    /// <summary>Creates the exception.</summary>
    public GroupStepFailedException(string message)
        : base(message)
    {
    }

    /// <summary>Creates the exception.</summary>
    public GroupStepFailedException(string message, Exception inner)
        : base(message, inner)
    {
    }

    /// <summary>The step that failed.</summary>
    [Id(0)]
    public long Step { get; private set; }

    /// <summary>The ranks held responsible (missing, late, or with bad input).</summary>
    [Id(1)]
    public int[] BlamedRanks { get; private set; } = [];
}

/// <summary>
/// The layer's spec is not the caller's: it was re-configured by another client (named in the message) since the caller
/// configured it, or a re-configuration was refused because another client is stepping the layer. Retrying cannot cure
/// it: configure again (taking the layer over) to step with the new spec.
/// </summary>
[GenerateSerializer]
[Alias("epa2a.LayerSpecConflictException")]
public sealed class LayerSpecConflictException : Exception
{
    /// <summary>Creates the exception.</summary>
    public LayerSpecConflictException(string message, string? configuredBy)
        : base(message) => ConfiguredBy = configuredBy;

    /// <summary>Creates the exception.</summary>
    public LayerSpecConflictException()
    {
    }

    /// <summary>Creates the exception.</summary>
    public LayerSpecConflictException(string message)
        : base(message)
    {
    }

    /// <summary>Creates the exception.</summary>
    public LayerSpecConflictException(string message, Exception inner)
        : base(message, inner)
    {
    }

    /// <summary>The client that configured the layer's current spec, when known.</summary>
    [Id(0)]
    public string? ConfiguredBy { get; private set; }
}

/// <summary>No active silo carries the metadata of the rank a grain is for.</summary>
[GenerateSerializer]
[Alias("epa2a.NoSiloForRankException")]
public sealed class NoSiloForRankException : Exception
{
    /// <summary>Creates the exception.</summary>
    public NoSiloForRankException(string message, int rank)
        : base(message) => Rank = rank;

    /// <summary>Creates the exception.</summary>
    public NoSiloForRankException()
    {
    }

    /// <summary>Creates the exception.</summary>
    public NoSiloForRankException(string message)
        : base(message)
    {
    }

    /// <summary>Creates the exception.</summary>
    public NoSiloForRankException(string message, Exception inner)
        : base(message, inner)
    {
    }

    /// <summary>The rank with no silo.</summary>
    [Id(0)]
    public int Rank { get; private set; } = -1;
}

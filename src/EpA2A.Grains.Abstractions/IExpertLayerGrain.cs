namespace EpA2A.Grains;

/// <summary>
/// Coordinates one layer of a group (key: "group/layer"): forms the group, configures every rank, and runs
/// steps with a deadline. A step that fails anywhere fails everywhere, with an error naming the rank, and
/// the next step re-forms the group first.
/// </summary>
public interface IExpertLayerGrain : IGrainWithStringKey
{
    /// <summary>Forms the group: waits for every rank and creates the layer on each with <paramref name="spec"/>.</summary>
    Task ConfigureAsync(LayerSpec spec);

    /// <summary>The configuration, or null before <see cref="ConfigureAsync"/>.</summary>
    Task<LayerSpec?> GetSpecAsync();

    /// <summary>Where this coordinator lives (silo, process) and the state of its group.</summary>
    Task<CoordinatorInfo> DescribeAsync();

    /// <summary>Where every rank lives.</summary>
    Task<IReadOnlyList<RankInfo>> DescribeGroupAsync();

    /// <summary>
    /// Reserves the next step (re-forming the group first if the last step failed). Refused with
    /// <see cref="InvalidOperationException"/> while another step is begun and not yet run or abandoned.
    /// </summary>
    Task<StepTicket> BeginStepAsync();

    /// <summary>Gives up a step that could not start (a rank could not take its input); the next step re-forms the group.</summary>
    Task AbandonStepAsync(StepTicket ticket, string reason);

    /// <summary>Runs a step on every rank once their inputs are staged; throws <see cref="GroupStepFailedException"/> on failure.</summary>
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

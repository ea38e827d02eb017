namespace EpA2A.Errors;

/// <summary>A collective step could not complete. The step is over on this rank; the layer stays usable.</summary>
public class EpStepFailedException : Exception
{
    /// <summary>Creates the exception.</summary>
    public EpStepFailedException(string message, int? rank = null, Exception? inner = null)
        : base(message, inner) => Rank = rank;

    /// <summary>Creates the exception.</summary>
    public EpStepFailedException()
    {
    }

    /// <summary>Creates the exception.</summary>
    public EpStepFailedException(string message)
        : base(message)
    {
    }

    /// <summary>Creates the exception.</summary>
    public EpStepFailedException(string message, Exception inner)
        : base(message, inner)
    {
    }

    /// <summary>The rank held responsible (missing, late or aborting), when one is known.</summary>
    public int? Rank { get; }
}

/// <summary>A peer did not arrive before the step's deadline.</summary>
public sealed class EpStepTimeoutException : EpStepFailedException
{
    /// <summary>Creates the exception.</summary>
    public EpStepTimeoutException(string message, int rank)
        : base(message, rank)
    {
    }
}

/// <summary>Another rank aborted the step (bad input there, or an abort requested by the coordinator).</summary>
public sealed class EpStepAbortedException : EpStepFailedException
{
    /// <summary>Creates the exception.</summary>
    public EpStepAbortedException(string message, int rank)
        : base(message, rank)
    {
    }
}

/// <summary>The ranks of a group were configured differently; detected collectively at the counts exchange.</summary>
public sealed class EpConfigMismatchException : EpStepFailedException
{
    /// <summary>Creates the exception.</summary>
    public EpConfigMismatchException(string message)
        : base(message, rank: null)
    {
    }
}

using Orleans.Runtime;

namespace EpA2A.Silo.Hosting;

/// <summary>
/// Replaces Orleans' fatal-error handler (which ends the process at once) in a silo that restarts its host in
/// process: a silo the cluster declared dead (paused, or cut off, past the probe limit) reports it here, and the
/// command stops this host and starts a new one, which the cluster admits as a new member.
/// </summary>
public sealed class DeclaredDeadSignal : IFatalErrorHandler
{
    private readonly TaskCompletionSource<string> fatal = new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <summary>Completes with what Orleans said when it gave this silo up.</summary>
    public Task<string> Task => fatal.Task;

    /// <inheritdoc />
    public bool IsUnexpected(Exception exception) => exception is not OperationCanceledException;

    /// <inheritdoc />
    public void OnFatalException(object? sender = null, string? context = null, Exception? exception = null) =>
        fatal.TrySetResult((context ?? exception?.Message ?? "a fatal error").ReplaceLineEndings(" "));
}

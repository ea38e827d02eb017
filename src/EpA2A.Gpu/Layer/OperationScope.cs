using EpA2A.Config;

namespace EpA2A.Layer;

/// <summary>
/// One collective operation's deadline and cancellation: the <see cref="OperationContext"/> a backend waits
/// with, and the token sources behind it (disposed with the scope). Shared by both layers.
/// </summary>
internal sealed class OperationScope : IDisposable
{
    private readonly CancellationTokenSource deadline;
    private readonly CancellationTokenSource linked;

    public OperationScope(EpConfig config, long epoch, TimeSpan timeout, long sequence, CancellationToken caller)
    {
        deadline = new CancellationTokenSource(timeout);
        linked = CancellationTokenSource.CreateLinkedTokenSource(deadline.Token, caller);
        Operation = new OperationContext(config, epoch, sequence, timeout, deadline.Token, linked.Token);
    }

    public OperationContext Operation { get; }

    public void Dispose()
    {
        linked.Dispose();
        deadline.Dispose();
    }
}

namespace EpA2A.Transport;

/// <summary>
/// Point-to-point messages between the ranks of one layer (the CPU backend's fabric). Sends never block on
/// the receiver; receives wait until the message arrives or the token is cancelled (the step's deadline).
/// </summary>
public interface IRankTransport
{
    /// <summary>Sends <paramref name="payload"/> to <paramref name="destination"/>; ownership of the array passes to the transport.</summary>
    ValueTask SendAsync(int destination, MessageTag tag, byte[] payload, CancellationToken cancellationToken);

    /// <summary>The message from <paramref name="source"/> with <paramref name="tag"/>.</summary>
    ValueTask<byte[]> ReceiveAsync(int source, MessageTag tag, CancellationToken cancellationToken);

    /// <summary>Drops every buffered message of operations before <paramref name="sequence"/> (or of older epochs).</summary>
    void DiscardBefore(long epoch, long sequence);
}

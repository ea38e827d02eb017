namespace EpA2A.Transport;

/// <summary>
/// Point-to-point messages between the ranks of one layer (the CPU backend's fabric). Sends never block on
/// the receiver; receives wait until the message arrives or the token is cancelled (the step's deadline).
/// </summary>
public interface IRankTransport
{
    /// <summary>
    /// Sends <paramref name="message"/> to <paramref name="destination"/>. Ownership passes to the transport at the call: the
    /// caller does not touch the buffer again (see <see cref="TransportBuffer"/> for who releases it and when).
    /// </summary>
    ValueTask SendAsync(int destination, MessageTag tag, TransportBuffer message, CancellationToken cancellationToken);

    /// <summary>The message from <paramref name="source"/> with <paramref name="tag"/>; the caller owns it and releases it after its last read.</summary>
    ValueTask<TransportBuffer> ReceiveAsync(int source, MessageTag tag, CancellationToken cancellationToken);

    /// <summary>Drops every buffered message of operations before <paramref name="sequence"/> (or of older epochs).</summary>
    void DiscardBefore(long epoch, long sequence);
}

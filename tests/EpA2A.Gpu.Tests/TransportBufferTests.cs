using System.Runtime.InteropServices;
using EpA2A.Config;
using EpA2A.Errors;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Transport;

namespace EpA2A.Tests;

/// <summary>
/// The ownership rule of pooled transport buffers (see <see cref="TransportBuffer"/>): one owner, released once, after
/// its last read. A release that comes too early must be loud: the buffer is unreachable and (in the test build) its
/// bytes are poisoned, so the reference comparisons of every CPU-backend test would fail on a reader that kept a span.
/// </summary>
public sealed class TransportBufferTests
{
    [Fact]
    public void The_test_build_poisons_released_buffers_so_an_early_release_corrupts_what_a_late_reader_sees()
    {
        // Every reference test relies on this: without it an early release could go unnoticed until the array is reused.
        Assert.True(TransportBuffer.PoisonsOnRelease, "the tests run with poisoning on (Debug build or EpA2A.Transport.PoisonReleasedBuffers)");
        int seed = Random.Shared.Next();
        byte[] data = new byte[1000];
        new Random(seed).NextBytes(data);
        TransportBuffer buffer = TransportBuffer.CopyOf(data);
        Assert.True(MemoryMarshal.TryGetArray<byte>(buffer.Memory, out ArraySegment<byte> kept), $"seed {seed}");

        buffer.Release();

        Assert.True(buffer.IsReleased);
        Assert.All(kept, b => Assert.Equal(TransportBuffer.PoisonByte, b));
    }

    [Fact]
    public void A_released_buffer_can_be_neither_read_nor_released_again()
    {
        TransportBuffer buffer = TransportBuffer.Rent(64);
        buffer.Release();

        ObjectDisposedException read = Assert.Throws<ObjectDisposedException>(() => buffer.Span.Length);
        Assert.Contains("read after its owner released it", read.Message, StringComparison.Ordinal);
        Assert.Throws<ObjectDisposedException>(() => buffer.Memory.Length);
        InvalidOperationException twice = Assert.Throws<InvalidOperationException>(buffer.Release);
        Assert.Contains("released twice", twice.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_rented_buffer_has_the_asked_length_whatever_the_pooled_array_holds()
    {
        foreach (int length in new[] { 0, 1, 17, 4096, 300_000, TransportBuffer.MaxPooledBytes + 1 })
        {
            TransportBuffer buffer = TransportBuffer.Rent(length);
            Assert.Equal(length, buffer.Length);
            Assert.Equal(length, buffer.Span.Length);
            buffer.Release();
        }
    }

    [Fact(Timeout = 30_000)]
    public async Task A_sender_that_releases_a_message_after_handing_it_over_fails_the_step_instead_of_delivering_freed_bytes()
    {
        int seed = Random.Shared.Next();
        EpConfig config = new(maxTokens: 16, hidden: 64, topK: 2, numExperts: 8, rank: 0, worldSize: 4, localWorldSize: 4);
        GroupStep<BFloat16> step = GroupStep<BFloat16>.Draw(config, seed);
        InProcessFabric fabric = new(config.WorldSize);
        EpAll2AllLayer[] layers = [.. Enumerable.Range(0, config.WorldSize).Select(r => EpAll2AllLayer.CreateCpu(
            config.ForRank(r), new ReleasesAfterSending(fabric.TransportFor(r)), new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(5) }))];
        try
        {
            Exception e = await Assert.ThrowsAnyAsync<Exception>(() => step.DispatchAllAsync(layers).WaitAsync(TestContext.Current.CancellationToken));

            // A read of a released buffer, or (had a reader been quicker than the release) poisoned bytes that fail the
            // message checks, or the second release of a buffer the receiver had released: never a result.
            Assert.True(e is ObjectDisposedException or InvalidDataException or InvalidOperationException or EpConfigMismatchException, $"seed {seed}: {e}");
        }
        finally
        {
            foreach (EpAll2AllLayer layer in layers)
            {
                layer.Dispose();
            }
        }
    }

    /// <summary>The bug the ownership rule forbids: the sender keeps treating a message it sent as its own.</summary>
    private sealed class ReleasesAfterSending(IRankTransport inner) : IRankTransport
    {
        public async ValueTask SendAsync(int destination, MessageTag tag, TransportBuffer message, CancellationToken cancellationToken)
        {
            await inner.SendAsync(destination, tag, message, cancellationToken);
            message.Release();
        }

        public ValueTask<TransportBuffer> ReceiveAsync(int source, MessageTag tag, CancellationToken cancellationToken) =>
            inner.ReceiveAsync(source, tag, cancellationToken);

        public void DiscardBefore(long epoch, long sequence) => inner.DiscardBefore(epoch, sequence);
    }
}

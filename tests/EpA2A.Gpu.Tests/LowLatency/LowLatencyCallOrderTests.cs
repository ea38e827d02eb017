using System.Numerics.Tensors;
using EpA2A.Layer;
using EpA2A.LowLatency;
using EpA2A.Numerics;

namespace EpA2A.Tests.LowLatency;

/// <summary>
/// The call order per rank is DispatchSend, DispatchReceive, CombineSend, CombineReceive: anything else is an
/// InvalidOperationException before anything is sent, and the step then completes as if the wrong call had not been made.
/// </summary>
public sealed class LowLatencyCallOrderTests
{
    [Fact]
    public async Task Every_call_out_of_order_is_refused_and_the_split_step_then_matches_the_reference()
    {
        LowLatencyStep step = LowLatencyStep.Draw(Environment.TickCount, fp8: true);
        CancellationToken ct = TestContext.Current.CancellationToken;
        using InProcessLowLatencyGroup group = new(step.Config, LowLatencyBadInputTests.Options());
        EpLowLatencyLayer layer0 = group.Layers[0];

        await AssertOrderAsync(() => layer0.DispatchReceiveAsync(ct).AsTask(), "needs a dispatch send first");
        await AssertOrderAsync(() => layer0.CombineReceiveAsync(ct).AsTask(), "needs a combine send first");

        await group.RunAsync((l, r) => l.DispatchSendAsync(step.X(r), step.Ids(r), step.Weights(r), step.Format, ct));
        await AssertOrderAsync(() => layer0.DispatchSendAsync(step.X(0), step.Ids(0), step.Weights(0), step.Format, ct).AsTask(), "starts a step");
        await AssertOrderAsync(() => layer0.DispatchAsync(step.X(0), step.Ids(0), step.Weights(0), step.Format, ct).AsTask(), "starts a step");

        LowLatencyDispatchResult[] got = await group.RunAsync((l, r) => l.DispatchReceiveAsync(ct));
        for (int r = 0; r < got.Length; r++)
        {
            step.AssertDispatch(r, got[r]);
        }

        await AssertOrderAsync(() => layer0.DispatchReceiveAsync(ct).AsTask(), "needs a dispatch send first");
        await AssertOrderAsync(() => layer0.CombineReceiveAsync(ct).AsTask(), "needs a combine send first");

        await group.RunAsync((l, r) => l.CombineSendAsync(step.ExpertOutput(r), got[r].Handle, cancellationToken: ct));
        await AssertOrderAsync(() => layer0.CombineSendAsync(step.ExpertOutput(0), got[0].Handle, cancellationToken: ct).AsTask(), "needs the step's dispatch receive first");
        await AssertOrderAsync(() => layer0.DispatchSendAsync(step.X(0), step.Ids(0), step.Weights(0), step.Format, ct).AsTask(), "starts a step");

        Tensor<BFloat16>[] combined = await group.RunAsync((l, r) => l.CombineReceiveAsync(ct));
        for (int r = 0; r < combined.Length; r++)
        {
            step.AssertCombine(r, combined[r]);
        }

        // The step is over: its handle cannot be combined again, and the next step runs normally.
        await AssertOrderAsync(() => layer0.CombineAsync(step.ExpertOutput(0), got[0].Handle, cancellationToken: ct).AsTask(), "needs the step's dispatch receive first");
        await step.RunAsync(group);
        Assert.Equal(0, group.Fabric.PendingMessages);
    }

    [Fact]
    public async Task A_second_call_while_one_is_waiting_is_refused_and_the_waiting_one_still_completes()
    {
        LowLatencyStep step = LowLatencyStep.Draw(Environment.TickCount);
        CancellationToken ct = TestContext.Current.CancellationToken;
        using InProcessLowLatencyGroup group = new(step.Config, LowLatencyBadInputTests.Options());
        await group.Layers[0].DispatchSendAsync(step.X(0), step.Ids(0), step.Weights(0), step.Format, ct);
        Task<LowLatencyDispatchResult> waiting = group.Layers[0].DispatchReceiveAsync(ct).AsTask();

        InvalidOperationException e = await Assert.ThrowsAsync<InvalidOperationException>(() => group.Layers[0].DispatchReceiveAsync(ct).AsTask());
        Assert.Contains("must not overlap", e.Message, StringComparison.Ordinal);
        Assert.False(waiting.IsCompleted);

        LowLatencyDispatchResult[] rest = await Task.WhenAll(Enumerable.Range(1, step.Config.WorldSize - 1).Select(r =>
            Task.Run(() => step.DispatchAsync(group.Layers[r], r, ct).AsTask(), ct)));
        step.AssertDispatch(0, await waiting);
        for (int r = 1; r < step.Config.WorldSize; r++)
        {
            step.AssertDispatch(r, rest[r - 1]);
        }
    }

    [Fact]
    public async Task The_device_api_is_refused_on_the_cpu_backend_which_offers_its_combine_buffer_on_the_host()
    {
        LowLatencyStep step = LowLatencyStep.Draw(Environment.TickCount);
        CancellationToken ct = TestContext.Current.CancellationToken;
        using InProcessLowLatencyGroup group = new(step.Config, LowLatencyBadInputTests.Options());
        EpLowLatencyLayer layer = group.Layers[0];
        DeviceTensor<BFloat16> x = new(0x1000, [1, step.Config.Hidden]);
        DeviceTensor<int> ids = new(0x2000, [1, step.Config.TopK]);

        await Assert.ThrowsAsync<NotSupportedException>(() => layer.DispatchOnDeviceAsync(x, ids, cancellationToken: ct).AsTask());
        await Assert.ThrowsAsync<NotSupportedException>(() => layer.DispatchSendOnDeviceAsync(x, ids, cancellationToken: ct).AsTask());
        await Assert.ThrowsAsync<NotSupportedException>(() => layer.DispatchReceiveOnDeviceAsync(ct).AsTask());
        await Assert.ThrowsAsync<NotSupportedException>(() => layer.CombineReceiveOnDeviceAsync(ct).AsTask());
        Assert.Throws<NotSupportedException>(() => layer.DeviceCombineBuffer);
        Assert.Equal([step.Config.ExpertsPerRank, step.Config.WorldSize * step.Config.MaxTokens, step.Config.Hidden], layer.CombineBuffer.Lengths.ToArray().Select(l => (int)l));
        Assert.Equal("cpu", layer.BackendName);

        // Nothing above used up a step.
        await step.RunAsync(group);
    }

    private static async Task AssertOrderAsync(Func<Task> call, string rule)
    {
        InvalidOperationException e = await Assert.ThrowsAsync<InvalidOperationException>(call);
        Assert.Contains(rule, e.Message, StringComparison.Ordinal);
    }
}

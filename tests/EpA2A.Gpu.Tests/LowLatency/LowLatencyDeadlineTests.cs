using System.Diagnostics;
using EpA2A.Errors;
using EpA2A.LowLatency;

namespace EpA2A.Tests.LowLatency;

/// <summary>
/// A rank that never calls makes every other rank's receive fail within the deadline with an
/// <see cref="EpStepTimeoutException"/> naming it, in each phase; the group comes back in step once the late rank has
/// made up the calls it missed.
/// </summary>
[Collection(RunsAlone.Name)]
public sealed class LowLatencyDeadlineTests
{
    private const int Missing = 2;
    private const int TestTimeoutMs = 15_000;
    private static readonly TimeSpan Deadline = TimeSpan.FromMilliseconds(300);

    [Theory(Timeout = TestTimeoutMs)]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Dispatch_without_one_rank_times_out_within_the_deadline_naming_it(bool split)
    {
        LowLatencyStep step = LowLatencyStep.Draw(Environment.TickCount, fp8: split);
        CancellationToken ct = TestContext.Current.CancellationToken;
        using InProcessLowLatencyGroup group = new(step.Config, Options());
        await EveryOtherRankTimesOutAsync(step, "LowLatencyDispatch", async (l, r) =>
        {
            if (split)
            {
                await l.DispatchSendAsync(step.X(r), step.Ids(r), step.Weights(r), step.Format, ct);
                await l.DispatchReceiveAsync(ct);
            }
            else
            {
                await step.DispatchAsync(l, r, ct);
            }
        }, group, ct);
    }

    [Theory(Timeout = TestTimeoutMs)]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Combine_without_one_rank_times_out_within_the_deadline_naming_it(bool split)
    {
        LowLatencyStep step = LowLatencyStep.Draw(Environment.TickCount);
        CancellationToken ct = TestContext.Current.CancellationToken;
        using InProcessLowLatencyGroup group = new(step.Config, Options());
        LowLatencyDispatchResult[] got = await group.RunAsync((l, r) => step.DispatchAsync(l, r, ct));
        await EveryOtherRankTimesOutAsync(step, "LowLatencyCombine", async (l, r) =>
        {
            if (split)
            {
                await l.CombineSendAsync(step.ExpertOutput(r), got[r].Handle, cancellationToken: ct);
                await l.CombineReceiveAsync(ct);
            }
            else
            {
                await step.CombineAsync(l, r, got[r], ct);
            }
        }, group, ct);
    }

    [Fact(Timeout = TestTimeoutMs)]
    public async Task A_late_rank_that_makes_up_the_missed_step_brings_the_group_back_in_step()
    {
        LowLatencyStep step = LowLatencyStep.Draw(Environment.TickCount);
        CancellationToken ct = TestContext.Current.CancellationToken;
        using InProcessLowLatencyGroup group = new(step.Config, Options());
        await EveryOtherRankTimesOutAsync(step, "LowLatencyDispatch", async (l, r) => await step.DispatchAsync(l, r, ct), group, ct);

        // The late rank's dispatch finds what its peers sent before they gave up; its combine then waits for peers that
        // left the step, and times out naming them.
        EpLowLatencyLayer late = group.Layers[Missing];
        LowLatencyDispatchResult dispatched = await step.DispatchAsync(late, Missing, ct);
        step.AssertDispatch(Missing, dispatched);
        Stopwatch clock = Stopwatch.StartNew();
        EpStepTimeoutException e = await Assert.ThrowsAsync<EpStepTimeoutException>(() => step.CombineAsync(late, Missing, dispatched, ct).AsTask());
        AssertWithinDeadline(clock.Elapsed, $"seed {step.Seed}: late rank");
        Assert.True(e.Rank is 0 or 1, $"seed {step.Seed}: the late rank blames rank {e.Rank}: {e.Message}");

        await step.RunAsync(group);
        await LowLatencyStep.Draw(step.Seed + 1, fp8: true).RunAsync(group);
        Assert.Equal(0, group.Fabric.PendingMessages);
    }

    [Fact(Timeout = TestTimeoutMs)]
    public async Task A_cancelled_receive_ends_the_step_on_that_rank_without_waiting_for_the_deadline()
    {
        LowLatencyStep step = LowLatencyStep.Draw(Environment.TickCount);
        using InProcessLowLatencyGroup group = new(step.Config, new EpLowLatencyOptions { StepTimeout = TimeSpan.FromSeconds(30) });
        using CancellationTokenSource cancel = new(TimeSpan.FromMilliseconds(100));
        Stopwatch clock = Stopwatch.StartNew();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => step.DispatchAsync(group.Layers[0], 0, cancel.Token).AsTask());
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(5), $"cancellation took {clock.Elapsed}");

        // The step is over on rank 0: it starts the next with a dispatch send.
        InvalidOperationException e = await Assert.ThrowsAsync<InvalidOperationException>(() => group.Layers[0].DispatchReceiveAsync(TestContext.Current.CancellationToken).AsTask());
        Assert.Contains("needs a dispatch send first", e.Message, StringComparison.Ordinal);
    }

    private static EpLowLatencyOptions Options() => new() { StepTimeout = Deadline };

    private static async Task EveryOtherRankTimesOutAsync(LowLatencyStep step, string phase, Func<EpLowLatencyLayer, int, Task> call, InProcessLowLatencyGroup group, CancellationToken ct)
    {
        int[] present = [.. Enumerable.Range(0, step.Config.WorldSize).Where(r => r != Missing)];
        TimeSpan[] elapsed = await Task.WhenAll(present.Select(r => Task.Run(
            async () =>
            {
                Stopwatch clock = Stopwatch.StartNew();
                EpStepTimeoutException e = await Assert.ThrowsAsync<EpStepTimeoutException>(() => call(group.Layers[r], r).WaitAsync(ct));
                Assert.True(e.Rank == Missing, $"seed {step.Seed}: rank {r} blames rank {e.Rank}: {e.Message}");
                Assert.Contains($"rank {Missing} did not deliver {phase}", e.Message, StringComparison.Ordinal);
                return clock.Elapsed;
            },
            ct)));
        for (int i = 0; i < present.Length; i++)
        {
            AssertWithinDeadline(elapsed[i], $"seed {step.Seed}: rank {present[i]}");
        }
    }

    private static void AssertWithinDeadline(TimeSpan elapsed, string who) =>
        Assert.True(elapsed > Deadline * 0.8 && elapsed < Deadline * 3, $"{who} gave up after {elapsed.TotalMilliseconds:0} ms; the deadline is {Deadline.TotalMilliseconds:0} ms");
}

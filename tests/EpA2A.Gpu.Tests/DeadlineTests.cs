using System.Diagnostics;
using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Errors;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Reference;
using EpA2A.Transport;

namespace EpA2A.Tests;

/// <summary>The deadline tests measure wall time, so they run alone, after the parallel tests.</summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class RunsAlone
{
    public const string Name = "deadlines";
}

/// <summary>
/// Nothing hangs (BRIEF §4): a rank that does not arrive makes every waiting rank fail within the step
/// deadline with an <see cref="EpStepTimeoutException"/> naming it, for every collective operation.
/// Operations are numbered per layer and a number is used up by every call that gets past validation, so a
/// rank that missed an operation is one behind its peers: the group comes back in step when that rank makes
/// up the missed call (which fails too), or as a new incarnation (a new epoch, as the cluster re-forms it).
/// </summary>
[Collection(RunsAlone.Name)]
public sealed class DeadlineTests
{
    private const int World = 3;
    private const int Missing = 2;

    /// <summary>A bound on each test, so a deadline that is not kept fails the test instead of hanging the run.</summary>
    private const int TestTimeoutMs = 15_000;
    private static readonly TimeSpan Deadline = TimeSpan.FromMilliseconds(300);

    [Fact(Timeout = TestTimeoutMs)]
    public async Task Dispatch_without_one_rank_times_out_within_the_deadline_on_every_other_rank_naming_it()
    {
        GroupStep<BFloat16> step = Draw(out int seed);
        using InProcessGroup group = new(step.Config, Options());

        await AssertEveryOtherRankTimesOutAsync(group, "Counts", seed, (layer, r) => step.DispatchAsync(layer, r).AsTask(), TestContext.Current.CancellationToken);
    }

    [Fact(Timeout = TestTimeoutMs)]
    public async Task Combine_without_one_rank_times_out_within_the_deadline_on_every_other_rank_naming_it()
    {
        GroupStep<BFloat16> step = Draw(out int seed);
        using InProcessGroup group = new(step.Config, Options());
        DispatchResult<BFloat16>[] got = await step.DispatchAllAsync(group);
        step.AssertDispatch(got);
        BFloat16[][] expertOut = step.ExpertOutputs(got);

        await AssertEveryOtherRankTimesOutAsync(group, "CombineRows", seed, (layer, r) =>
            layer.CombineAsync(Tensor.Create(expertOut[r], [got[r].Layout.RecvRows, step.Config.Hidden]), got[r].Layout).AsTask(), TestContext.Current.CancellationToken);
    }

    [Theory(Timeout = TestTimeoutMs)]
    [InlineData(false)]
    [InlineData(true)]
    public async Task A_barrier_without_one_rank_times_out_within_the_deadline_on_every_other_rank_naming_it(bool intraNodeOnly)
    {
        GroupStep<BFloat16> step = Draw(out int seed);
        using InProcessGroup group = new(step.Config, Options());

        await AssertEveryOtherRankTimesOutAsync(group, "Barrier", seed, (layer, r) => layer.BarrierAllAsync(intraNodeOnly).AsTask(), TestContext.Current.CancellationToken);
    }

    [Fact(Timeout = TestTimeoutMs)]
    public async Task An_intra_node_barrier_waits_for_its_own_node_only()
    {
        EpConfig config = new(maxTokens: 4, hidden: 4, topK: 2, numExperts: 4, rank: 0, worldSize: 4, localWorldSize: 2);
        using InProcessGroup group = new(config, Options());

        // Node 0 (ranks 0 and 1) passes its barrier while node 1 is absent ...
        await GroupStep<BFloat16>.OnEveryRankAsync([group.Layers[0], group.Layers[1]], async (layer, r) =>
        {
            await layer.BarrierAllAsync(intraNodeOnly: true);
            return r;
        });

        // ... and rank 2 waits for rank 3, its node peer, not for node 0.
        Stopwatch clock = Stopwatch.StartNew();
        EpStepTimeoutException e = await Assert.ThrowsAsync<EpStepTimeoutException>(() => group.Layers[2].BarrierAllAsync(intraNodeOnly: true, TestContext.Current.CancellationToken).AsTask());
        AssertWithinDeadline(clock.Elapsed, "rank 2's intra-node barrier");
        Assert.Equal(3, e.Rank);
        Assert.Contains("rank 3 did not deliver Barrier", e.Message, StringComparison.Ordinal);
    }

    [Fact(Timeout = TestTimeoutMs)]
    public async Task A_late_rank_that_makes_up_the_missed_dispatch_brings_the_group_back_in_step()
    {
        GroupStep<BFloat16> step = Draw(out int seed);
        using InProcessGroup group = new(step.Config, Options());
        await AssertEveryOtherRankTimesOutAsync(group, "Counts", seed, (layer, r) => step.DispatchAsync(layer, r).AsTask(), TestContext.Current.CancellationToken);

        // The late rank's dispatch is the same operation its peers gave up on: it fails too, naming them.
        Stopwatch clock = Stopwatch.StartNew();
        EpStepTimeoutException late = await Assert.ThrowsAsync<EpStepTimeoutException>(() => step.DispatchAsync(group.Layers[Missing], Missing).AsTask());
        AssertWithinDeadline(clock.Elapsed, $"seed {seed}: late rank {Missing}");
        Assert.True(late.Rank is 0 or 1, $"seed {seed}: the late rank blames rank {late.Rank}: {late.Message}");
        Assert.Contains("ranks 0, 1 did not deliver", late.Message, StringComparison.Ordinal);

        // Now every rank has used the same operation numbers: the next steps work and leave nothing behind.
        await step.RunAsync(group);
        await Draw(out _, weights: true).RunAsync(group);
        Assert.Equal(0, group.Fabric.PendingMessages);
    }

    [Fact(Timeout = TestTimeoutMs)]
    public async Task A_rank_that_skips_a_step_never_makes_its_peers_mix_two_steps()
    {
        GroupStep<BFloat16> step = Draw(out int seed);
        using InProcessGroup group = new(step.Config, Options());
        await AssertEveryOtherRankTimesOutAsync(group, "Counts", seed, (layer, r) => step.DispatchAsync(layer, r).AsTask(), TestContext.Current.CancellationToken);

        // Everyone calls the next step; the rank that skipped one is an operation behind. Whatever the layer
        // makes of that, no rank may return rows that differ from the reference's.
        GroupStep<BFloat16> next = GroupStep<BFloat16>.Draw(step.Config, seed + 1, weights: true);
        Task<DispatchResult<BFloat16>>[] tasks = [.. group.Layers.Select((layer, r) => Task.Run(() => next.DispatchAsync(layer, r).AsTask(), TestContext.Current.CancellationToken))];
        await Task.WhenAll(tasks).ContinueWith(_ => { }, TestContext.Current.CancellationToken, TaskContinuationOptions.None, TaskScheduler.Default);
        for (int r = 0; r < World; r++)
        {
            if (tasks[r].IsCompletedSuccessfully)
            {
                DispatchResult<BFloat16>[] one = [.. Enumerable.Range(0, World).Select(i => i == r ? tasks[r].Result : null!)];
                AssertRankMatches(next, one, r);
            }
            else
            {
                Assert.True(tasks[r].Exception?.InnerException is EpStepFailedException, $"seed {seed}: rank {r} failed with {tasks[r].Exception?.InnerException}");
            }
        }
    }

    [Fact(Timeout = TestTimeoutMs)]
    public async Task A_new_epoch_on_the_same_fabric_steps_normally_after_a_timeout_and_drops_the_stale_messages()
    {
        GroupStep<BFloat16> step = Draw(out int seed);
        InProcessFabric fabric = new(World);
        EpAll2AllLayer[] first = Layers(fabric, step.Config, epoch: 0);
        try
        {
            Task<DispatchResult<BFloat16>>[] waiting = [.. Enumerable.Range(0, World - 1).Select(r => Task.Run(() => step.DispatchAsync(first[r], r).AsTask(), TestContext.Current.CancellationToken))];
            foreach (Task<DispatchResult<BFloat16>> t in waiting)
            {
                await Assert.ThrowsAsync<EpStepTimeoutException>(() => t);
            }

            // What the ranks that gave up sent to the absent rank is still buffered for it.
            Assert.True(fabric.PendingMessages > 0, "expected the abandoned counts to be buffered");
        }
        finally
        {
            Array.ForEach(first, l => l.Dispose());
        }

        EpAll2AllLayer[] second = Layers(fabric, step.Config, epoch: 1);
        try
        {
            await step.RunAsync(second);
            Assert.Equal(0, fabric.PendingMessages);
        }
        finally
        {
            Array.ForEach(second, l => l.Dispose());
        }
    }

    /// <summary>
    /// A late rank's counts exchange completes with what its peers sent before they gave up, so it learns that
    /// step's receive sizes. Growth must stay collective all the same (symmetric buffers on the GPU backend): the late
    /// rank fails without growing, and once it has made up the missed operation the group grows together.
    /// </summary>
    [Fact(Timeout = TestTimeoutMs)]
    public async Task A_late_rank_does_not_grow_its_buffers_alone_from_a_step_its_peers_abandoned()
    {
        int seed = Random.Shared.Next();
        EpConfig config = new(maxTokens: 16, hidden: 8, topK: 2, numExperts: 6, rank: 0, worldSize: World, localWorldSize: World);
        using InProcessGroup group = new(config, Options());
        RankInput<BFloat16>[] inputs = GroupStep<BFloat16>.Draw(config, seed, counts: [16, 16, 1]).Inputs;
        foreach (RankInput<BFloat16> input in inputs.Take(2))
        {
            for (int t = 0; t < input.Count; t++)
            {
                input.ExpertIds[2 * t] = 0;
                input.ExpertIds[(2 * t) + 1] = 1;
            }
        }

        // Rank 0 holds experts 0 and 1: it receives every slot of ranks 0 and 1, more rows than any rank's buffers hold.
        GroupStep<BFloat16> step = GroupStep<BFloat16>.Of(config, inputs, seed);
        int initial = group.Layers[0].Context.OutputRows;
        Assert.True(step.Expected.PerRank[0].Rows > initial, $"seed {seed}: rank 0 receives {step.Expected.PerRank[0].Rows} rows, the buffers hold {initial}");

        await AssertEveryOtherRankTimesOutAsync(group, "Counts", seed, (layer, r) => step.DispatchAsync(layer, r).AsTask(), TestContext.Current.CancellationToken);
        EpStepTimeoutException late = await Assert.ThrowsAsync<EpStepTimeoutException>(() => step.DispatchAsync(group.Layers[Missing], Missing).AsTask());
        Assert.Contains("ranks 0, 1 did not deliver", late.Message, StringComparison.Ordinal);

        int[] rows = [.. group.Layers.Select(l => l.Context.OutputRows)];
        Assert.True(rows.All(r => r == initial), $"seed {seed}: output rows per rank {string.Join(", ", rows)}, {initial} before");

        // Back in step: the same routing now grows every rank, together, and the results are the reference's.
        await step.RunAsync(group);
        int[] grown = [.. group.Layers.Select(l => l.Context.OutputRows)];
        Assert.True(grown.All(r => r == grown[0]) && grown[0] > initial, $"seed {seed}: output rows per rank after the next step {string.Join(", ", grown)}");
        Assert.All(group.Layers, l => Assert.Equal(1, l.Context.Reallocations));
        Assert.Equal(0, group.Fabric.PendingMessages);
    }

    [Theory(Timeout = TestTimeoutMs)]
    [InlineData("dispatch")]
    [InlineData("barrier")]
    public async Task Cancelling_through_the_callers_token_is_an_OperationCanceledException_not_a_timeout(string operation)
    {
        GroupStep<BFloat16> step = Draw(out int seed);
        using InProcessGroup group = new(step.Config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(20) });
        using CancellationTokenSource caller = CancellationTokenSource.CreateLinkedTokenSource(TestContext.Current.CancellationToken);
        caller.CancelAfter(TimeSpan.FromMilliseconds(100));
        EpAll2AllLayer layer = group.Layers[0];

        Stopwatch clock = Stopwatch.StartNew();
        OperationCanceledException e = await Assert.ThrowsAnyAsync<OperationCanceledException>(() => operation == "dispatch"
            ? layer.DispatchAsync(step.Tokens(0), step.ExpertIds(0), cancellationToken: caller.Token).AsTask()
            : layer.BarrierAllAsync(cancellationToken: caller.Token).AsTask());

        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(5), $"seed {seed}: cancelling took {clock.Elapsed}");
        Assert.True(e.CancellationToken.IsCancellationRequested, $"seed {seed}: the exception carries a token that was not cancelled");
    }

    private static EpLayerOptions Options() => new() { StepTimeout = Deadline };

    private static GroupStep<BFloat16> Draw(out int seed, bool weights = false)
    {
        seed = Random.Shared.Next();
        return GroupStep<BFloat16>.Draw(new EpConfig(maxTokens: 8, hidden: 8, topK: 2, numExperts: 6, rank: 0, worldSize: World, localWorldSize: World), seed, weights);
    }

    private static EpAll2AllLayer[] Layers(InProcessFabric fabric, EpConfig config, long epoch) =>
        [.. Enumerable.Range(0, config.WorldSize).Select(r => EpAll2AllLayer.CreateCpu(config.ForRank(r), fabric.TransportFor(r), new EpLayerOptions { StepTimeout = Deadline, Epoch = epoch }))];

    /// <summary>Runs <paramref name="operation"/> on every rank but <see cref="Missing"/> and checks each times out in time, naming it.</summary>
    private static async Task AssertEveryOtherRankTimesOutAsync(InProcessGroup group, string phase, int seed, Func<EpAll2AllLayer, int, Task> operation, CancellationToken test)
    {
        int[] present = [.. Enumerable.Range(0, World).Where(r => r != Missing)];
        Task<TimeSpan>[] runs = [.. present.Select(r => Task.Run(
            async () =>
            {
                Stopwatch clock = Stopwatch.StartNew();
                EpStepTimeoutException e = await Assert.ThrowsAsync<EpStepTimeoutException>(() => operation(group.Layers[r], r).WaitAsync(test));
                Assert.True(e.Rank == Missing, $"seed {seed}: rank {r} blames rank {e.Rank}: {e.Message}");
                Assert.Contains($"rank {Missing} did not deliver {phase}", e.Message, StringComparison.Ordinal);
                return clock.Elapsed;
            },
            test))];

        TimeSpan[] elapsed = await Task.WhenAll(runs);
        for (int i = 0; i < present.Length; i++)
        {
            AssertWithinDeadline(elapsed[i], $"seed {seed}: rank {present[i]}");
        }
    }

    private static void AssertWithinDeadline(TimeSpan elapsed, string who) =>
        Assert.True(elapsed > Deadline * 0.8 && elapsed < Deadline * 3, $"{who} gave up after {elapsed.TotalMilliseconds:0} ms; the deadline is {Deadline.TotalMilliseconds:0} ms");

    private static void AssertRankMatches(GroupStep<BFloat16> step, DispatchResult<BFloat16>[] got, int rank)
    {
        BFloat16[] want = step.Expected.PerRank[rank].Output;
        BFloat16[] have = StepHarness.Flat(got[rank].Output);
        Assert.True(want.SequenceEqual(have), $"seed {step.Seed}: rank {rank} returned rows that are not the reference's");
    }
}

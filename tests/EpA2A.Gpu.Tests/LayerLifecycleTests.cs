using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Errors;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Reference;

namespace EpA2A.Tests;

/// <summary>
/// The layer's buffers over several steps: collective growth of the dispatch output, the output as a view
/// that the next dispatch reuses, which layouts combine accepts, and a fabric that is empty once failed steps
/// are over.
/// </summary>
public sealed class LayerLifecycleTests
{
    private const int World = 4;
    private const int Hidden = 8;
    private const int TopK = 2;
    private const int NumExperts = 8;
    private const int MaxTokens = 24;

    [Fact]
    public void The_output_starts_at_MaxTokens_times_the_capacity_and_grows_in_rounded_up_steps()
    {
        EpConfig config = Config();
        DispatchCombineContext context = DispatchCombineContext.Create(config, capacity: 3);
        Assert.Equal(MaxTokens * 3, context.OutputRows);
        Assert.Equal(0, context.Reallocations);

        Assert.False(context.ReallocateDispatchOutput(MaxTokens * 3));
        Assert.Equal(0, context.Reallocations);

        Assert.True(context.ReallocateDispatchOutput((MaxTokens * 3) + 1));
        Assert.Equal(DispatchCombineContext.GrowthGranularity * 3, context.OutputRows);
        Assert.Equal(DispatchCombineContext.GrowthGranularity * 3 * Hidden, context.OutputBuffer.Length);
        Assert.Equal(DispatchCombineContext.GrowthGranularity * 3, context.WeightBuffer.Length);
        Assert.Equal(1, context.Reallocations);

        Assert.True(context.ReallocateDispatchOutput((DispatchCombineContext.GrowthGranularity * 3) + 1));
        Assert.Equal(DispatchCombineContext.GrowthGranularity * 4 * 3, context.OutputRows);
        Assert.Equal(2, context.Reallocations);

        Assert.Throws<ArgumentOutOfRangeException>(() => context.ReallocateDispatchOutput(-1));
        Assert.Throws<ArgumentOutOfRangeException>(() => DispatchCombineContext.Create(config, capacity: 0));
    }

    /// <summary>
    /// Every token picks expert 0, so rank 0 receives every rank's tokens, several times what the buffers hold,
    /// while the other ranks receive little: all ranks still grow, together, to the same size.
    /// </summary>
    [Theory]
    [InlineData(4, false)]
    [InlineData(4, true)]
    [InlineData(2, false)]
    public async Task Growth_is_collective_and_results_stay_correct_after_it(int local, bool localCombine)
    {
        int seed = Random.Shared.Next();
        EpConfig config = new(MaxTokens, Hidden, TopK, NumExperts, 0, World, local, enableLocalCombine: localCombine);
        using InProcessGroup group = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(20) });
        int initial = group.Layers[0].Context.OutputRows;
        Assert.All(group.Layers, l => Assert.Equal(initial, l.Context.OutputRows));

        GroupStep<BFloat16> heavy = Skewed(config, seed);
        int[] received = [.. heavy.Expected.PerRank.Select(p => p.Rows)];
        Assert.True(received[0] > initial && received.Skip(1).All(r => r < initial), $"seed {seed}: the routing is not skewed enough: {string.Join(", ", received)} rows for {initial}");

        await heavy.RunAsync(group);

        int[] rows = [.. group.Layers.Select(l => l.Context.OutputRows)];
        Assert.True(rows.All(r => r == rows[0]) && rows[0] >= received[0], $"seed {seed}: output rows after growth {string.Join(", ", rows)}, rank 0 received {received[0]}");
        Assert.All(group.Layers, l => Assert.Equal(1, l.Context.Reallocations));

        // A second heavy step fits: no rank grows again, and results are still right.
        await Skewed(config, seed + 1).RunAsync(group);
        await GroupStep<BFloat16>.Draw(config, seed + 2, weights: true).RunAsync(group);
        Assert.All(group.Layers, l => Assert.Equal(1, l.Context.Reallocations));
        Assert.Equal(0, group.Fabric.PendingMessages);
    }

    [Fact]
    public async Task The_dispatch_output_is_a_view_of_the_layers_buffer_that_the_next_dispatch_overwrites()
    {
        int seed = Random.Shared.Next();
        EpConfig config = Config();
        using InProcessGroup group = new(config, new EpLayerOptions { Capacity = World * TopK }); // room for any step: no growth in between
        GroupStep<BFloat16> first = GroupStep<BFloat16>.Draw(config, seed, weights: true, counts: [.. Enumerable.Repeat(MaxTokens / 2, World)]);
        GroupStep<BFloat16> second = GroupStep<BFloat16>.Draw(config, seed + 1, weights: true, counts: [.. Enumerable.Repeat(MaxTokens, World)]);

        DispatchResult<BFloat16>[] a = await first.DispatchAllAsync(group);
        first.AssertDispatch(a);
        DispatchResult<BFloat16>[] b = await second.DispatchAllAsync(group);
        second.AssertDispatch(b);

        Assert.All(group.Layers, l => Assert.Equal(0, l.Context.Reallocations));
        for (int r = 0; r < World; r++)
        {
            BFloat16[] stale = StepHarness.Flat(a[r].Output);
            BFloat16[] now = StepHarness.Flat(b[r].Output);
            int shared = Math.Min(stale.Length, now.Length);
            Assert.True(shared > 0, $"seed {seed}: rank {r} received nothing");
            Assert.True(stale.AsSpan(0, shared).SequenceEqual(now.AsSpan(0, shared)), $"seed {seed}: rank {r}'s first output is not the same buffer as its second");
            Assert.False(stale.SequenceEqual(first.Expected.PerRank[r].Output), $"seed {seed}: rank {r}'s first output kept its rows after the second dispatch");
            float[] staleWeights = StepHarness.Flat(a[r].Weights!);
            Assert.True(staleWeights.AsSpan(0, Math.Min(staleWeights.Length, now.Length / Hidden)).SequenceEqual(StepHarness.Flat(b[r].Weights!).AsSpan(0, Math.Min(staleWeights.Length, now.Length / Hidden))), $"seed {seed}: rank {r}'s weights are not a view");
        }
    }

    /// <summary>
    /// A dispatch that fails after the counts exchange has already grown (or partly rewritten) the buffers the
    /// earlier layout's rows and weights live in, so combine must not accept that layout any more.
    /// </summary>
    [Fact]
    public async Task Combine_rejects_the_layout_of_a_dispatch_that_a_failed_dispatch_has_since_overwritten()
    {
        int seed = Random.Shared.Next();
        EpConfig config = new(MaxTokens, Hidden, TopK, NumExperts, 0, World, World, enableLocalCombine: true);
        using InProcessGroup group = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(20) });
        GroupStep<BFloat16> good = GroupStep<BFloat16>.Draw(config, seed, weights: true);
        DispatchResult<BFloat16>[] got = await good.DispatchAllAsync(group);
        good.AssertDispatch(got);
        BFloat16[][] expertOut = good.ExpertOutputs(got);

        // A heavy step with one bad scatter index: every rank grows, then the step aborts.
        GroupStep<BFloat16> heavy = Skewed(config, seed + 1, scatter: true);
        int total = heavy.Expected.PerRank.Sum(p => p.Rows);
        heavy.Inputs[World - 1].ScatterIndices![0] = total;
        Task<DispatchResult<BFloat16>>[] failing = [.. group.Layers.Select((l, r) => Task.Run(() => heavy.DispatchAsync(l, r).AsTask(), TestContext.Current.CancellationToken))];
        foreach (Task<DispatchResult<BFloat16>> t in failing)
        {
            await Assert.ThrowsAnyAsync<Exception>(() => t);
        }

        Assert.All(group.Layers, l => Assert.Equal(1, l.Context.Reallocations));
        Task<Tensor<BFloat16>>[] combines = [.. group.Layers.Select((l, r) => Task.Run(
            () => l.CombineAsync(Tensor.Create(expertOut[r], [got[r].Layout.RecvRows, Hidden]), got[r].Layout, new CombineOptions(Weighted: true)).AsTask(),
            TestContext.Current.CancellationToken))];
        for (int r = 0; r < World; r++)
        {
            ArgumentException e = await Assert.ThrowsAsync<ArgumentException>(() => combines[r]);
            Assert.Equal("layout", e.ParamName);
            Assert.Contains("latest dispatch", e.Message, StringComparison.Ordinal);
        }

        await good.RunAsync(group);
        Assert.Equal(0, group.Fabric.PendingMessages);
    }

    /// <summary>
    /// Failures of every kind on one group, each followed by a good step: no message of a failed operation is
    /// left in the fabric, and none leaks into a later operation.
    /// </summary>
    [Fact]
    public async Task The_fabric_holds_no_messages_once_failed_operations_are_over()
    {
        int seed = Random.Shared.Next();
        EpConfig config = Config();
        using InProcessGroup group = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(20) });
        GroupStep<BFloat16> step = GroupStep<BFloat16>.Draw(config, seed, weights: true, scatter: true);

        // 1. An out-of-range scatter index: the step aborts on every rank.
        int[] saved = (int[])step.Inputs[1].ScatterIndices!.Clone();
        step.Inputs[1].ScatterIndices![0] = step.Expected.PerRank.Sum(p => p.Rows);
        await AllFailAsync<EpStepFailedException, ArgumentException>(group, step, seed);
        Assert.Equal(0, group.Fabric.PendingMessages);
        saved.CopyTo(step.Inputs[1].ScatterIndices!, 0);
        await step.RunAsync(group);
        Assert.Equal(0, group.Fabric.PendingMessages);

        // 2. Weights on some ranks only.
        GroupStep<BFloat16> mixed = GroupStep<BFloat16>.Of(config, [.. step.Inputs.Select((x, r) => r == 2 ? x with { Weights = null } : x)], seed);
        await AllFailAsync<EpConfigMismatchException, EpConfigMismatchException>(group, mixed, seed);
        Assert.Equal(0, group.Fabric.PendingMessages);

        // 3. One row claimed by two ranks (each rank's indices are distinct): the receiving rank fails, naming both.
        GroupStep<BFloat16> next = GroupStep<BFloat16>.Draw(config, seed + 1, scatter: true);
        (int destination, int claimed) = ClaimOneRowTwice(next);
        Task<DispatchResult<BFloat16>>[] tasks = [.. group.Layers.Select((l, r) => Task.Run(() => next.DispatchAsync(l, r).AsTask(), TestContext.Current.CancellationToken))];
        EpStepFailedException dup = await Assert.ThrowsAsync<EpStepFailedException>(() => tasks[destination]);
        Assert.True(dup.Message.Contains("claimed twice", StringComparison.Ordinal), $"seed {seed}: {dup.Message}");
        Assert.True(dup.Message.Contains($"row {claimed}", StringComparison.Ordinal), $"seed {seed}: {dup.Message}");
        await Task.WhenAll(tasks).ContinueWith(_ => { }, TestContext.Current.CancellationToken, TaskContinuationOptions.None, TaskScheduler.Default);
        Assert.Equal(0, group.Fabric.PendingMessages);

        await step.RunAsync(group);
        Assert.Equal(0, group.Fabric.PendingMessages);
    }

    /// <summary>Points one slot of one rank at a row another rank's slot already fills; returns that row's rank and local row.</summary>
    private static (int Destination, int Row) ClaimOneRowTwice(GroupStep<BFloat16> step)
    {
        EpConfig c = step.Config;
        int[] bases = new int[c.WorldSize];
        for (int d = 1; d < c.WorldSize; d++)
        {
            bases[d] = bases[d - 1] + step.Expected.PerRank[d - 1].Rows;
        }

        for (int a = 0; a < c.WorldSize; a++)
        {
            for (int b = a + 1; b < c.WorldSize; b++)
            {
                RankInput<BFloat16> x = step.Inputs[a];
                RankInput<BFloat16> y = step.Inputs[b];
                for (int i = 0; i < x.ExpertIds.Length; i++)
                {
                    for (int j = 0; j < y.ExpertIds.Length; j++)
                    {
                        if (x.ExpertIds[i] != c.NumExperts && y.ExpertIds[j] != c.NumExperts && c.RankOfExpert(x.ExpertIds[i]) == c.RankOfExpert(y.ExpertIds[j]))
                        {
                            y.ScatterIndices![j] = x.ScatterIndices![i];
                            int d = c.RankOfExpert(x.ExpertIds[i]);
                            return (d, x.ScatterIndices[i] - bases[d]);
                        }
                    }
                }
            }
        }

        throw new InvalidOperationException($"seed {step.Seed}: no two ranks send to the same rank");
    }

    private static EpConfig Config() => new(MaxTokens, Hidden, TopK, NumExperts, 0, World, World);

    /// <summary>Every token of every rank picks expert 0 (on rank 0) and one other expert.</summary>
    private static GroupStep<BFloat16> Skewed(EpConfig config, int seed, bool scatter = false)
    {
        Random rng = new(seed);
        RankInput<BFloat16>[] inputs = RoutingGenerator.Draw<BFloat16>(config, [.. Enumerable.Repeat(config.MaxTokens, config.WorldSize)], 0, false, true, rng);
        foreach (RankInput<BFloat16> input in inputs)
        {
            for (int t = 0; t < input.Count; t++)
            {
                input.ExpertIds[t * TopK] = 0;
                input.ExpertIds[(t * TopK) + 1] = rng.Next(1, config.NumExperts);
            }
        }

        if (scatter)
        {
            inputs = StepHarness.WithShuffledScatter(config, inputs, rng);
        }

        return GroupStep<BFloat16>.Of(config, inputs, seed);
    }

    private static async Task AllFailAsync<TOthers, TOffender>(InProcessGroup group, GroupStep<BFloat16> step, int seed)
        where TOthers : Exception
        where TOffender : Exception
    {
        Task<DispatchResult<BFloat16>>[] tasks = [.. group.Layers.Select((l, r) => Task.Run(() => step.DispatchAsync(l, r).AsTask(), TestContext.Current.CancellationToken))];
        for (int r = 0; r < tasks.Length; r++)
        {
            Exception e = await Assert.ThrowsAnyAsync<Exception>(() => tasks[r]);
            Assert.True(e is TOthers or TOffender, $"seed {seed}: rank {r} failed with {e}");
        }
    }
}

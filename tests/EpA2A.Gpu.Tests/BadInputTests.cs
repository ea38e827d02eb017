using System.Collections.Concurrent;
using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Errors;
using EpA2A.Experts;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Reference;
using EpA2A.Transport;

namespace EpA2A.Tests;

/// <summary>
/// Bad input (BRIEF §4): a clear exception that names the argument and the rule, thrown before anything is
/// sent, after which the layer stays usable and no other rank is corrupted. A rejected call is still the rank's
/// turn in the group's operations: it takes the operation's number and tells its peers at once (issue 18), so
/// every case below starts the other ranks, makes the bad call, checks that each other rank fails within
/// milliseconds (not at its 20 s deadline) with an abort that names the bad rank and its reason, and then runs a
/// whole new step (dispatch and combine) on every rank, compared with the reference: no recovery call needed.
/// </summary>
public sealed class BadInputTests
{
    private const int World = 3;
    private const int Hidden = 8;
    private const int TopK = 2;
    private const int NumExperts = 6;
    private const int MaxTokens = 8;
    private const int BadRank = 1;


    [Fact]
    public async Task Tokens_of_another_token_type_name_input_and_the_configured_type()
    {
        ArgumentException e = await DispatchRejectedThenRetriedAsync<ArgumentException>(Config(), Seed(), async (layer, step) =>
            await layer.DispatchAsync(AsFloat(step.Tokens(BadRank)), step.ExpertIds(BadRank)));

        AssertNames(e, "input", "elements of Float32", "EpConfig.TokenType is BFloat16");
    }

    [Fact]
    public async Task Tokens_of_a_type_that_is_no_token_type_name_input_and_the_configured_type()
    {
        ArgumentException e = await DispatchRejectedThenRetriedAsync<ArgumentException>(Config(), Seed(), async (layer, step) =>
        {
            int n = step.Count(BadRank);
            double[] tokens = [.. Enumerable.Range(1, n * Hidden).Select(i => i / 3.0)];
            await layer.DispatchAsync(Tensor.Create(tokens, [n, Hidden]), step.ExpertIds(BadRank));
        });

        AssertNames(e, "input", "elements of Double", "EpConfig.TokenType is BFloat16");
        Assert.IsType<NotSupportedException>(e.InnerException);
    }

    [Theory]
    [InlineData("1-D")]
    [InlineData("3-D")]
    [InlineData("hidden too small")]
    [InlineData("hidden too large")]
    public async Task Input_that_is_not_n_by_hidden_names_input_and_the_expected_shape(string shape)
    {
        ArgumentException e = await DispatchRejectedThenRetriedAsync<ArgumentException>(Config(), Seed(), async (layer, step) =>
        {
            BFloat16[] tokens = step.Inputs[BadRank].Tokens;
            int n = step.Count(BadRank);
            Tensor<BFloat16> input = shape switch
            {
                "1-D" => Tensor.Create(tokens, [n * Hidden]),
                "3-D" => Tensor.Create(tokens, [1, n, Hidden]),
                "hidden too small" => Tensor.Create(tokens[..(n * (Hidden - 1))], [n, Hidden - 1]),
                _ => Tensor.Create([.. tokens, .. tokens[..n]], [n, Hidden + 1]),
            };
            await layer.DispatchAsync(input, step.ExpertIds(BadRank));
        });

        AssertNames(e, "input", "has shape", $"expected [n, Hidden] = [n, {Hidden}]");
    }

    [Fact]
    public async Task More_tokens_than_MaxTokens_names_input_and_the_limit()
    {
        ArgumentException e = await DispatchRejectedThenRetriedAsync<ArgumentException>(Config(), Seed(), async (layer, step) =>
        {
            int n = MaxTokens + 1;
            BFloat16[] tokens = [.. Enumerable.Range(1, n * Hidden).Select(i => BFloat16.FromSingle(i / 7f))];
            int[] ids = [.. Enumerable.Range(0, n * TopK).Select(i => i % NumExperts)];
            await layer.DispatchAsync(Tensor.Create(tokens, [n, Hidden]), Tensor.Create(ids, [n, TopK]));
        });

        AssertNames(e, "input", $"{MaxTokens + 1} tokens", $"more than EpConfig.MaxTokens = {MaxTokens}");
    }

    [Theory]
    [InlineData("one row too many")]
    [InlineData("one row too few")]
    [InlineData("TopK + 1 columns")]
    [InlineData("1-D")]
    public async Task Expert_ids_that_are_not_n_by_topK_name_expertIds_and_the_expected_shape(string shape)
    {
        ArgumentException e = await DispatchRejectedThenRetriedAsync<ArgumentException>(Config(), Seed(), async (layer, step) =>
        {
            int n = step.Count(BadRank);
            int[] ids = step.Inputs[BadRank].ExpertIds;
            Tensor<int> bad = shape switch
            {
                "one row too many" => Tensor.Create([.. ids, .. ids[..TopK]], [n + 1, TopK]),
                "one row too few" => Tensor.Create(ids[TopK..], [n - 1, TopK]),
                "TopK + 1 columns" => Tensor.Create([.. ids, .. ids[..n]], [n, TopK + 1]),
                _ => Tensor.Create(ids, [n * TopK]),
            };
            await layer.DispatchAsync(step.Tokens(BadRank), bad);
        });

        AssertNames(e, "expertIds", "has shape", "expected [n, TopK]", $", {TopK}]");
    }

    [Theory]
    [InlineData(-1)]
    [InlineData(NumExperts + 1)]
    [InlineData(int.MinValue)]
    [InlineData(int.MaxValue)]
    public async Task An_expert_id_outside_0_to_NumExperts_names_its_position_and_the_range(int badId)
    {
        int slot = -1;
        ArgumentException e = await DispatchRejectedThenRetriedAsync<ArgumentException>(Config(), Seed(), async (layer, step) =>
        {
            int[] ids = (int[])step.Inputs[BadRank].ExpertIds.Clone();
            slot = ids.Length - 1;
            ids[slot] = badId;
            await layer.DispatchAsync(step.Tokens(BadRank), Tensor.Create(ids, [step.Count(BadRank), TopK]));
        });

        AssertNames(e, "expertIds", $"expertIds[{slot / TopK}, {slot % TopK}] = {badId}", $"outside [0, NumExperts = {NumExperts}]");
    }

    [Theory]
    [InlineData("one row too many")]
    [InlineData("TopK - 1 columns")]
    [InlineData("1-D")]
    public async Task Weights_that_are_not_n_by_topK_name_weights_and_the_expected_shape(string shape)
    {
        ArgumentException e = await DispatchRejectedThenRetriedAsync<ArgumentException>(Config(), Seed(), withWeights: true, badCall: async (layer, step) =>
        {
            int n = step.Count(BadRank);
            float[] w = step.Inputs[BadRank].Weights!;
            Tensor<float> bad = shape switch
            {
                "one row too many" => Tensor.Create([.. w, .. w[..TopK]], [n + 1, TopK]),
                "TopK - 1 columns" => Tensor.Create(w[..(n * (TopK - 1))], [n, TopK - 1]),
                _ => Tensor.Create(w, [n * TopK]),
            };
            await layer.DispatchAsync(step.Tokens(BadRank), step.ExpertIds(BadRank), bad);
        });

        AssertNames(e, "weights", "has shape", "expected [n, TopK]");
    }

    [Theory]
    [InlineData(float.NaN)]
    [InlineData(float.PositiveInfinity)]
    [InlineData(float.NegativeInfinity)]
    public async Task A_weight_that_is_not_finite_names_its_position(float badWeight)
    {
        ArgumentException e = await DispatchRejectedThenRetriedAsync<ArgumentException>(Config(), Seed(), withWeights: true, badCall: async (layer, step) =>
        {
            float[] w = (float[])step.Inputs[BadRank].Weights!.Clone();
            w[1] = badWeight;
            await layer.DispatchAsync(step.Tokens(BadRank), step.ExpertIds(BadRank), Tensor.Create(w, [step.Count(BadRank), TopK]));
        });

        AssertNames(e, "weights", "weights[0, 1] = ", "is not finite");
    }

    [Theory]
    [InlineData("one row too many")]
    [InlineData("TopK + 1 columns")]
    [InlineData("1-D")]
    public async Task Scatter_indices_that_are_not_n_by_topK_name_scatterIndices_and_the_expected_shape(string shape)
    {
        ArgumentException e = await DispatchRejectedThenRetriedAsync<ArgumentException>(Config(), Seed(), withScatter: true, badCall: async (layer, step) =>
        {
            int n = step.Count(BadRank);
            int[] s = step.Inputs[BadRank].ScatterIndices!;
            Tensor<int> bad = shape switch
            {
                "one row too many" => Tensor.Create([.. s, 1000, 1001], [n + 1, TopK]),
                "TopK + 1 columns" => Tensor.Create([.. s, .. Enumerable.Range(1000, n)], [n, TopK + 1]),
                _ => Tensor.Create(s, [n * TopK]),
            };
            await layer.DispatchAsync(step.Tokens(BadRank), step.ExpertIds(BadRank), scatterIndices: bad);
        });

        AssertNames(e, "scatterIndices", "has shape", "expected [n, TopK]");
    }

    [Fact]
    public async Task A_negative_scatter_index_names_its_position()
    {
        ArgumentException e = await DispatchRejectedThenRetriedAsync<ArgumentException>(Config(), Seed(), withScatter: true, badCall: async (layer, step) =>
        {
            int[] s = (int[])step.Inputs[BadRank].ScatterIndices!.Clone();
            s[0] = -3; // slot 0 is never dropped (see GroupStep.Draw)
            await layer.DispatchAsync(step.Tokens(BadRank), step.ExpertIds(BadRank), scatterIndices: Tensor.Create(s, [step.Count(BadRank), TopK]));
        });

        AssertNames(e, "scatterIndices", "scatterIndices[0, 0] = -3", "is negative");
    }

    [Fact]
    public async Task A_scatter_index_repeated_on_one_rank_names_the_repeat()
    {
        int repeat = -1;
        ArgumentException e = await DispatchRejectedThenRetriedAsync<ArgumentException>(Config(), Seed(), withScatter: true, badCall: async (layer, step) =>
        {
            RankInput<BFloat16> input = step.Inputs[BadRank];
            int[] s = (int[])input.ScatterIndices!.Clone();
            repeat = Array.FindLastIndex(input.ExpertIds, id => id != NumExperts);
            Assert.True(repeat > 0, $"seed {step.Seed}: rank {BadRank} has one kept slot only");
            s[repeat] = s[0];
            await layer.DispatchAsync(step.Tokens(BadRank), step.ExpertIds(BadRank), scatterIndices: Tensor.Create(s, [step.Count(BadRank), TopK]));
        });

        AssertNames(e, "scatterIndices", $"scatterIndices[{repeat / TopK}, {repeat % TopK}]", "repeats an earlier index");
    }

    [Fact]
    public async Task Scatter_indices_with_an_expert_alignment_above_one_name_scatterIndices_and_ExpertAlignment()
    {
        ArgumentException e = await DispatchRejectedThenRetriedAsync<ArgumentException>(Config(alignment: 4), Seed(), async (layer, step) =>
        {
            int n = step.Count(BadRank);
            int[] s = [.. Enumerable.Range(0, n * TopK)];
            await layer.DispatchAsync(step.Tokens(BadRank), step.ExpertIds(BadRank), scatterIndices: Tensor.Create(s, [n, TopK]));
        });

        AssertNames(e, "scatterIndices", "EpConfig.ExpertAlignment must be 1", "it is 4");
    }

    [Fact]
    public async Task A_dropped_slots_scatter_index_is_ignored_even_when_negative()
    {
        int seed = Seed();
        EpConfig config = Config();
        RankInput<BFloat16>[] inputs = [.. GroupStep<BFloat16>.Draw(config, seed).Inputs];
        int[] ids = (int[])inputs[BadRank].ExpertIds.Clone();
        ids[^1] = NumExperts;
        inputs[BadRank] = inputs[BadRank] with { ExpertIds = ids };
        inputs = StepHarness.WithShuffledScatter(config, inputs, new Random(seed));
        inputs[BadRank].ScatterIndices![^1] = -7;
        GroupStep<BFloat16> step = GroupStep<BFloat16>.Of(config, inputs, seed);
        using InProcessGroup group = new(config);

        await step.RunAsync(group);
    }

    /// <summary>
    /// Out-of-range scatter indices can only be seen once the counts are known, so they fail the step on every
    /// rank: the offending rank with the argument error, every other rank with an abort that names it.
    /// </summary>
    [Theory]
    [InlineData(3, 3, "past the last row")]
    [InlineData(3, 3, "in another rank's rows")]
    [InlineData(4, 2, "past the last row")]
    [InlineData(4, 2, "in another rank's rows")]
    public async Task A_scatter_index_outside_its_destination_ranks_rows_aborts_the_step_on_every_rank_naming_the_offender(int world, int local, string where)
    {
        int seed = Seed();
        EpConfig config = new(MaxTokens, Hidden, TopK, 2 * world, 0, world, local);
        GroupStep<BFloat16> step = GroupStep<BFloat16>.Draw(config, seed, weights: true, scatter: true);
        int offender = world - 1;
        int[] scatter = (int[])step.Inputs[offender].ScatterIndices!.Clone();
        int bad = OutsideDestination(step, offender, slot: 0, where == "past the last row");
        scatter[0] = bad;
        using InProcessGroup group = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(20) });

        Task<DispatchResult<BFloat16>>[] tasks = [.. group.Layers.Select((layer, r) => Task.Run(() => r == offender
            ? layer.DispatchAsync(step.Tokens(r), step.ExpertIds(r), step.Weights(r), Tensor.Create(scatter, [step.Count(r), TopK])).AsTask()
            : step.DispatchAsync(layer, r).AsTask()))];

        for (int r = 0; r < world; r++)
        {
            if (r == offender)
            {
                ArgumentException e = await Assert.ThrowsAsync<ArgumentException>(() => tasks[r]);
                Assert.True(e.Message.Contains($"scatterIndices[0, 0] = {bad}", StringComparison.Ordinal) && e.Message.Contains("outside rank", StringComparison.Ordinal), $"seed {seed}: {e.Message}");
            }
            else
            {
                EpStepAbortedException e = await Assert.ThrowsAsync<EpStepAbortedException>(() => tasks[r]);
                Assert.True(e.Rank == offender, $"seed {seed}: rank {r} blames rank {e.Rank}, not {offender}: {e.Message}");
                Assert.True(e.Message.Contains($"rank {offender} aborted", StringComparison.Ordinal) && e.Message.Contains("scatterIndices", StringComparison.Ordinal), $"seed {seed}: {e.Message}");
            }
        }

        // The failed step used a sequence number on every rank alike, so the next step simply works.
        await step.RunAsync(group);
        Assert.Equal(0, group.Fabric.PendingMessages);
    }

    [Theory]
    [InlineData("Single")]
    [InlineData("one row too many")]
    [InlineData("one row too few")]
    [InlineData("hidden + 1")]
    public async Task Expert_output_of_the_wrong_type_or_shape_names_expertOutput_and_the_rule(string what)
    {
        ArgumentException e = await CombineRejectedThenRetriedAsync<ArgumentException>(Seed(), withWeights: false, async call =>
        {
            int rows = call.Layout.RecvRows;
            BFloat16[] good = call.ExpertOutputData;
            if (what == "Single")
            {
                await call.Layer.CombineAsync(AsFloat(call.ExpertOutput), call.Layout);
            }
            else
            {
                Tensor<BFloat16> bad = what switch
                {
                    "one row too many" => Tensor.Create([.. good, .. Ones(Hidden)], [rows + 1, Hidden]),
                    "one row too few" => Tensor.Create(good[Hidden..], [rows - 1, Hidden]),
                    _ => Tensor.Create([.. good, .. Ones(rows)], [rows, Hidden + 1]),
                };
                await call.Layer.CombineAsync(bad, call.Layout);
            }
        });

        if (what == "Single")
        {
            AssertNames(e, "expertOutput", "elements of Float32", "EpConfig.TokenType is BFloat16");
        }
        else
        {
            AssertNames(e, "expertOutput", "has shape", "expected [layout.RecvRows, Hidden]");
        }
    }

    [Fact]
    public async Task Combine_with_the_layout_of_an_earlier_dispatch_names_layout_and_both_operations()
    {
        ArgumentException e = await CombineRejectedThenRetriedAsync<ArgumentException>(Seed(), withWeights: false, async call =>
            await call.Layer.CombineAsync(call.PreviousExpertOutput, call.PreviousLayout));

        AssertNames(e, "layout", "layout is from operation 1", "latest dispatch is operation 3", "needs the layout of the latest dispatch");
    }

    [Fact]
    public async Task Combine_with_a_layout_from_another_layer_names_layout()
    {
        ArgumentException e = await CombineRejectedThenRetriedAsync<ArgumentException>(Seed(), withWeights: false, async call =>
        {
            // The same step dispatched on another group: a layout of identical shape, from a different layer.
            using InProcessGroup other = new(call.Step.Config);
            DispatchResult<BFloat16>[] foreign = await call.Step.DispatchAllAsync(other);
            Assert.Equal(call.Layout.RecvRows, foreign[BadRank].Layout.RecvRows);
            await call.Layer.CombineAsync(call.ExpertOutput, foreign[BadRank].Layout);
        });

        AssertNames(e, "layout", "produced by another layer");
    }

    [Fact]
    public async Task A_weighted_combine_after_a_dispatch_without_weights_names_the_missing_weights()
    {
        ArgumentException e = await CombineRejectedThenRetriedAsync<ArgumentException>(Seed(), withWeights: false, async call =>
            await call.Layer.CombineAsync(call.ExpertOutput, call.Layout, new CombineOptions(Weighted: true)));

        AssertNames(e, "options", "weighted combine needs the routing weights", "had none");
    }

    [Fact]
    public async Task A_null_layout_or_expert_output_is_an_ArgumentNullException_naming_it()
    {
        ArgumentNullException e = await CombineRejectedThenRetriedAsync<ArgumentNullException>(Seed(), withWeights: true, async call =>
            await call.Layer.CombineAsync(call.ExpertOutput, null!));
        Assert.Equal("layout", e.ParamName);

        e = await CombineRejectedThenRetriedAsync<ArgumentNullException>(Seed(), withWeights: true, async call =>
            await call.Layer.CombineAsync<BFloat16>(null!, call.Layout));
        Assert.Equal("expertOutput", e.ParamName);
    }

    [Fact]
    public async Task Every_operation_after_Dispose_throws_ObjectDisposedException_and_a_second_Dispose_is_harmless()
    {
        int seed = Seed();
        EpConfig config = Config();
        GroupStep<BFloat16> step = GroupStep<BFloat16>.Draw(config, seed);
        using InProcessGroup group = new(config);
        DispatchResult<BFloat16>[] got = await step.DispatchAllAsync(group);
        step.AssertDispatch(got);
        BFloat16[][] expertOut = step.ExpertOutputs(got);
        EpAll2AllLayer layer = group.Layers[BadRank];

        layer.Dispose();
        layer.Dispose();

        ObjectDisposedException d = await Assert.ThrowsAsync<ObjectDisposedException>(() => step.DispatchAsync(layer, BadRank).AsTask());
        Assert.Contains(nameof(EpAll2AllLayer), d.ObjectName, StringComparison.Ordinal);
        await Assert.ThrowsAsync<ObjectDisposedException>(() => layer.CombineAsync(Tensor.Create(expertOut[BadRank], [got[BadRank].Layout.RecvRows, Hidden]), got[BadRank].Layout, cancellationToken: TestContext.Current.CancellationToken).AsTask());
        await Assert.ThrowsAsync<ObjectDisposedException>(() => layer.BarrierAllAsync(cancellationToken: TestContext.Current.CancellationToken).AsTask());
        await Assert.ThrowsAsync<ObjectDisposedException>(() => layer.BarrierAllAsync(intraNodeOnly: true, TestContext.Current.CancellationToken).AsTask());

        // Nothing was sent on the disposed rank's behalf.
        Assert.Equal(0, group.Fabric.PendingMessages);
    }

    [Fact]
    public async Task A_second_operation_while_one_is_in_flight_is_rejected_and_the_first_still_completes()
    {
        int seed = Seed();
        EpConfig config = Config();
        GroupStep<BFloat16> step = GroupStep<BFloat16>.Draw(config, seed, weights: true);
        PhaseLog log = new();
        using InProcessGroup group = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(20), Observer = log });
        GroupStep<BFloat16>.Poison(group);
        EpAll2AllLayer lone = group.Layers[0];

        // Rank 0 alone: its dispatch waits for the others' counts.
        Task<DispatchResult<BFloat16>> first = step.DispatchAsync(lone, 0).AsTask();
        await log.WaitForAsync(Phase.DispatchCopyIn, 1);

        InvalidOperationException again = await Assert.ThrowsAsync<InvalidOperationException>(() => step.DispatchAsync(lone, 0).AsTask());
        Assert.Contains("already in progress", again.Message, StringComparison.Ordinal);
        Assert.Contains("rank 0", again.Message, StringComparison.Ordinal);
        InvalidOperationException barrier = await Assert.ThrowsAsync<InvalidOperationException>(() => lone.BarrierAllAsync(cancellationToken: TestContext.Current.CancellationToken).AsTask());
        Assert.Contains("must not overlap", barrier.Message, StringComparison.Ordinal);
        Assert.False(first.IsCompleted, $"seed {seed}: rank 0's dispatch finished without the other ranks");

        Task<DispatchResult<BFloat16>>[] rest = [.. Enumerable.Range(1, World - 1).Select(r => Task.Run(() => step.DispatchAsync(group.Layers[r], r).AsTask(), TestContext.Current.CancellationToken))];
        DispatchResult<BFloat16>[] got = await Task.WhenAll([first, .. rest]);
        step.AssertDispatch(got);
        await step.AssertCombineAsync(group, got, weighted: true);
        Assert.Equal(0, group.Fabric.PendingMessages);
    }

    [Theory]
    [InlineData("Hidden")]
    [InlineData("TopK")]
    [InlineData("NumExperts")]
    [InlineData("MaxTokens")]
    [InlineData("TokenType")]
    [InlineData("ExpertAlignment")]
    [InlineData("EnableLocalCombine")]
    [InlineData("LocalWorldSize")]
    public async Task Ranks_configured_differently_all_fail_with_EpConfigMismatchException_naming_the_field(string field)
    {
        int seed = Seed();
        const int world = 4;
        const int odd = 2;
        EpConfig common = new(MaxTokens, Hidden, TopK, 8, 0, world, world);
        InProcessFabric fabric = new(world);
        EpAll2AllLayer[] layers = [.. Enumerable.Range(0, world).Select(r => EpAll2AllLayer.CreateCpu(
            r == odd ? Variant(common, field).ForRank(r) : common.ForRank(r),
            fabric.TransportFor(r),
            new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(20) }))];
        try
        {
            Task[] tasks = [.. layers.Select((layer, r) => Task.Run(() => DispatchDrawnAsync(layer, seed + r), TestContext.Current.CancellationToken))];
            for (int r = 0; r < world; r++)
            {
                EpConfigMismatchException e = await Assert.ThrowsAsync<EpConfigMismatchException>(() => tasks[r]);
                Assert.True(e.Message.Contains(field, StringComparison.Ordinal) && e.Message.Contains($"rank {odd}", StringComparison.Ordinal), $"seed {seed}, rank {r}: {e.Message}");
            }

            Assert.Equal(0, fabric.PendingMessages);
        }
        finally
        {
            foreach (EpAll2AllLayer layer in layers)
            {
                layer.Dispose();
            }
        }
    }

    [Theory]
    [InlineData("weights")]
    [InlineData("scatter indices")]
    public async Task Weights_or_scatter_indices_on_some_ranks_only_fail_every_rank_and_the_next_step_works(string what)
    {
        int seed = Seed();
        EpConfig config = Config();
        bool weights = what == "weights";
        GroupStep<BFloat16> full = GroupStep<BFloat16>.Draw(config, seed, weights: weights, scatter: !weights);
        RankInput<BFloat16>[] partial = [.. full.Inputs.Select((input, r) => r != BadRank ? input : weights ? input with { Weights = null } : input with { ScatterIndices = null })];
        GroupStep<BFloat16> mixed = GroupStep<BFloat16>.Of(config, partial, seed);
        using InProcessGroup group = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(20) });

        Task<DispatchResult<BFloat16>>[] tasks = [.. group.Layers.Select((layer, r) => Task.Run(() => mixed.DispatchAsync(layer, r).AsTask(), TestContext.Current.CancellationToken))];
        for (int r = 0; r < World; r++)
        {
            EpConfigMismatchException e = await Assert.ThrowsAsync<EpConfigMismatchException>(() => tasks[r]);
            Assert.True(e.Message.Contains(what, StringComparison.Ordinal) && e.Message.Contains($"rank {BadRank}", StringComparison.Ordinal), $"seed {seed}, rank {r}: {e.Message}");
        }

        await full.RunAsync(group);
        await GroupStep<BFloat16>.Draw(config, seed + 1, weights: true).RunAsync(group);
        Assert.Equal(0, group.Fabric.PendingMessages);
    }

    /// <summary>
    /// The issue-18 case in every topology: one rank's expert id of -6 (or its combine's foreign layout) fails every
    /// other rank at once, through the forwarding ranks of the inter-node algorithm too, and the group's next step
    /// is correct with no recovery.
    /// </summary>
    [Theory]
    [InlineData(4, 4, false, false)]
    [InlineData(4, 4, true, true)]
    [InlineData(4, 2, false, false)]
    [InlineData(4, 2, false, true)]
    [InlineData(6, 2, false, true)]
    [InlineData(4, 4, false, true)]
    public async Task A_rejected_dispatch_or_combine_fails_every_other_rank_at_once_and_the_next_step_is_correct(int world, int local, bool localCombine, bool combine)
    {
        int seed = Seed();
        EpConfig config = new(MaxTokens, Hidden, TopK, 2 * world, 0, world, local, enableLocalCombine: localCombine);
        using InProcessGroup group = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(20) });
        GroupStep<BFloat16> step = GroupStep<BFloat16>.Draw(config, seed, weights: true);
        Task[] tasks = new Task[world];
        int[] others = [.. Enumerable.Range(0, world).Where(r => r != BadRank)];
        if (combine)
        {
            DispatchResult<BFloat16>[] got = await step.DispatchAllAsync(group);
            BFloat16[][] expertOut = step.ExpertOutputs(got);
            foreach (int r in others)
            {
                tasks[r] = Task.Run(() => group.Layers[r].CombineAsync(Tensor.Create(expertOut[r], [got[r].Layout.RecvRows, Hidden]), got[r].Layout).AsTask(), TestContext.Current.CancellationToken);
            }

            // One row more than the layout received: a shape the rank refuses.
            int rows = got[BadRank].Layout.RecvRows + 1;
            ArgumentException e = await Assert.ThrowsAsync<ArgumentException>(() => group.Layers[BadRank].CombineAsync(Tensor.Create(expertOut[BadRank].Concat(Ones(Hidden)).ToArray(), [rows, Hidden]), got[BadRank].Layout, cancellationToken: TestContext.Current.CancellationToken).AsTask());
            Assert.Equal("expertOutput", e.ParamName);
        }
        else
        {
            foreach (int r in others)
            {
                tasks[r] = Task.Run(() => step.DispatchAsync(group.Layers[r], r).AsTask(), TestContext.Current.CancellationToken);
            }

            int[] ids = (int[])step.Inputs[BadRank].ExpertIds.Clone();
            ids[0] = -6;
            ArgumentException e = await Assert.ThrowsAsync<ArgumentException>(() => group.Layers[BadRank].DispatchAsync(step.Tokens(BadRank), Tensor.Create(ids, [step.Count(BadRank), TopK]), step.Weights(BadRank), cancellationToken: TestContext.Current.CancellationToken).AsTask());
            Assert.Contains("= -6", e.Message, StringComparison.Ordinal);
        }

        await AssertPeersFailedPromptlyAsync(others.Select(r => (r, tasks[r])), seed);
        await GroupStep<BFloat16>.Draw(config, seed + 1, weights: true).RunAsync(group);
        await GroupStep<BFloat16>.Draw(config, seed + 2).RunAsync(group);
        Assert.Equal(0, group.Fabric.PendingMessages);
    }

    /// <summary>A rank that rejects its input before its peers even begin the operation: they fail as soon as they do, and the step after is correct.</summary>
    [Fact]
    public async Task A_rejection_before_the_peers_begin_fails_their_operation_as_soon_as_they_begin_it()
    {
        int seed = Seed();
        EpConfig config = Config();
        using InProcessGroup group = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(20) });
        GroupStep<BFloat16> step = GroupStep<BFloat16>.Draw(config, seed);
        await Assert.ThrowsAsync<ArgumentException>(() => group.Layers[BadRank].DispatchAsync(AsFloat(step.Tokens(BadRank)), step.ExpertIds(BadRank), cancellationToken: TestContext.Current.CancellationToken).AsTask());
        int[] others = [.. Enumerable.Range(0, World).Where(r => r != BadRank)];
        (int, Task)[] begun = [.. others.Select(r => (r, (Task)Task.Run(() => step.DispatchAsync(group.Layers[r], r).AsTask(), TestContext.Current.CancellationToken)))];
        await AssertPeersFailedPromptlyAsync(begun, seed);
        await step.RunAsync(group);
        Assert.Equal(0, group.Fabric.PendingMessages);
    }

    private static int Seed() => Random.Shared.Next();

    private static EpConfig Config(int alignment = 1) =>
        new(MaxTokens, Hidden, TopK, NumExperts, 0, World, World, expertAlignment: alignment);

    private static void AssertNames(ArgumentException e, string argument, params string[] rule)
    {
        Assert.Equal(argument, e.ParamName);
        foreach (string part in rule)
        {
            Assert.Contains(part, e.Message, StringComparison.Ordinal);
        }
    }

    private static Tensor<float> AsFloat(Tensor<BFloat16> tensor) =>
        Tensor.Create([.. StepHarness.Flat(tensor).Select(x => x.ToSingle())], tensor.Lengths);

    private static BFloat16[] Ones(int count) => [.. Enumerable.Repeat(BFloat16.FromSingle(1f), count)];

    /// <summary>A global row outside the destination of <paramref name="slot"/>'s expert that this rank does not use itself.</summary>
    private static int OutsideDestination(GroupStep<BFloat16> step, int rank, int slot, bool pastTheEnd)
    {
        int[] rows = [.. step.Expected.PerRank.Select(p => p.Rows)];
        int total = rows.Sum();
        if (!pastTheEnd)
        {
            int d = step.Config.RankOfExpert(step.Inputs[rank].ExpertIds[slot]);
            int start = rows.Take(d).Sum();
            HashSet<int> own = [.. step.Inputs[rank].ScatterIndices!];
            for (int g = 0; g < total; g++)
            {
                if ((g < start || g >= start + rows[d]) && !own.Contains(g))
                {
                    return g;
                }
            }
        }

        return total;
    }

    private static EpConfig Variant(EpConfig c, string field) => field switch
    {
        "Hidden" => new(c.MaxTokens, c.Hidden * 2, c.TopK, c.NumExperts, c.Rank, c.WorldSize, c.LocalWorldSize),
        "TopK" => new(c.MaxTokens, c.Hidden, c.TopK + 1, c.NumExperts, c.Rank, c.WorldSize, c.LocalWorldSize),
        "NumExperts" => new(c.MaxTokens, c.Hidden, c.TopK, c.NumExperts * 2, c.Rank, c.WorldSize, c.LocalWorldSize),
        "MaxTokens" => new(c.MaxTokens * 2, c.Hidden, c.TopK, c.NumExperts, c.Rank, c.WorldSize, c.LocalWorldSize),
        "TokenType" => new(c.MaxTokens, c.Hidden, c.TopK, c.NumExperts, c.Rank, c.WorldSize, c.LocalWorldSize, TokenType.Float32),
        "ExpertAlignment" => new(c.MaxTokens, c.Hidden, c.TopK, c.NumExperts, c.Rank, c.WorldSize, c.LocalWorldSize, expertAlignment: 4),
        "EnableLocalCombine" => new(c.MaxTokens, c.Hidden, c.TopK, c.NumExperts, c.Rank, c.WorldSize, c.LocalWorldSize, enableLocalCombine: true),
        "LocalWorldSize" => new(c.MaxTokens, c.Hidden, c.TopK, c.NumExperts, c.Rank, c.WorldSize, c.LocalWorldSize / 2),
        _ => throw new ArgumentOutOfRangeException(nameof(field), field, "no such variant"),
    };

    /// <summary>Dispatches random input that is valid for <paramref name="layer"/>'s own configuration.</summary>
    private static Task DispatchDrawnAsync(EpAll2AllLayer layer, int seed) => layer.Config.TokenType switch
    {
        TokenType.BFloat16 => DispatchDrawnAsync<BFloat16>(layer, seed),
        TokenType.Float16 => DispatchDrawnAsync<Half>(layer, seed),
        _ => DispatchDrawnAsync<float>(layer, seed),
    };

    private static async Task DispatchDrawnAsync<T>(EpAll2AllLayer layer, int seed)
        where T : unmanaged
    {
        EpConfig c = layer.Config;
        RankInput<T> mine = GroupStep<T>.Draw(c, seed).Inputs[c.Rank];
        await layer.DispatchAsync(Tensor.Create(mine.Tokens, [mine.Count, c.Hidden]), Tensor.Create(mine.ExpertIds, [mine.Count, c.TopK]));
    }

    /// <summary>How soon after the rejection every other rank must have failed: far below the 20 s deadline.</summary>
    private static readonly TimeSpan PromptFailure = TimeSpan.FromSeconds(2);

    /// <summary>
    /// Starts a valid dispatch on every rank but <see cref="BadRank"/>, makes the bad call there, checks that the
    /// others fail at once naming it, then runs the whole step again on every rank and checks it.
    /// </summary>
    private static async Task<TException> DispatchRejectedThenRetriedAsync<TException>(
        EpConfig config,
        int seed,
        Func<EpAll2AllLayer, GroupStep<BFloat16>, Task> badCall,
        bool withWeights = false,
        bool withScatter = false)
        where TException : Exception
    {
        GroupStep<BFloat16> step = GroupStep<BFloat16>.Draw(config, seed, withWeights, withScatter);
        PhaseLog log = new();
        using InProcessGroup group = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(20), Observer = log });
        GroupStep<BFloat16>.Poison(group);
        Task<DispatchResult<BFloat16>>[] tasks = new Task<DispatchResult<BFloat16>>[config.WorldSize];
        int[] others = [.. Enumerable.Range(0, config.WorldSize).Where(r => r != BadRank)];
        foreach (int r in others)
        {
            tasks[r] = Task.Run(() => step.DispatchAsync(group.Layers[r], r).AsTask(), TestContext.Current.CancellationToken);
        }

        await log.WaitForAsync(Phase.DispatchCopyIn, others.Length);

        TException e = await Assert.ThrowsAsync<TException>(() => badCall(group.Layers[BadRank], step));
        await AssertPeersFailedPromptlyAsync(others.Select(r => (r, (Task)tasks[r])), seed);

        await step.RunAsync(group);
        Assert.Equal(0, group.Fabric.PendingMessages);
        return e;
    }

    /// <summary>Each of <paramref name="peers"/> ends within <see cref="PromptFailure"/> with an abort that names <see cref="BadRank"/> and says it rejected its input.</summary>
    private static async Task AssertPeersFailedPromptlyAsync(IEnumerable<(int Rank, Task Call)> peers, int seed)
    {
        long rejected = System.Diagnostics.Stopwatch.GetTimestamp();
        foreach ((int r, Task call) in peers)
        {
            Task done = await Task.WhenAny(call, Task.Delay(PromptFailure, TestContext.Current.CancellationToken));
            Assert.True(done == call, $"seed {seed}: rank {r} was still waiting {PromptFailure.TotalSeconds} s after rank {BadRank} rejected its input");
            EpStepAbortedException a = await Assert.ThrowsAsync<EpStepAbortedException>(() => call);
            Assert.True(a.Rank == BadRank, $"seed {seed}: rank {r} blames rank {a.Rank}: {a.Message}");
            Assert.Contains($"rank {BadRank} rejected its input", a.Message, StringComparison.Ordinal);
        }

        TestContext.Current.TestOutputHelper?.WriteLine($"every other rank failed {System.Diagnostics.Stopwatch.GetElapsedTime(rejected).TotalMilliseconds:0.0} ms after the rejection returned");
    }

    /// <summary>
    /// Runs a whole step, dispatches a second one, starts its combine on every rank but <see cref="BadRank"/>,
    /// makes the bad combine there, checks the others fail at once naming it, then runs a whole step again.
    /// </summary>
    private static async Task<TException> CombineRejectedThenRetriedAsync<TException>(int seed, bool withWeights, Func<CombineCall, Task> badCall)
        where TException : Exception
    {
        EpConfig config = Config();
        PhaseLog log = new();
        using InProcessGroup group = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(20), Observer = log });

        // Operations 1 (dispatch) and 2 (combine): the earlier step; operation 3: this step's dispatch.
        GroupStep<BFloat16> previous = GroupStep<BFloat16>.Draw(config, seed, withWeights);
        DispatchResult<BFloat16>[] before = await previous.DispatchAllAsync(group);
        BFloat16[][] beforeOut = previous.ExpertOutputs(before);
        await previous.AssertCombineAsync(group, before, weighted: false, beforeOut);
        GroupStep<BFloat16> step = GroupStep<BFloat16>.Draw(config, seed + 1, withWeights);
        DispatchResult<BFloat16>[] got = await step.DispatchAllAsync(group);
        step.AssertDispatch(got);
        BFloat16[][] expertOut = step.ExpertOutputs(got);
        CombineOptions options = new(withWeights);

        int started = log.CountOf(Phase.CombineCopyIn);
        Task<Tensor<BFloat16>>[] tasks = new Task<Tensor<BFloat16>>[World];
        int[] others = [.. Enumerable.Range(0, World).Where(r => r != BadRank)];
        foreach (int r in others)
        {
            tasks[r] = Task.Run(() => group.Layers[r].CombineAsync(Tensor.Create(expertOut[r], [got[r].Layout.RecvRows, Hidden]), got[r].Layout, options).AsTask(), TestContext.Current.CancellationToken);
        }

        await log.WaitForAsync(Phase.CombineCopyIn, started + others.Length);
        CombineCall call = new(
            group.Layers[BadRank],
            step,
            got[BadRank].Layout,
            expertOut[BadRank],
            before[BadRank].Layout,
            Tensor.Create(beforeOut[BadRank], [before[BadRank].Layout.RecvRows, Hidden]));

        TException e = await Assert.ThrowsAsync<TException>(() => badCall(call));
        await AssertPeersFailedPromptlyAsync(others.Select(r => (r, (Task)tasks[r])), seed);

        await GroupStep<BFloat16>.Draw(config, seed + 2, withWeights).RunAsync(group);
        Assert.Equal(0, group.Fabric.PendingMessages);
        return e;
    }

    /// <summary>What a bad combine call may use: this step's valid layout and expert output, and the previous step's.</summary>
    private sealed record CombineCall(
        EpAll2AllLayer Layer,
        GroupStep<BFloat16> Step,
        EpAllToAllLayout Layout,
        BFloat16[] ExpertOutputData,
        EpAllToAllLayout PreviousLayout,
        Tensor<BFloat16> PreviousExpertOutput)
    {
        public Tensor<BFloat16> ExpertOutput => Tensor.Create(ExpertOutputData, [Layout.RecvRows, Hidden]);
    }
}

/// <summary>
/// One step's inputs for every rank of a group, drawn from a seed, and what the independent reference makes of
/// them; checks a group's dispatch and combine against it. Every failure message carries the seed.
/// </summary>
/// <typeparam name="T">The token element type.</typeparam>
internal sealed class GroupStep<T>
    where T : unmanaged
{
    private GroupStep(EpConfig config, RankInput<T>[] inputs, int seed)
    {
        Config = config;
        Inputs = inputs;
        Seed = seed;
        Expected = ReferenceAllToAll.Dispatch(config, inputs);
    }

    public EpConfig Config { get; }

    public RankInput<T>[] Inputs { get; }

    public int Seed { get; }

    public ReferenceStep<T> Expected { get; }

    /// <summary>
    /// Draws every rank's input: 2..MaxTokens tokens per rank (or <paramref name="counts"/>), slots dropped at
    /// random except each rank's slot 0, so every rank routes at least one row.
    /// </summary>
    public static GroupStep<T> Draw(EpConfig config, int seed, bool weights = false, bool scatter = false, int[]? counts = null)
    {
        Random rng = new(seed);
        counts ??= [.. Enumerable.Range(0, config.WorldSize).Select(_ => rng.Next(Math.Min(2, config.MaxTokens), config.MaxTokens + 1))];
        RankInput<T>[] inputs = RoutingGenerator.Draw<T>(config, counts, dropRatio: 0.15, skewed: false, weights, rng);
        foreach (RankInput<T> input in inputs.Where(i => i.Count > 0 && i.ExpertIds[0] == config.NumExperts))
        {
            int[] taken = input.ExpertIds[..config.TopK];
            input.ExpertIds[0] = Enumerable.Range(0, config.NumExperts).First(e => !taken.Contains(e));
        }

        if (scatter)
        {
            inputs = StepHarness.WithShuffledScatter(config, inputs, rng);
        }

        return new GroupStep<T>(config, inputs, seed);
    }

    public static GroupStep<T> Of(EpConfig config, RankInput<T>[] inputs, int seed) => new(config, inputs, seed);

    /// <summary>Fills every rank's output and weight buffers with NaN, so a row the step forgets shows.</summary>
    public static void Poison(InProcessGroup group) => Poison(group.Layers);

    public static void Poison(IReadOnlyList<EpAll2AllLayer> layers)
    {
        foreach (EpAll2AllLayer layer in layers)
        {
            Array.Fill(layer.Context.Output<T>(), TokenConvert.FromSingle<T>(float.NaN));
            Array.Fill(layer.Context.WeightBuffer, float.NaN);
        }
    }

    public int Count(int rank) => Inputs[rank].Count;

    public Tensor<T> Tokens(int rank) => Tensor.Create(Inputs[rank].Tokens, [Inputs[rank].Count, Config.Hidden]);

    public Tensor<int> ExpertIds(int rank) => Tensor.Create(Inputs[rank].ExpertIds, [Inputs[rank].Count, Config.TopK]);

    public Tensor<float>? Weights(int rank) => Inputs[rank].Weights is { } w ? Tensor.Create(w, [Inputs[rank].Count, Config.TopK]) : null;

    public Tensor<int>? ScatterIndices(int rank) => Inputs[rank].ScatterIndices is { } s ? Tensor.Create(s, [Inputs[rank].Count, Config.TopK]) : null;

    public ValueTask<DispatchResult<T>> DispatchAsync(EpAll2AllLayer layer, int rank) =>
        layer.DispatchAsync(Tokens(rank), ExpertIds(rank), Weights(rank), ScatterIndices(rank));

    public Task<DispatchResult<T>[]> DispatchAllAsync(InProcessGroup group) => DispatchAllAsync(group.Layers);

    public Task<DispatchResult<T>[]> DispatchAllAsync(IReadOnlyList<EpAll2AllLayer> layers) => OnEveryRankAsync(layers, DispatchAsync);

    /// <summary>Poisons the buffers, dispatches, checks, and combines (unweighted, and weighted when there are weights).</summary>
    public Task RunAsync(InProcessGroup group) => RunAsync(group.Layers);

    /// <inheritdoc cref="RunAsync(InProcessGroup)"/>
    public async Task RunAsync(IReadOnlyList<EpAll2AllLayer> layers)
    {
        Poison(layers);
        DispatchResult<T>[] got = await DispatchAllAsync(layers);
        AssertDispatch(got);
        T[][] expertOut = ExpertOutputs(got);
        await AssertCombineAsync(layers, got, weighted: false, expertOut);
        if (Inputs.All(i => i.Weights is not null))
        {
            await AssertCombineAsync(layers, got, weighted: true, expertOut);
        }
    }

    /// <summary>Output rows, weights and layout exactly as the reference has them.</summary>
    public void AssertDispatch(IReadOnlyList<DispatchResult<T>> got)
    {
        for (int r = 0; r < Config.WorldSize; r++)
        {
            ReferenceDispatch<T> e = Expected.PerRank[r];
            DispatchResult<T> g = got[r];
            string where = $"seed {Seed}, rank {r}";
            Assert.True(g.Output.Lengths.SequenceEqual([e.Rows, Config.Hidden]), $"{where}: output shape [{string.Join(", ", g.Output.Lengths.ToArray())}], expected [{e.Rows}, {Config.Hidden}]");
            T[] output = StepHarness.Flat(g.Output);
            for (int i = 0; i < output.Length; i++)
            {
                Assert.True(EqualityComparer<T>.Default.Equals(e.Output[i], output[i]), $"{where}: output element {i} is {output[i]}, expected {e.Output[i]}");
            }

            Assert.True((e.Weights is null) == (g.Weights is null), $"{where}: weights present {g.Weights is not null}, expected {e.Weights is not null}");
            if (e.Weights is not null)
            {
                Assert.True(e.Weights.SequenceEqual(StepHarness.Flat(g.Weights!)), $"{where}: weights differ");
            }

            Assert.True(e.RowsPerLocalExpert.SequenceEqual(g.Layout.RowsPerLocalExpert.ToArray()), $"{where}: rows per local expert differ");
            Assert.True(e.ExpertRowStarts.SequenceEqual(g.Layout.ExpertRowStarts.ToArray()), $"{where}: expert row starts differ");
            Assert.True(Expected.GlobalScatterIndices[r].SequenceEqual(g.Layout.ScatterIndices.ToArray()), $"{where}: scatter indices differ");
            Assert.True(Expected.TokensPerSourceRank.SequenceEqual(g.Layout.TokensPerSourceRank.ToArray()), $"{where}: tokens per source rank differ");
        }
    }

    /// <summary>The deterministic experts applied to each rank's received rows.</summary>
    public T[][] ExpertOutputs(IReadOnlyList<DispatchResult<T>> got) =>
        [.. got.Select((g, r) => DeterministicExperts.ApplyToBlocks<T>(StepHarness.Flat(g.Output), Config.Hidden, r * Config.ExpertsPerRank, g.Layout.ExpertRowStarts, g.Layout.RowsPerLocalExpert))];

    /// <summary>Combines on every rank and checks the result against the reference.</summary>
    public Task AssertCombineAsync(InProcessGroup group, DispatchResult<T>[] got, bool weighted, T[][]? expertOut = null) =>
        AssertCombineAsync(group.Layers, got, weighted, expertOut);

    /// <inheritdoc cref="AssertCombineAsync(InProcessGroup, DispatchResult{T}[], bool, T[][])"/>
    public async Task AssertCombineAsync(IReadOnlyList<EpAll2AllLayer> layers, DispatchResult<T>[] got, bool weighted, T[][]? expertOut = null)
    {
        expertOut ??= ExpertOutputs(got);
        Tensor<T>[] combined = await OnEveryRankAsync(layers, (layer, r) => layer.CombineAsync(
            Tensor.Create(expertOut[r], [got[r].Layout.RecvRows, Config.Hidden]),
            got[r].Layout,
            new CombineOptions(weighted)));
        AssertCombined(combined, weighted, expertOut);
    }

    /// <summary>
    /// Each rank's combined tokens against the reference combine of the same expert outputs: bit for bit on the
    /// plain intra-node path (the same fp32 sum in the same order), within one rounding of the token type
    /// where partial sums are added in another order.
    /// </summary>
    public void AssertCombined(Tensor<T>[] combined, bool weighted, T[][] expertOut)
    {
        T[][] want = ReferenceAllToAll.Combine(Config, Inputs, Expected, expertOut, weighted);
        bool exact = Config.IsIntraNode && !Config.EnableLocalCombine;
        float ulp = typeof(T) == typeof(BFloat16) ? 1f / 128 : typeof(T) == typeof(Half) ? 1f / 1024 : 1f / (1 << 22);
        for (int r = 0; r < Config.WorldSize; r++)
        {
            T[] got = StepHarness.Flat(combined[r]);
            Assert.True(got.Length == want[r].Length, $"seed {Seed}, rank {r}: {got.Length} combined elements, expected {want[r].Length}");
            for (int i = 0; i < got.Length; i++)
            {
                float w = TokenConvert.ToSingle(want[r][i]);
                float g = TokenConvert.ToSingle(got[i]);
                float tolerance = exact ? 0f : ulp * Math.Max(1f, Math.Abs(w));
                Assert.True(Math.Abs(w - g) <= tolerance, $"seed {Seed}, rank {r}, weighted {weighted}: combined element {i} is {g}, expected {w}");
            }
        }
    }

    /// <summary>Runs <paramref name="operation"/> on every rank at once, as <see cref="InProcessGroup.RunAsync{TResult}"/> does.</summary>
    public static Task<TResult[]> OnEveryRankAsync<TResult>(IReadOnlyList<EpAll2AllLayer> layers, Func<EpAll2AllLayer, int, ValueTask<TResult>> operation) =>
        Task.WhenAll(layers.Select((layer, r) => Task.Run(() => operation(layer, r).AsTask(), TestContext.Current.CancellationToken)));
}

/// <summary>Records which phases each rank has finished, so a test can wait until ranks are inside a step.</summary>
internal sealed class PhaseLog : IPhaseObserver
{
    private readonly ConcurrentQueue<(int Rank, Phase Phase)> seen = new();

    public void OnPhase(int rank, Phase phase, TimeSpan elapsed, long tokens, long bytes) => seen.Enqueue((rank, phase));

    public int CountOf(Phase phase) => seen.Count(x => x.Phase == phase);

    public async Task WaitForAsync(Phase phase, int count)
    {
        using CancellationTokenSource limit = new(TimeSpan.FromSeconds(10));
        while (CountOf(phase) < count)
        {
            await Task.Delay(1, limit.Token);
        }
    }
}

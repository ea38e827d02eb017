using System.Runtime.InteropServices;
using EpA2A.Config;
using EpA2A.Grains;
using EpA2A.Numerics;
using EpA2A.Reference;
using EpA2A.Transport;
using Orleans.Concurrency;

namespace EpA2A.Cluster.Tests;

/// <summary>
/// Hostile input through the grain path (issue 5): through <see cref="ExpertLayerClient"/>, and through direct
/// <see cref="IRankGrain"/> and <see cref="IExpertLayerGrain"/> calls that a client which skips the client's checks
/// could make. Every case is a clear exception (naming the rank and the rule) before anything moves between
/// ranks, and the next valid step on the same layer equals the reference. The in-process API's cases are
/// BadInputTests; malformed safetensors files are SafetensorsValidationTests and StepCommandTests.
/// </summary>
public sealed class HostileInputTests(RankCluster cluster) : IClassFixture<RankCluster>
{
    private const int BadRank = 1;

    private static readonly LayerSpec Spec = new()
    {
        MaxTokens = 16,
        Hidden = 40,
        TopK = 3,
        NumExperts = 8,
        WorldSize = RankCluster.Silos,
        StepTimeout = TimeSpan.FromSeconds(5),
    };

    public static TheoryData<string, string[]> ClientRejects() => new()
    {
        { "expert id above NumExperts", ["rank 1", "= 9 is outside [0, NumExperts = 8]"] },
        { "negative expert id", ["rank 1", "= -1 is outside [0, NumExperts = 8]"] },
        { "tokens of another hidden size", ["rank 1", "Tokens has", "expected Count*Hidden"] },
        { "more tokens than MaxTokens", ["rank 1", "Count = 17 must be in [0, MaxTokens = 16]"] },
        { "negative token count", ["rank 1", "Count = -1 must be in [0, MaxTokens = 16]"] },
        { "expert ids of the wrong shape", ["rank 1", "ExpertIds has", "expected Count*TopK"] },
        { "weights of the wrong shape", ["rank 1", "Weights has", "expected Count*TopK"] },
        { "weights on some ranks only", ["rank 1", "weights must be given for every rank or for none"] },
        { "scatter indices of the wrong shape", ["rank 1", "ScatterIndices has", "expected Count*TopK"] },
        { "null tokens", ["rank 1", "Tokens and ExpertIds must not be null"] },
        { "a rank missing from the inputs", ["3 rank inputs given", "WorldSize = 4"] },
    };

    [Theory]
    [MemberData(nameof(ClientRejects))]
    public async Task Inputs_that_break_the_layers_shape_rules_are_rejected_by_the_client_before_a_step_begins(string bad, string[] message)
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("client-" + bad.Replace(' ', '-'));
        RankInput<BFloat16>[] valid = GrainStepRunner.Draw(Spec, seed, drop: 0, minTokens: 2);
        List<RankStepInput<BFloat16>> inputs = [.. valid.Select(i => new RankStepInput<BFloat16>(i.Tokens, i.Count, i.ExpertIds))];
        RankStepInput<BFloat16> b = inputs[BadRank];
        int n = b.Count;
        inputs[BadRank] = bad switch
        {
            "expert id above NumExperts" => b with { ExpertIds = With(b.ExpertIds, 1, Spec.NumExperts + 1) },
            "negative expert id" => b with { ExpertIds = With(b.ExpertIds, 1, -1) },
            "tokens of another hidden size" => b with { Tokens = b.Tokens[..(n * (Spec.Hidden - 1))] },
            "more tokens than MaxTokens" => new(Tokens(17 * Spec.Hidden), 17, [.. Enumerable.Range(0, 17 * Spec.TopK).Select(i => i % Spec.NumExperts)]),
            "negative token count" => new([], -1, []),
            "expert ids of the wrong shape" => b with { ExpertIds = b.ExpertIds[1..] },
            "weights of the wrong shape" => b with { Weights = new float[(n * Spec.TopK) + 1] },
            "weights on some ranks only" => b with { Weights = [.. Enumerable.Repeat(0.5f, n * Spec.TopK)] },
            "scatter indices of the wrong shape" => b with { ScatterIndices = new int[(n * Spec.TopK) - 1] },
            "null tokens" => b with { Tokens = null! },
            _ => b,
        };
        if (bad == "weights of the wrong shape")
        {
            inputs = [.. inputs.Select((x, r) => r == BadRank ? x : x with { Weights = [.. Enumerable.Repeat(0.5f, x.Count * Spec.TopK)] })];
        }
        else if (bad == "scatter indices of the wrong shape")
        {
            inputs = [.. inputs.Select((x, r) => r == BadRank ? x : x with { ScatterIndices = new int[x.Count * Spec.TopK] })];
        }
        else if (bad == "a rank missing from the inputs")
        {
            inputs.RemoveAt(3);
        }

        CoordinatorInfo before = await client.Coordinator.DescribeAsync();
        ArgumentException e = await Assert.ThrowsAsync<ArgumentException>(() => client.StepAsync(inputs, cancellationToken: TestContext.Current.CancellationToken));
        AssertNames(e, seed, message);

        // Nothing was sent: no step was begun, so no rank saw anything.
        CoordinatorInfo after = await client.Coordinator.DescribeAsync();
        Assert.Equal(before.LastStep, after.LastStep);
        Assert.Null(after.StepInProgress);
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);
    }

    [Fact]
    public async Task Tokens_of_another_element_type_are_rejected_by_the_client_naming_both_types()
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("client-token-type");
        RankInput<BFloat16>[] valid = GrainStepRunner.Draw(Spec, seed);
        RankStepInput<float>[] asFloat = [.. valid.Select(i => new RankStepInput<float>([.. i.Tokens.Select(x => x.ToSingle())], i.Count, i.ExpertIds))];
        ArgumentException e = await Assert.ThrowsAsync<ArgumentException>(() => client.StepAsync(asFloat, cancellationToken: TestContext.Current.CancellationToken));
        AssertNames(e, seed, "elements of Single", "TokenType is BFloat16");
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);
    }

    public static TheoryData<string, string> RankRejects() => new()
    {
        { "a routing weight that is not finite", "is not finite" },
        { "a repeated scatter index", "repeats an earlier index" },
        { "a negative scatter index", "is negative" },
        { "a scatter index past its destination's rows", "= 100000 is outside rank" },
    };

    [Theory]
    [MemberData(nameof(RankRejects))]
    public async Task Inputs_only_a_rank_can_judge_fail_the_step_naming_that_rank_and_the_group_steps_on(string bad, string message)
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("rank-" + bad.Replace(' ', '-').Replace('\'', '-'));
        bool weights = bad.Contains("weight", StringComparison.Ordinal);
        RankInput<BFloat16>[] valid = GrainStepRunner.Draw(Spec, seed, drop: 0, weighted: weights, minTokens: 2);
        int[][]? scatter = weights ? null : [.. ReferenceAllToAll.Dispatch(Spec.ToConfig(0), valid).GlobalScatterIndices.Select(s => s.Select(g => Math.Max(g, 0)).ToArray())];
        if (scatter is not null)
        {
            int[] mine = scatter[BadRank];
            switch (bad)
            {
                case "a repeated scatter index": mine[1] = mine[0]; break;
                case "a negative scatter index": mine[0] = -5; break;
                default: mine[0] = 100_000; break;
            }
        }

        RankStepInput<BFloat16>[] inputs = [.. valid.Select((i, r) => new RankStepInput<BFloat16>(
            i.Tokens,
            i.Count,
            i.ExpertIds,
            weights ? (r == BadRank ? With(i.Weights!, 0, float.NaN) : i.Weights) : null,
            scatter?[r]))];

        GroupStepFailedException e = await Assert.ThrowsAsync<GroupStepFailedException>(() => client.StepAsync(inputs, cancellationToken: TestContext.Current.CancellationToken));
        Assert.Equal([BadRank], e.BlamedRanks);
        AssertNames(e, seed, "rank 1", message);
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);
    }

    [Fact]
    public async Task Expert_outputs_with_the_wrong_row_count_fail_the_step_naming_the_rank_and_the_next_step_is_correct()
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("wrongrows-a");
        GroupStepFailedException e = await Assert.ThrowsAsync<GroupStepFailedException>(() => GrainStepRunner.RunCheckedAsync(client, Spec, seed, drop: 0));
        Assert.Equal([2], e.BlamedRanks);
        AssertNames(e, seed, "rank 2: bad input", "expertOutput has shape");
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);
    }

    public static TheoryData<string, string[]> StagingRejects() => new()
    {
        { "a header announcing more tokens than MaxTokens", ["announces 17 tokens", "MaxTokens = 16"] },
        { "a header announcing a negative token count", ["announces -3 tokens; a rank dispatches 0 to MaxTokens = 16"] },
        { "a chunk past the announced size", ["Tokens chunk [0, 240)", "outside the announced 160 bytes"] },
        { "a chunk whose offset overflows", ["Tokens chunk [2147483640, 2147483800)", "outside the announced"] },
        { "a chunk overlapping an earlier one", ["Tokens chunk [256, 1280)", "overlaps bytes already staged"] },
        { "a short chunk inside an array", ["Tokens chunk [0, 100)", "only the piece that ends the array may be shorter than 1024"] },
        { "a chunk for a step with no header", ["input for step 424242 arrived before its header"] },
        { "a chunk of an array the header did not announce", ["announced no Weights"] },
        { "a whole input announcing more tokens than MaxTokens", ["announces 17 tokens", "MaxTokens = 16"] },
        { "a whole input with tokens past the announced size", ["Tokens chunk [0, 240)", "outside the announced 160 bytes"] },
        { "a whole input with weights its header did not announce", ["announced no Weights"] },
    };

    [Theory]
    [MemberData(nameof(StagingRejects))]
    public async Task Staging_calls_that_break_the_announced_input_are_rejected_by_the_rank_and_the_next_step_is_correct(string bad, string[] message)
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("stage-" + bad.Replace(' ', '-'));
        string layer = client.Layer;
        IRankGrain rank = Rank(BadRank);
        const long step = 424_242;
        byte[] twoTokens = MemoryMarshal.AsBytes(Tokens(2 * Spec.Hidden).AsSpan()).ToArray();
        byte[] allTokens = MemoryMarshal.AsBytes(Tokens(16 * Spec.Hidden).AsSpan()).ToArray();
        Exception e = await Assert.ThrowsAnyAsync<Exception>(async () =>
        {
            switch (bad)
            {
                case "a header announcing more tokens than MaxTokens":
                    await rank.BeginInputAsync(layer, new StepInputHeader(step, 17, false, false));
                    break;
                case "a header announcing a negative token count":
                    await rank.BeginInputAsync(layer, new StepInputHeader(step, -3, false, false));
                    break;
                case "a chunk past the announced size":
                    await rank.BeginInputAsync(layer, new StepInputHeader(step, 2, false, false));
                    await rank.StageInputAsync(layer, step, InputPart.Tokens, 0, new Immutable<byte[]>([.. twoTokens, .. twoTokens[..80]]));
                    break;
                case "a chunk whose offset overflows":
                    await rank.BeginInputAsync(layer, new StepInputHeader(step, 2, false, false));
                    await rank.StageInputAsync(layer, step, InputPart.Tokens, int.MaxValue - 7, new Immutable<byte[]>(twoTokens));
                    break;
                case "a chunk overlapping an earlier one":
                    await rank.BeginInputAsync(layer, new StepInputHeader(step, 16, false, false));
                    await rank.StageInputAsync(layer, step, InputPart.Tokens, 0, new Immutable<byte[]>(allTokens[..1024]));
                    await rank.StageInputAsync(layer, step, InputPart.Tokens, 256, new Immutable<byte[]>(allTokens[256..]));
                    break;
                case "a short chunk inside an array":
                    await rank.BeginInputAsync(layer, new StepInputHeader(step, 16, false, false));
                    await rank.StageInputAsync(layer, step, InputPart.Tokens, 0, new Immutable<byte[]>(allTokens[..100]));
                    break;
                case "a chunk for a step with no header":
                    await rank.StageInputAsync(layer, step, InputPart.Tokens, 0, new Immutable<byte[]>(twoTokens));
                    break;
                case "a chunk of an array the header did not announce":
                    await rank.BeginInputAsync(layer, new StepInputHeader(step, 2, false, false));
                    await rank.StageInputAsync(layer, step, InputPart.Weights, 0, new Immutable<byte[]>(new byte[24]));
                    break;
                case "a whole input announcing more tokens than MaxTokens":
                    await rank.StageStepInputAsync(layer, new StepInput(new StepInputHeader(step, 17, false, false), allTokens, new byte[17 * 3 * 4], default, default));
                    break;
                case "a whole input with tokens past the announced size":
                    await rank.StageStepInputAsync(layer, new StepInput(new StepInputHeader(step, 2, false, false), (byte[])[.. twoTokens, .. twoTokens[..80]], new byte[24], default, default));
                    break;
                default:
                    await rank.StageStepInputAsync(layer, new StepInput(new StepInputHeader(step, 2, false, false), twoTokens, new byte[24], new byte[24], default));
                    break;
            }
        });

        Assert.True(e is ArgumentException or InvalidOperationException, $"seed {seed}: {e.GetType().Name}: {e.Message}");
        AssertNames(e, seed, ["rank 1", .. message]);
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);
    }

    [Theory]
    [InlineData("expert ids out of range")]
    [InlineData("an input with no tokens staged")]
    public async Task A_step_staged_directly_past_the_clients_checks_is_rejected_by_the_rank_before_it_sends(string bad)
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("raw-" + bad.Replace(' ', '-'));
        RankInput<BFloat16>[] inputs = GrainStepRunner.Draw(Spec, seed, drop: 0, minTokens: 2);
        StepTicket ticket = await client.Coordinator.BeginStepAsync(Spec, client.Name);
        for (int r = 0; r < Spec.WorldSize; r++)
        {
            RankInput<BFloat16> i = inputs[r];
            IRankGrain grain = Rank(r);
            await grain.BeginInputAsync(client.Layer, new StepInputHeader(ticket.Step, i.Count, false, false));
            if (!(r == BadRank && bad == "an input with no tokens staged"))
            {
                await grain.StageInputAsync(client.Layer, ticket.Step, InputPart.Tokens, 0, new Immutable<byte[]>(MemoryMarshal.AsBytes(i.Tokens.AsSpan()).ToArray()));
            }

            int[] ids = r == BadRank && bad == "expert ids out of range" ? With(i.ExpertIds, 2, -6) : i.ExpertIds;
            await grain.StageInputAsync(client.Layer, ticket.Step, InputPart.ExpertIds, 0, new Immutable<byte[]>(MemoryMarshal.AsBytes(ids.AsSpan()).ToArray()));
        }

        // Prompt failure (issue 18): the rejecting rank tells its peers and the coordinator aborts the rest, so the step
        // fails in milliseconds, not at the 5 s deadline, and no rank is left waiting.
        long start = System.Diagnostics.Stopwatch.GetTimestamp();
        GroupStepFailedException e = await Assert.ThrowsAsync<GroupStepFailedException>(() => client.Coordinator.RunStepAsync(ticket, false));
        TimeSpan failedAfter = System.Diagnostics.Stopwatch.GetElapsedTime(start);
        RankInfo[] after = [.. await client.Coordinator.DescribeGroupAsync()];
        TestContext.Current.TestOutputHelper?.WriteLine($"{bad}: the step failed after {failedAfter.TotalMilliseconds:0.0} ms (deadline {Spec.StepTimeout.TotalSeconds} s)");
        Assert.True(failedAfter < TimeSpan.FromSeconds(1.5), $"seed {seed}: the step failed only after {failedAfter.TotalMilliseconds:0} ms");
        Assert.All(after, i => Assert.Equal(0, i.StepsInFlight));
        Assert.Equal([BadRank], e.BlamedRanks);
        AssertNames(e, seed, bad == "expert ids out of range" ? ["rank 1: bad input", "expertIds[0, 2] = -6 is outside"] : ["rank 1", $"has 0 of {inputs[BadRank].Count * Spec.Hidden * 2} bytes of Tokens"]);
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);
    }

    public static TheoryData<string, string> MalformedChunks() => new()
    {
        { "TotalBytes absurd", "announces TotalBytes = 2147483647; a message of this layer is in [0, " },
        { "TotalBytes negative", "announces TotalBytes = -1" },
        { "Count zero", "announces Count = 0 chunks" },
        { "Count absurd", "announces Count = 1073741824 chunks; a 8-byte message has 1 to 1" },
        { "Index past Count", "has Index = 2, outside [0, Count = 2)" },
        { "Index negative", "has Index = -1, outside [0, Count = 2)" },
        { "source outside the group", "claims source rank 7" },
        { "source is the receiver itself", "claims source rank 1" },
        { "phase unknown", "has phase 99, which is no exchange" },
        { "operation far ahead", "more than 8 ahead of this rank's operation" },
        { "single chunk shorter than TotalBytes", "is the only chunk but holds 4 of its TotalBytes = 8" },
        { "chunks that do not tile the message", "holds 1000 bytes; the other chunks of its message hold 1024" },
        { "a chunk sent twice", "arrived twice" },
        { "a chunk without data", "carries no data" },
    };

    [Theory]
    [MemberData(nameof(MalformedChunks))]
    public async Task A_malformed_transport_chunk_is_rejected_before_anything_is_allocated_and_the_next_step_is_correct(string bad, string message)
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("chunk-" + bad.Replace(' ', '-'));
        long epoch = (await client.Coordinator.DescribeAsync()).Epoch;
        IRankGrain rank = Rank(BadRank);

        // Barrier messages: well-formed ones are never read by a step, so only the rejection is under test.
        int barrier = (int)ExchangePhase.Barrier;
        TransportChunk chunk = new(epoch, 1, barrier, 0, 0, 1, 8, new TransportChunkData(new byte[8]));
        TransportChunk first = chunk with { Count = 2, TotalBytes = 2048, Data = new TransportChunkData(new byte[1024]) };
        InvalidDataException e = await Assert.ThrowsAsync<InvalidDataException>(async () =>
        {
            switch (bad)
            {
                case "TotalBytes absurd": await rank.DeliverAsync(client.Layer, chunk with { TotalBytes = int.MaxValue, Count = 2 }); break;
                case "TotalBytes negative": await rank.DeliverAsync(client.Layer, chunk with { TotalBytes = -1 }); break;
                case "Count zero": await rank.DeliverAsync(client.Layer, chunk with { Count = 0 }); break;
                case "Count absurd": await rank.DeliverAsync(client.Layer, chunk with { Count = 1 << 30 }); break;
                case "Index past Count": await rank.DeliverAsync(client.Layer, first with { Index = 2 }); break;
                case "Index negative": await rank.DeliverAsync(client.Layer, first with { Index = -1 }); break;
                case "source outside the group": await rank.DeliverAsync(client.Layer, chunk with { Source = 7 }); break;
                case "source is the receiver itself": await rank.DeliverAsync(client.Layer, chunk with { Source = BadRank }); break;
                case "phase unknown": await rank.DeliverAsync(client.Layer, chunk with { Phase = 99 }); break;
                case "operation far ahead": await rank.DeliverAsync(client.Layer, chunk with { Sequence = 1000 }); break;
                case "single chunk shorter than TotalBytes": await rank.DeliverAsync(client.Layer, chunk with { Data = new TransportChunkData(new byte[4]) }); break;
                case "chunks that do not tile the message":
                    TransportChunk three = first with { Count = 3, TotalBytes = 3000 };
                    await rank.DeliverAsync(client.Layer, three);
                    await rank.DeliverAsync(client.Layer, three with { Index = 1, Data = new TransportChunkData(new byte[1000]) });
                    break;
                case "a chunk sent twice":
                    await rank.DeliverAsync(client.Layer, first with { Sequence = 2 });
                    await rank.DeliverAsync(client.Layer, first with { Sequence = 2 });
                    break;
                default: await rank.DeliverAsync(client.Layer, chunk with { Data = null! }); break;
            }
        });

        AssertNames(e, seed, "transport chunk", message);
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);
    }

    [Fact]
    public async Task Chunks_of_an_earlier_epoch_or_an_unknown_layer_are_dropped_without_effect()
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("chunk-stale");
        long epoch = (await client.Coordinator.DescribeAsync()).Epoch;

        // A counts message of operation 1 from rank 0 that, if taken, would break the next step's counts exchange.
        byte[] junk = [.. Enumerable.Range(0, 64).Select(i => (byte)(i * 37))];
        TransportChunk counts = new(epoch - 1, 1, (int)ExchangePhase.Counts, 0, 0, 1, junk.Length, new TransportChunkData(junk));
        await Rank(BadRank).DeliverAsync(client.Layer, counts);
        await Rank(BadRank).DeliverAsync("no-such-layer", counts with { Epoch = epoch });
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed);
    }

    [Fact]
    public async Task A_flood_of_messages_is_refused_past_the_bound_and_re_configuring_the_layer_heals_it()
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("chunk-flood");
        long epoch = (await client.Coordinator.DescribeAsync()).Epoch;
        int accepted = 0;
        InvalidDataException? refused = null;
        foreach (int phase in Enum.GetValues<ExchangePhase>().Select(p => (int)p))
        {
            foreach (long sequence in Enumerable.Range(1, 8))
            {
                foreach (int source in new[] { 0, 2, 3 })
                {
                    try
                    {
                        await Rank(BadRank).DeliverAsync(client.Layer, new TransportChunk(epoch, sequence, phase, source, 0, 1, 4, new TransportChunkData(new byte[4])));
                        accepted++;
                    }
                    catch (InvalidDataException e)
                    {
                        refused ??= e;
                    }
                }
            }
        }

        int bound = (16 * Spec.WorldSize) + 64;
        Assert.Equal(bound, accepted);
        Assert.NotNull(refused);
        AssertNames(refused, seed, $"would exceed the {bound} messages a rank holds at once");

        // The flood sits in the layer's mailbox as messages of the next operations; forming the layer anew drops it.
        await client.ConfigureAsync(Spec);
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);
    }

    [Fact]
    public async Task Messages_begun_past_the_byte_budget_are_refused_so_tiny_chunks_cannot_make_a_rank_allocate_without_bound()
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("chunk-budget");
        long epoch = (await client.Coordinator.DescribeAsync()).Epoch;
        int largest = Grains.Ranks.MessageAssembler.LargestMessage(Spec.ToConfig(BadRank));
        long budget = 2L * Spec.WorldSize * largest;
        int half = (largest + 1) / 2;
        int begun = 0;
        InvalidDataException? refused = null;
        foreach (long sequence in Enumerable.Range(1, 3))
        {
            foreach (int source in new[] { 0, 2, 3 })
            {
                try
                {
                    // The first half of a largest-size message: the rank makes the whole message's buffer.
                    await Rank(BadRank).DeliverAsync(client.Layer, new TransportChunk(epoch, sequence, (int)ExchangePhase.Barrier, source, 0, 2, largest, new TransportChunkData(new byte[half])));
                    begun++;
                }
                catch (InvalidDataException e)
                {
                    refused ??= e;
                }
            }
        }

        Assert.Equal(budget / largest, begun);
        Assert.NotNull(refused);
        AssertNames(refused, seed, $"would make the messages being assembled exceed {budget} bytes");
        await client.ConfigureAsync(Spec);
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);
    }

    [Fact]
    public async Task Reading_outside_the_combined_output_or_another_steps_output_is_rejected()
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("read-output");
        StepReport report = await GrainStepRunner.RunCheckedAsync(client, Spec, seed);
        IRankGrain rank = Rank(BadRank);
        ArgumentOutOfRangeException past = await Assert.ThrowsAsync<ArgumentOutOfRangeException>(() => rank.ReadOutputAsync(client.Layer, report.Step, 1, int.MaxValue));
        AssertNames(past, seed, "slice [1, 2147483648) is outside the");
        InvalidOperationException other = await Assert.ThrowsAsync<InvalidOperationException>(() => rank.ReadOutputAsync(client.Layer, report.Step + 7, 0, 1));
        AssertNames(other, seed, $"no combined output for step {report.Step + 7}");
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);
    }

    [Fact]
    public async Task A_rank_that_dispatched_no_token_reads_an_empty_output_of_its_step()
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("read-empty");
        int[] counts = [.. Enumerable.Range(0, Spec.WorldSize).Select(r => r == BadRank ? 0 : Spec.MaxTokens)];
        RankInput<BFloat16>[] inputs = RoutingGenerator.Draw<BFloat16>(Spec.ToConfig(0), counts, 0.2, false, false, new Random(seed));
        StepOutcome<BFloat16> outcome = await client.StepAsync([.. inputs.Select(i => new RankStepInput<BFloat16>(i.Tokens, i.Count, i.ExpertIds))], cancellationToken: TestContext.Current.CancellationToken);
        GrainStepRunner.AssertMatches(Spec, seed, GrainStepRunner.Expected(Spec, inputs, false), outcome.Outputs);
        Assert.Equal(0, outcome.Report.Ranks.Single(r => r.Rank == BadRank).OutputBytes);

        // Reading all of a rank's output, as a caller does from the report, works for a rank with no token too.
        byte[] empty = (await Rank(BadRank).ReadOutputAsync(client.Layer, outcome.Report.Step, 0, 0)).Value;
        Assert.Empty(empty);
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);
    }

    [Fact]
    public async Task A_step_asked_for_again_answers_with_its_one_run_and_runs_nothing_twice()
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("ask-again");
        RankInput<BFloat16>[] inputs = GrainStepRunner.Draw(Spec, seed, minTokens: 1);
        StepTicket ticket = await client.Coordinator.BeginStepAsync(Spec, client.Name);
        await StageByHandAsync(client.Layer, ticket, inputs);

        // Asked twice at once (a lost answer's second ask arriving while the step runs), then once more after it ran.
        StepReport[] both = await Task.WhenAll(client.Coordinator.RunStepAsync(ticket, false), client.Coordinator.RunStepAsync(ticket, false));
        StepReport again = await client.Coordinator.RunStepAsync(ticket, false);
        Assert.All([both[1], again], r => Assert.Equal(both[0].Ranks.Select(x => (x.Rank, x.ReceivedRows, x.OutputBytes)), r.Ranks.Select(x => (x.Rank, x.ReceivedRows, x.OutputBytes))));
        CoordinatorInfo info = await client.Coordinator.DescribeAsync();
        Assert.Equal(ticket.Step, info.LastStep);

        // Each rank's output was produced once and reads back right.
        BFloat16[][] outputs = await Task.WhenAll(both[0].Ranks.OrderBy(r => r.Rank).Select(async r =>
            MemoryMarshal.Cast<byte, BFloat16>((await Rank(r.Rank).ReadOutputAsync(client.Layer, ticket.Step, 0, r.OutputBytes)).Value).ToArray()));
        GrainStepRunner.AssertMatches(Spec, seed, GrainStepRunner.Expected(Spec, inputs, false), outputs);
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);
    }

    [Fact]
    public async Task Staging_and_reads_asked_again_for_the_same_step_are_taken_once_and_the_step_is_correct()
    {
        // The client asks a rank call again when its answer is lost (issue 18): every repeat must be the same input.
        (ExpertLayerClient client, int seed) = await LayerAsync("ask-rank-again");
        string layer = client.Layer;
        int[] counts = [.. Enumerable.Repeat(Spec.MaxTokens, Spec.WorldSize)];
        RankInput<BFloat16>[] inputs = RoutingGenerator.Draw<BFloat16>(Spec.ToConfig(0), counts, 0.2, false, false, new Random(seed));
        StepTicket ticket = await client.Coordinator.BeginStepAsync(Spec, client.Name);
        StepInput[] wholes = new StepInput[Spec.WorldSize];
        for (int r = 0; r < Spec.WorldSize; r++)
        {
            IRankGrain grain = Rank(r);
            StepInputHeader header = new(ticket.Step, inputs[r].Count, false, false, ticket.Epoch);
            byte[] tokens = MemoryMarshal.AsBytes(inputs[r].Tokens.AsSpan()).ToArray();
            byte[] ids = MemoryMarshal.AsBytes(inputs[r].ExpertIds.AsSpan()).ToArray();
            wholes[r] = new StepInput(header, tokens, ids, default, default);
            if (r % 2 == 0)
            {
                // The one-call path: two asks at once (the first's answer was late), and one more after both answered.
                await Task.WhenAll(grain.StageStepInputAsync(layer, wholes[r]), grain.StageStepInputAsync(layer, wholes[r]));
                await grain.StageStepInputAsync(layer, wholes[r]);
                continue;
            }

            // The chunked path (1024-byte chunks): the header again after a chunk, every chunk twice.
            Assert.True(tokens.Length > 1024, $"seed {seed}: rank {r} stages {tokens.Length} token bytes, too few for two chunks");
            await grain.BeginInputAsync(layer, header);
            await grain.StageInputAsync(layer, ticket.Step, InputPart.Tokens, 0, new Immutable<byte[]>(tokens[..1024]));
            await grain.BeginInputAsync(layer, header);
            await Task.WhenAll(
                grain.StageInputAsync(layer, ticket.Step, InputPart.Tokens, 0, new Immutable<byte[]>(tokens[..1024])),
                grain.StageInputAsync(layer, ticket.Step, InputPart.Tokens, 1024, new Immutable<byte[]>(tokens[1024..])),
                grain.StageInputAsync(layer, ticket.Step, InputPart.Tokens, 1024, new Immutable<byte[]>(tokens[1024..])),
                grain.StageInputAsync(layer, ticket.Step, InputPart.ExpertIds, 0, new Immutable<byte[]>(ids)));
            await grain.StageInputAsync(layer, ticket.Step, InputPart.ExpertIds, 0, new Immutable<byte[]>(ids));

            // The same place with other bytes is no repeat: refused, and the staged bytes stay.
            byte[] other = tokens[..1024];
            other[5] ^= 0x40;
            ArgumentException changed = await Assert.ThrowsAsync<ArgumentException>(() => grain.StageInputAsync(layer, ticket.Step, InputPart.Tokens, 0, new Immutable<byte[]>(other)));
            AssertNames(changed, seed, $"rank {r}", "Tokens chunk [0, 1024)", "overlaps bytes already staged");
        }

        StepReport report = await client.Coordinator.RunStepAsync(ticket, false);

        // A slice read twice counts once: after a later step the rest of the output is still there to read.
        BFloat16[][] outputs = new BFloat16[Spec.WorldSize][];
        for (int r = 0; r < Spec.WorldSize; r++)
        {
            int bytes = report.Ranks.Single(x => x.Rank == r).OutputBytes;
            int half = bytes / 2;
            byte[] first = (await Rank(r).ReadOutputAsync(layer, ticket.Step, 0, half)).Value;
            Assert.Equal(first, (await Rank(r).ReadOutputAsync(layer, ticket.Step, 0, half)).Value);
            outputs[r] = [.. MemoryMarshal.Cast<byte, BFloat16>(first)];
        }

        // Late repeats of the step's staging (an ask that was still on its way) are refused and stage nothing.
        InvalidOperationException late = await Assert.ThrowsAsync<InvalidOperationException>(() => Rank(0).StageStepInputAsync(layer, wholes[0]));
        AssertNames(late, seed, "rank 0", $"input for step {ticket.Step} arrived after step {ticket.Step} ran", "a late repeat, refused");
        InvalidOperationException lateChunk = await Assert.ThrowsAsync<InvalidOperationException>(() => Rank(1).StageInputAsync(layer, ticket.Step, InputPart.ExpertIds, 0, new Immutable<byte[]>(wholes[1].ExpertIds.ToArray())));
        AssertNames(lateChunk, seed, "rank 1", "a late repeat, refused");
        await Assert.ThrowsAsync<InvalidOperationException>(() => Rank(1).BeginInputAsync(layer, wholes[1].Header));
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);

        for (int r = 0; r < Spec.WorldSize; r++)
        {
            int bytes = report.Ranks.Single(x => x.Rank == r).OutputBytes;
            int half = bytes / 2;
            byte[] rest = (await Rank(r).ReadOutputAsync(layer, ticket.Step, half, bytes - half)).Value;
            outputs[r] = [.. outputs[r], .. MemoryMarshal.Cast<byte, BFloat16>(rest)];
        }

        GrainStepRunner.AssertMatches(Spec, seed, GrainStepRunner.Expected(Spec, inputs, false), outputs);
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 2);
    }

    [Fact]
    public async Task Running_a_step_that_was_never_begun_is_rejected_by_the_coordinator()
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("forged-ticket");
        CoordinatorInfo info = await client.Coordinator.DescribeAsync();
        InvalidOperationException e = await Assert.ThrowsAsync<InvalidOperationException>(() => client.Coordinator.RunStepAsync(new StepTicket(info.LastStep + 5, info.Epoch), false));
        AssertNames(e, seed, $"step {info.LastStep + 5}", "is not the step in progress (none)");
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);
    }

    [Fact]
    public async Task A_step_begun_while_another_is_in_progress_is_refused_and_the_first_completes_correctly()
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("slow-overlap"); // rank 1's experts take 0.5 s
        ExpertLayerClient other = new(cluster.Grains, RankCluster.Group, client.Layer);

        // The first step is staged by hand, so the second can arrive between its begin and its run.
        RankInput<BFloat16>[] inputs = GrainStepRunner.Draw(Spec, seed);
        StepTicket ticket = await client.Coordinator.BeginStepAsync(Spec, client.Name);
        RankInput<BFloat16>[] secondInputs = GrainStepRunner.Draw(Spec, seed + 1);
        InvalidOperationException e = await Assert.ThrowsAsync<InvalidOperationException>(() =>
            other.StepAsync([.. secondInputs.Select(i => new RankStepInput<BFloat16>(i.Tokens, i.Count, i.ExpertIds))], cancellationToken: TestContext.Current.CancellationToken));
        AssertNames(e, seed, $"step {ticket.Step} of layer 'slow-overlap' is in progress", "must not overlap");

        await StageByHandAsync(client.Layer, ticket, inputs);

        StepReport report = await client.Coordinator.RunStepAsync(ticket, false);
        BFloat16[][] outputs = await Task.WhenAll(report.Ranks.OrderBy(r => r.Rank).Select(async r =>
            MemoryMarshal.Cast<byte, BFloat16>((await Rank(r.Rank).ReadOutputAsync(client.Layer, ticket.Step, 0, r.OutputBytes)).Value).ToArray()));
        GrainStepRunner.AssertMatches(Spec, seed, GrainStepRunner.Expected(Spec, inputs, false), outputs);

        // Two steps at once on one client: the second is refused at once; the first (0.5 s long) completes correctly.
        RankInput<BFloat16>[] a = GrainStepRunner.Draw(Spec, seed + 2);
        Task<StepOutcome<BFloat16>> running = client.StepAsync([.. a.Select(i => new RankStepInput<BFloat16>(i.Tokens, i.Count, i.ExpertIds))], cancellationToken: TestContext.Current.CancellationToken);
        InvalidOperationException twice = await Assert.ThrowsAsync<InvalidOperationException>(() =>
            client.StepAsync([.. secondInputs.Select(i => new RankStepInput<BFloat16>(i.Tokens, i.Count, i.ExpertIds))], cancellationToken: TestContext.Current.CancellationToken));
        AssertNames(twice, seed, "already in flight on this client");
        GrainStepRunner.AssertMatches(Spec, seed, GrainStepRunner.Expected(Spec, a, false), (await running).Outputs);
        await GrainStepRunner.RunCheckedAsync(other, Spec, seed + 3);
    }

    [Fact]
    public async Task Calls_to_a_rank_after_its_layer_is_disposed_fail_naming_it_and_the_group_re_forms()
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("disposed");
        await Rank(BadRank).DropLayerAsync(client.Layer);
        InvalidOperationException direct = await Assert.ThrowsAsync<InvalidOperationException>(() =>
            Rank(BadRank).BeginInputAsync(client.Layer, new StepInputHeader(1, 1, false, false)));
        AssertNames(direct, seed, "rank 1", "hosts no layer 'disposed'");

        GroupStepFailedException e = await Assert.ThrowsAsync<GroupStepFailedException>(() => GrainStepRunner.RunCheckedAsync(client, Spec, seed));
        Assert.Equal([BadRank], e.BlamedRanks);
        AssertNames(e, seed, "staging the input failed on rank 1", "hosts no layer");
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);
    }

    [Fact]
    public async Task A_rank_configured_differently_fails_the_step_naming_the_field_and_the_group_re_forms()
    {
        (ExpertLayerClient client, int seed) = await LayerAsync("disagree");
        long epoch = (await client.Coordinator.DescribeAsync()).Epoch;
        await Rank(3).CreateLayerAsync(client.Layer, Spec with { LocalWorldSize = 2 }, epoch);
        GroupStepFailedException e = await Assert.ThrowsAsync<GroupStepFailedException>(() => GrainStepRunner.RunCheckedAsync(client, Spec, seed));
        AssertNames(e, seed, "ranks disagree", "LocalWorldSize", "rank 3 has");
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);
    }

    [Fact]
    public async Task A_layer_over_more_ranks_than_the_group_has_fails_to_form_naming_the_missing_rank()
    {
        ExpertLayerClient client = new(cluster.Grains, RankCluster.Group, "too-wide");
        GroupStepFailedException e = await Assert.ThrowsAsync<GroupStepFailedException>(() => client.ConfigureAsync(Spec with { WorldSize = 5, NumExperts = 10 }));
        Assert.Equal([4], e.BlamedRanks);
        AssertNames(e, 0, "could not form layer 'too-wide'", "rank 4");
        await client.ConfigureAsync(Spec);
        await GrainStepRunner.RunCheckedAsync(client, Spec, Environment.TickCount);
    }

    private async Task<(ExpertLayerClient Client, int Seed)> LayerAsync(string name)
    {
        ExpertLayerClient client = new(cluster.Grains, RankCluster.Group, name);
        await client.ConfigureAsync(Spec);
        return (client, Environment.TickCount);
    }

    // IRankGrain (every role at once) on purpose: a hostile caller is not held to one role, so these cases call
    // the coordinator's, the client's and the peers' methods of the same rank.
    private IRankGrain Rank(int rank) => cluster.Grains.GetGrain<IRankGrain>(GrainKeys.Rank(RankCluster.Group, rank));

    private static BFloat16[] Tokens(int count) => [.. Enumerable.Range(1, count).Select(i => BFloat16.FromSingle((i % 13) - 6.5f))];

    private static TElement[] With<TElement>(TElement[] values, int index, TElement value)
    {
        TElement[] copy = [.. values];
        copy[index] = value;
        return copy;
    }

    private static void AssertNames(Exception e, int seed, params string[] parts)
    {
        foreach (string part in parts)
        {
            Assert.True(e.Message.Contains(part, StringComparison.Ordinal), $"seed {seed}: the {e.GetType().Name} does not say \"{part}\": {e.Message}");
        }
    }

    /// <summary>Stages a begun step's inputs on every rank directly, as the client would.</summary>
    private async Task StageByHandAsync(string layer, StepTicket ticket, RankInput<BFloat16>[] inputs)
    {
        for (int r = 0; r < Spec.WorldSize; r++)
        {
            IRankGrain grain = Rank(r);
            await grain.BeginInputAsync(layer, new StepInputHeader(ticket.Step, inputs[r].Count, false, false));
            if (inputs[r].Count > 0)
            {
                await grain.StageInputAsync(layer, ticket.Step, InputPart.Tokens, 0, new Immutable<byte[]>(MemoryMarshal.AsBytes(inputs[r].Tokens.AsSpan()).ToArray()));
                await grain.StageInputAsync(layer, ticket.Step, InputPart.ExpertIds, 0, new Immutable<byte[]>(MemoryMarshal.AsBytes(inputs[r].ExpertIds.AsSpan()).ToArray()));
            }
        }
    }
}

using System.Runtime.InteropServices;
using EpA2A.Grains;
using EpA2A.Numerics;
using EpA2A.Reference;
using Orleans.Concurrency;

namespace EpA2A.Cluster.Tests;

/// <summary>
/// One spec per client (issue 17, finding 1): a step runs only under the spec its client configured, a layer another
/// client is stepping is re-configured only when asked for explicitly, and that client's next step fails naming who
/// re-configured it and what changed, never a step under a spec it did not check. Two clients on one layer never lose
/// a step that ran (finding 10): outputs are kept per step until read. The same with two real `epa2a drive` processes
/// is <c>MultiProcess.TwoClientProcessTests</c>.
/// </summary>
public sealed class SpecPinningTests(RankCluster cluster) : IClassFixture<RankCluster>
{
    private static readonly LayerSpec Spec = new()
    {
        MaxTokens = 24,
        Hidden = 32,
        TopK = 4,
        NumExperts = 16,
        WorldSize = RankCluster.Silos,
        StepTimeout = TimeSpan.FromSeconds(5),
    };

    public static TheoryData<string> Changes() => ["experts 16 -> 32", "hidden 32 -> 64"];

    [Theory]
    [MemberData(nameof(Changes))]
    public async Task Re_configuring_a_layer_another_client_steps_is_refused_and_a_take_over_fails_that_clients_next_step_by_name(string change)
    {
        int seed = Environment.TickCount;
        string layer = "pin-" + change.Split(' ')[0];
        LayerSpec changed = change.StartsWith("experts", StringComparison.Ordinal) ? Spec with { NumExperts = 32 } : Spec with { Hidden = 64 };
        string field = change.StartsWith("experts", StringComparison.Ordinal) ? "NumExperts 16 -> 32" : "Hidden 32 -> 64";
        ExpertLayerClient first = new(cluster.Grains, RankCluster.Group, layer, clientName: "client A");
        ExpertLayerClient second = new(cluster.Grains, RankCluster.Group, layer, clientName: "client B");
        await first.ConfigureAsync(Spec);
        await GrainStepRunner.RunCheckedAsync(first, Spec, seed);

        LayerSpecConflictException refused = await Assert.ThrowsAsync<LayerSpecConflictException>(() => second.ConfigureAsync(changed));
        AssertNames(refused, seed, "is being stepped by client A", field, "client B asked for", "--take-over");
        await GrainStepRunner.RunCheckedAsync(first, Spec, seed + 1); // the refusal left the layer as it was

        await second.ConfigureAsync(changed, takeOver: true);
        LayerSpecConflictException stale = await Assert.ThrowsAsync<LayerSpecConflictException>(() => GrainStepRunner.RunCheckedAsync(first, Spec, seed + 2));
        AssertNames(stale, seed, $"layer '{layer}'", "was re-configured by client B", field);
        Assert.Equal("client B", stale.ConfiguredBy);
        await GrainStepRunner.RunCheckedAsync(second, changed, seed + 3);

        // The first client configures again (the new owner has stepped just now, so it must take over too).
        await Assert.ThrowsAsync<LayerSpecConflictException>(() => first.ConfigureAsync(Spec));
        await first.ConfigureAsync(Spec, takeOver: true);
        await GrainStepRunner.RunCheckedAsync(first, Spec, seed + 4);
    }

    [Fact]
    public async Task A_client_that_adopted_a_layer_keeps_the_spec_it_first_saw()
    {
        int seed = Environment.TickCount;
        ExpertLayerClient owner = new(cluster.Grains, RankCluster.Group, "pin-adopt", clientName: "owner");
        ExpertLayerClient adopter = new(cluster.Grains, RankCluster.Group, "pin-adopt", clientName: "adopter");
        await owner.ConfigureAsync(Spec);
        await GrainStepRunner.RunCheckedAsync(adopter, Spec, seed);
        Assert.Equal(Spec, adopter.Spec);

        // The adopter stepped just now, so even the owner's re-configuration is refused until it takes over.
        await Assert.ThrowsAsync<LayerSpecConflictException>(() => owner.ConfigureAsync(Spec with { TopK = 2 }));
        await owner.ConfigureAsync(Spec with { TopK = 2 }, takeOver: true);
        LayerSpecConflictException e = await Assert.ThrowsAsync<LayerSpecConflictException>(() => GrainStepRunner.RunCheckedAsync(adopter, Spec, seed + 1));
        AssertNames(e, seed, "re-configured by owner", "TopK 4 -> 2");
    }

    [Fact]
    public async Task The_same_spec_from_another_client_leaves_the_formed_group_and_a_begun_step_alone()
    {
        int seed = Environment.TickCount;
        ExpertLayerClient first = new(cluster.Grains, RankCluster.Group, "pin-same", clientName: "first");
        ExpertLayerClient second = new(cluster.Grains, RankCluster.Group, "pin-same", clientName: "second");
        await first.ConfigureAsync(Spec);
        await GrainStepRunner.RunCheckedAsync(first, Spec, seed);
        CoordinatorInfo before = await first.Coordinator.DescribeAsync();
        StepTicket ticket = await first.Coordinator.BeginStepAsync(Spec, first.Name);

        await second.ConfigureAsync(Spec);
        CoordinatorInfo after = await first.Coordinator.DescribeAsync();
        Assert.Equal(before.Epoch, after.Epoch);
        Assert.Equal(ticket.Step, after.StepInProgress);
        Assert.Equal("first", after.ConfiguredBy);
        await first.Coordinator.AbandonStepAsync(ticket, "test");
        await GrainStepRunner.RunCheckedAsync(second, Spec, seed + 1);
    }

    [Fact]
    public async Task A_step_that_ran_keeps_its_output_until_read_while_another_clients_step_runs()
    {
        int seed = Environment.TickCount;
        ExpertLayerClient first = new(cluster.Grains, RankCluster.Group, "pin-read", clientName: "first");
        ExpertLayerClient second = new(cluster.Grains, RankCluster.Group, "pin-read", clientName: "second");
        await first.ConfigureAsync(Spec);

        // The first client's step runs, but its outputs are read only after the second client's whole step.
        RankInput<BFloat16>[] inputs = GrainStepRunner.Draw(Spec, seed, minTokens: 1);
        StepTicket ticket = await first.Coordinator.BeginStepAsync(Spec, first.Name);
        for (int r = 0; r < Spec.WorldSize; r++)
        {
            IRankStaging grain = Rank(r);
            await grain.BeginInputAsync(first.Layer, new StepInputHeader(ticket.Step, inputs[r].Count, false, false, ticket.Epoch));
            await grain.StageInputAsync(first.Layer, ticket.Step, InputPart.Tokens, 0, new Immutable<byte[]>(MemoryMarshal.AsBytes(inputs[r].Tokens.AsSpan()).ToArray()));
            await grain.StageInputAsync(first.Layer, ticket.Step, InputPart.ExpertIds, 0, new Immutable<byte[]>(MemoryMarshal.AsBytes(inputs[r].ExpertIds.AsSpan()).ToArray()));
        }

        StepReport report = await first.Coordinator.RunStepAsync(ticket, false);
        await GrainStepRunner.RunCheckedAsync(second, Spec, seed + 1);

        BFloat16[][] got = new BFloat16[Spec.WorldSize][];
        for (int r = 0; r < Spec.WorldSize; r++)
        {
            int bytes = report.Ranks.Single(x => x.Rank == r).OutputBytes;
            Immutable<byte[]> data = await Rank(r).ReadOutputAsync(first.Layer, ticket.Step, 0, bytes);
            got[r] = MemoryMarshal.Cast<byte, BFloat16>(data.Value).ToArray();
        }

        GrainStepRunner.AssertMatches(Spec, seed, GrainStepRunner.Expected(Spec, inputs, false), got);

        // Read whole and followed by another step, it is gone: a repeated read names the step.
        await GrainStepRunner.RunCheckedAsync(second, Spec, seed + 2);
        InvalidOperationException again = await Assert.ThrowsAsync<InvalidOperationException>(() => Rank(0).ReadOutputAsync(first.Layer, ticket.Step, 0, 2));
        AssertNames(again, seed, $"no combined output for step {ticket.Step}", "already read");
    }

    [Fact]
    public async Task Input_staged_for_a_step_of_an_earlier_formation_is_refused_by_the_rank()
    {
        int seed = Environment.TickCount;
        ExpertLayerClient client = new(cluster.Grains, RankCluster.Group, "pin-epoch", clientName: "stale");
        await client.ConfigureAsync(Spec);
        StepTicket ticket = await client.Coordinator.BeginStepAsync(Spec, client.Name);
        await client.Coordinator.AbandonStepAsync(ticket, "test: the group re-forms at the next step");
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed); // a new formation, a new epoch
        InvalidOperationException e = await Assert.ThrowsAsync<InvalidOperationException>(() =>
            Rank(2).BeginInputAsync(client.Layer, new StepInputHeader(ticket.Step, 1, false, false, ticket.Epoch)));
        AssertNames(e, seed, "rank 2", $"belongs to epoch {ticket.Epoch}", "formed anew");
        await GrainStepRunner.RunCheckedAsync(client, Spec, seed + 1);
    }

    /// <summary>A rank as a client sees it: it stages inputs and reads outputs.</summary>
    private IRankStaging Rank(int rank) => cluster.Grains.GetGrain<IRankStaging>(GrainKeys.Rank(RankCluster.Group, rank));

    private static void AssertNames(Exception e, int seed, params string[] parts)
    {
        foreach (string part in parts)
        {
            Assert.True(e.Message.Contains(part, StringComparison.Ordinal), $"seed {seed}: '{part}' missing from: {e.Message}");
        }
    }
}

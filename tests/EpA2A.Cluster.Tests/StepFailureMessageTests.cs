using EpA2A.Grains;

namespace EpA2A.Cluster.Tests;

/// <summary>
/// Issue 18 (and issue 17's promise): a step that fails through the grains ends in a message of meaning, naming the
/// rank and the cause, never a .NET stack trace or a nested exception dump, for each kind of rank failure: input a
/// rank refused, a rank past the deadline, and a rank whose silo is lost.
/// </summary>
public sealed class StepFailureMessageTests(RankCluster cluster) : IClassFixture<RankCluster>
{
    private static LayerSpec Spec(TimeSpan deadline) => new()
    {
        MaxTokens = 16,
        Hidden = 24,
        TopK = 2,
        NumExperts = 8,
        WorldSize = RankCluster.Silos,
        StepTimeout = deadline,
    };

    [Fact]
    public async Task A_rank_that_refuses_its_input_fails_the_step_in_a_message_naming_it_without_a_stack_trace()
    {
        LayerSpec spec = Spec(TimeSpan.FromSeconds(5));
        ExpertLayerClient client = new(cluster.Grains, RankCluster.Group, "wrongrows-message");
        await client.ConfigureAsync(spec);
        GroupStepFailedException e = await Assert.ThrowsAsync<GroupStepFailedException>(() => GrainStepRunner.RunCheckedAsync(client, spec, 11, drop: 0));
        AssertOneMessageOfMeaning(e, "rank 2", "bad input");
    }

    [Fact]
    public async Task A_rank_past_the_deadline_fails_the_step_in_a_message_naming_it_without_a_stack_trace()
    {
        LayerSpec spec = Spec(TimeSpan.FromSeconds(2));
        ExpertLayerClient client = new(cluster.Grains, RankCluster.Group, "stall-message");
        await client.ConfigureAsync(spec);
        GroupStepFailedException e = await Assert.ThrowsAsync<GroupStepFailedException>(() => GrainStepRunner.RunCheckedAsync(client, spec, 12, drop: 0));
        AssertOneMessageOfMeaning(e, "rank 1");
    }

    [Fact]
    public async Task A_rank_whose_silo_is_lost_fails_the_step_in_a_message_naming_it_without_a_stack_trace()
    {
        LayerSpec spec = Spec(TimeSpan.FromSeconds(3));
        ExpertLayerClient client = new(cluster.Grains, RankCluster.Group, "lost-message");
        await client.ConfigureAsync(spec);
        await GrainStepRunner.RunCheckedAsync(client, spec, 13);
        await cluster.KillRankAsync(3);
        try
        {
            Exception e = await Assert.ThrowsAnyAsync<Exception>(() => GrainStepRunner.RunCheckedAsync(client, spec, 14));
            AssertOneMessageOfMeaning(e, "rank 3");
        }
        finally
        {
            await cluster.StartRankAsync(3);
        }
    }

    [Fact]
    public async Task A_rank_whose_silo_is_lost_mid_step_fails_the_step_in_a_message_naming_it_without_Orleans_message_dumps()
    {
        // On "slow-*" layers rank 1's experts take half a second: the step is surely in flight when rank 2's silo dies.
        LayerSpec spec = Spec(TimeSpan.FromSeconds(3));
        ExpertLayerClient client = new(cluster.Grains, RankCluster.Group, "slow-lost-message");
        await client.ConfigureAsync(spec);
        await GrainStepRunner.RunCheckedAsync(client, spec, 15);
        Task step = GrainStepRunner.RunCheckedAsync(client, spec, 16);
        await Task.Delay(StallingExpertCompute.Slow / 3, TestContext.Current.CancellationToken);
        await cluster.KillRankAsync(2);
        try
        {
            Exception e = await Assert.ThrowsAnyAsync<Exception>(() => step);
            AssertOneMessageOfMeaning(e, "rank 2");
        }
        finally
        {
            await cluster.StartRankAsync(2);
        }
    }

    /// <summary>The message names <paramref name="parts"/> and holds no stack frame, nested exception or Orleans message dump.</summary>
    private static void AssertOneMessageOfMeaning(Exception e, params string[] parts)
    {
        string message = e.Message;
        TestContext.Current.TestOutputHelper?.WriteLine($"{e.GetType().Name}: {message}");
        foreach (string part in parts)
        {
            Assert.True(message.Contains(part, StringComparison.Ordinal), $"the {e.GetType().Name} does not say \"{part}\": {message}");
        }

        string[] lines = message.Split('\n');
        Assert.DoesNotContain(lines, l => l.TrimStart().StartsWith("at ", StringComparison.Ordinal) && l.StartsWith("   ", StringComparison.Ordinal));
        Assert.DoesNotContain("--->", message, StringComparison.Ordinal);
        Assert.DoesNotContain("--- End of", message, StringComparison.Ordinal);
        Assert.True(lines.Length <= 3, $"{lines.Length} lines: {message}");

        // Orleans' own wording of a message that went nowhere (the request's headers, its routing history) is not meaning.
        Assert.DoesNotContain("Request [", message, StringComparison.Ordinal);
        Assert.DoesNotContain("Target History", message, StringComparison.Ordinal);
        Assert.DoesNotContain("aka.ms", message, StringComparison.Ordinal);
    }
}

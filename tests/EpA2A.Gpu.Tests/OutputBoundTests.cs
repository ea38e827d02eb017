using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Errors;
using EpA2A.Layer;
using EpA2A.Reference;

namespace EpA2A.Tests;

/// <summary>
/// A valid config and valid input whose receive size passes what a rank's dispatch output can hold (issue 17,
/// finding 6: an OverflowException in the CPU backend once growth passed 2^31 bytes) fails the step by name, on every
/// rank, before anything grows; the layer then runs the next step.
/// </summary>
public sealed class OutputBoundTests
{
    [Fact]
    public async Task A_step_receiving_more_bytes_than_an_output_holds_fails_naming_the_rank_and_the_layer_stays_usable()
    {
        int seed = Environment.TickCount;
        // 600 tokens x top-64 on one rank: 38400 rows of 16384 fp32 (64 KiB each), 2.4 GiB; the inputs are 39 MiB.
        EpConfig config = new(maxTokens: 600, hidden: 16384, topK: 64, numExperts: 64, rank: 0, worldSize: 1, localWorldSize: 1, TokenType.Float32);
        Assert.Equal(32767, config.MaxOutputRows);
        using InProcessGroup group = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(20) });
        Random rng = new(seed);
        RankInput<float>[] big = RoutingGenerator.Draw<float>(config, [600], 0, false, false, rng);

        EpStepFailedException e = await Assert.ThrowsAsync<EpStepFailedException>(() => group.RunAsync((layer, r) =>
            layer.DispatchAsync(Tensor.Create(big[r].Tokens, [big[r].Count, config.Hidden]), Tensor.Create(big[r].ExpertIds, [big[r].Count, config.TopK]))));
        Assert.True(e.Message.Contains("rank 0 would receive 38400 rows", StringComparison.Ordinal) && e.Message.Contains("32767 rows", StringComparison.Ordinal), $"seed {seed}: {e.Message}");

        RankInput<float>[] small = RoutingGenerator.Draw<float>(config, [3], 0, false, false, rng);
        var done = await group.RunAsync((layer, r) =>
            layer.DispatchAsync(Tensor.Create(small[r].Tokens, [small[r].Count, config.Hidden]), Tensor.Create(small[r].ExpertIds, [small[r].Count, config.TopK])));
        ReferenceStep<float> want = ReferenceAllToAll.Dispatch(config, small);
        Assert.Equal(want.PerRank[0].Rows, done[0].Layout.RecvRows);
        Assert.Equal(want.PerRank[0].Output, StepHarness.Flat(done[0].Output)[..want.PerRank[0].Output.Length]);
    }
}

using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Layer;
using EpA2A.Numerics;

namespace EpA2A.Tests;

/// <summary>
/// The CPU backend's data plane allocates nothing per row (issue 15): a steady step's messages come from the transport
/// pool and the layer's host copies and sums from its own buffers, so what a step allocates is the combine's result
/// (which the caller keeps) and per-step index arrays, not its token rows. Measured process-wide, so it runs alone.
/// </summary>
[Collection(RunsAlone.Name)]
public sealed class CpuDataPlaneAllocationTests
{
    [Fact]
    public async Task A_steady_step_allocates_no_buffer_for_its_rows_beyond_the_result_it_returns()
    {
        int seed = Random.Shared.Next();
        EpConfig config = new(maxTokens: 128, hidden: 1024, topK: 8, numExperts: 64, rank: 0, worldSize: 4, localWorldSize: 4);
        int[] counts = [.. Enumerable.Repeat(config.MaxTokens, config.WorldSize)];
        GroupStep<BFloat16> step = GroupStep<BFloat16>.Draw(config, seed, counts: counts);
        using InProcessGroup group = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(30) });
        long rowBytes = (long)config.Hidden * config.TokenBytes;

        DispatchResult<BFloat16>[] first = await step.DispatchAllAsync(group);
        BFloat16[][] expertOut = step.ExpertOutputs(first);
        Tensor<BFloat16>[] outputs = [.. expertOut.Select((e, r) => Tensor.Create(e, [first[r].Layout.RecvRows, config.Hidden]))];
        long rows = first.Sum(d => (long)d.Layout.RecvRows);

        async Task RunStepsAsync(int steps)
        {
            for (int s = 0; s < steps; s++)
            {
                DispatchResult<BFloat16>[] got = await step.DispatchAllAsync(group);
                await group.RunAsync((layer, r) => layer.CombineAsync(outputs[r], got[r].Layout));
            }
        }

        await RunStepsAsync(3); // the pool and the layers' buffers reach their sizes
        const int Measured = 5;
        long before = GC.GetTotalAllocatedBytes(precise: true);
        await RunStepsAsync(Measured);
        long perStep = (GC.GetTotalAllocatedBytes(precise: true) - before) / Measured;

        // What each step must allocate: the combined tokens it returns. Allowed beyond that: index arrays (a few ints per
        // slot and per received row: 128 bytes a row) and 16 KiB a rank of tasks and small objects. One allocated copy of
        // the rows a step moves (it moves them twice: dispatch, combine) would alone be 16 times the allowance per row.
        long results = counts.Sum() * rowBytes;
        long bound = results + (128 * rows) + (config.WorldSize * 16L * 1024);
        Assert.True(
            perStep <= bound,
            $"seed {seed}: a step allocated {perStep} bytes; the results are {results} bytes, the bound {bound}; the step moved {rows} rows of {rowBytes} bytes each way");
    }
}

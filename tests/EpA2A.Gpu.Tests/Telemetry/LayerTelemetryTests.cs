using System.Collections.Concurrent;
using System.Diagnostics;
using System.Diagnostics.Metrics;
using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Errors;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Reference;
using EpA2A.Telemetry;

namespace EpA2A.Tests.Telemetry;

/// <summary>What the layer records on the EpA2A meter and activity source, seen by plain System.Diagnostics listeners.</summary>
public sealed class LayerTelemetryTests
{
    private const int World = 2;

    private static readonly int[] BadIds = [0, 9];
    private static readonly int[] Ids = [0, 1, 2, 3, 1, 3];
    private static readonly Phase[] StepPhases = [Phase.DispatchCopyIn, Phase.DispatchPreprocess, Phase.DispatchOutputSizeWait, Phase.DispatchKernel, Phase.DispatchPostprocess, Phase.CombineCopyIn, Phase.CombineKernel, Phase.CombineCrossNodeReduce];

    [Fact]
    public async Task A_step_records_every_phase_the_expert_load_and_the_tokens_of_each_rank()
    {
        string layer = "metrics-" + Guid.NewGuid().ToString("N")[..8];
        using Recorder recorder = new(layer);
        int seed = Environment.TickCount;
        EpConfig config = new(maxTokens: 32, hidden: 24, topK: 4, numExperts: 8, rank: 0, worldSize: World, localWorldSize: World);
        using InProcessGroup group = new(config, new EpLayerOptions { LayerName = layer, StepTimeout = TimeSpan.FromSeconds(20) });
        Random rng = new(seed);
        RankInput<BFloat16>[] inputs = RoutingGenerator.Draw<BFloat16>(config, [32, 17], 0.2, skewed: true, withWeights: false, rng);

        DispatchResult<BFloat16>[] dispatched = await group.RunAsync((l, r) => l.DispatchAsync(
            Tensor.Create(inputs[r].Tokens, [inputs[r].Count, config.Hidden]),
            Tensor.Create(inputs[r].ExpertIds, [inputs[r].Count, config.TopK])));
        await group.RunAsync((l, r) => l.CombineAsync(dispatched[r].Output, dispatched[r].Layout));

        for (int r = 0; r < World; r++)
        {
            string rank = $"{r}";
            foreach (Phase phase in StepPhases)
            {
                Assert.True(recorder.Count(EpTelemetry.PhaseDurationName, rank, ("phase", EpTelemetry.PhaseName(phase))) == 1, $"seed {seed}: rank {r} {phase} recorded {recorder.Count(EpTelemetry.PhaseDurationName, rank, ("phase", EpTelemetry.PhaseName(phase)))} times");
            }

            Assert.Equal(dispatched[r].Layout.RecvRows, recorder.Sum("epa2a.expert.rows", rank));
            Assert.Equal(inputs[r].Count, recorder.Sum("epa2a.tokens", rank, ("operation", "dispatch")));
            Assert.Equal(inputs[r].Count, recorder.Sum("epa2a.tokens", rank, ("operation", "combine")));
            Assert.Equal((long)dispatched[r].Layout.RecvRows * config.Hidden * 2, recorder.Sum("epa2a.bytes", rank, ("phase", "dispatch_kernel")));
        }

        Assert.All(recorder.Measurements.Where(m => m.Instrument == EpTelemetry.PhaseDurationName), m => Assert.InRange(m.Value, 0, 20));
    }

    [Fact]
    public async Task Rejected_input_and_a_timed_out_barrier_are_counted_with_their_operation_and_reason()
    {
        string layer = "errors-" + Guid.NewGuid().ToString("N")[..8];
        using Recorder recorder = new(layer);
        EpConfig config = new(maxTokens: 8, hidden: 16, topK: 2, numExperts: 4, rank: 0, worldSize: World, localWorldSize: World);
        using InProcessGroup group = new(config, new EpLayerOptions { LayerName = layer, StepTimeout = TimeSpan.FromMilliseconds(300) });
        EpAll2AllLayer rank0 = group.Layers[0];

        await Assert.ThrowsAsync<ArgumentException>(async () => await rank0.DispatchAsync(
            Tensor.Create(new BFloat16[16], [1, 16]), Tensor.Create(BadIds, [1, 2]), cancellationToken: TestContext.Current.CancellationToken));
        await Assert.ThrowsAsync<EpStepTimeoutException>(async () => await rank0.BarrierAllAsync(cancellationToken: TestContext.Current.CancellationToken));

        Assert.Equal(1, recorder.Sum("epa2a.inputs.rejected", "0", ("operation", "dispatch")));
        Assert.Equal(1, recorder.Sum("epa2a.steps.aborted", "0", ("operation", "barrier"), ("reason", "timeout")));
    }

    [Fact]
    public async Task While_listened_to_each_operation_is_a_span_whose_children_are_its_phases()
    {
        string layer = "spans-" + Guid.NewGuid().ToString("N")[..8];
        // In the order they stop: a call's phases run one after another, so this is their order (start times can tie).
        ConcurrentQueue<Activity> spans = [];
        using ActivityListener listener = new()
        {
            ShouldListenTo = s => s.Name == EpTelemetry.Name,
            Sample = (ref ActivityCreationOptions<ActivityContext> _) => ActivitySamplingResult.AllDataAndRecorded,
            ActivityStopped = a =>
            {
                if (a.GetTagItem(EpTelemetry.Tags.SpanLayer) as string == layer)
                {
                    spans.Enqueue(a);
                }
            },
        };
        ActivitySource.AddActivityListener(listener);
        EpConfig config = new(maxTokens: 8, hidden: 16, topK: 2, numExperts: 4, rank: 0, worldSize: World, localWorldSize: World);
        using InProcessGroup group = new(config, new EpLayerOptions { LayerName = layer, StepTimeout = TimeSpan.FromSeconds(20) });
        await group.RunAsync((l, r) => l.DispatchAsync(
            Tensor.Create(Enumerable.Range(0, 3 * 16).Select(i => (BFloat16)(i + r)).ToArray(), [3, 16]), Tensor.Create(Ids, [3, 2]), cancellationToken: TestContext.Current.CancellationToken));
        await group.RunAsync((l, _) => BarrierAsync(l));

        Activity[] dispatches = [.. spans.Where(s => s.OperationName == "epa2a.dispatch")];
        Assert.Equal(World, dispatches.Length);
        foreach (Activity dispatch in dispatches)
        {
            Activity[] phases = [.. spans.Where(s => s.ParentSpanId == dispatch.SpanId)];
            Assert.Equal(["epa2a.dispatch_copy_in", "epa2a.dispatch_preprocess", "epa2a.dispatch_output_size_wait", "epa2a.dispatch_kernel", "epa2a.dispatch_postprocess"], phases.Select(p => p.OperationName));
            Assert.All(phases, p => Assert.Equal(dispatch.GetTagItem(EpTelemetry.Tags.SpanRank), p.GetTagItem(EpTelemetry.Tags.SpanRank)));
            Assert.All(phases, p => Assert.Equal(3L, p.GetTagItem(EpTelemetry.Tags.SpanTokens)));
        }

        Assert.Equal(World, spans.Count(s => s.OperationName == "epa2a.barrier"));
        Assert.Null(Activity.Current);
    }

    private static async ValueTask<int> BarrierAsync(EpAll2AllLayer layer)
    {
        await layer.BarrierAllAsync(cancellationToken: TestContext.Current.CancellationToken);
        return 0;
    }
}

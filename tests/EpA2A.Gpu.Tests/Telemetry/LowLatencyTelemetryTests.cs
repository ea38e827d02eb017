using System.Collections.Concurrent;
using System.Diagnostics;
using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Errors;
using EpA2A.Layer;
using EpA2A.LowLatency;
using EpA2A.Numerics;
using EpA2A.Telemetry;
using EpA2A.Tests.LowLatency;

namespace EpA2A.Tests.Telemetry;

/// <summary>What the low-latency layer records: its four phases, the expert load, tokens, bytes, spans, rejections and timeouts.</summary>
public sealed class LowLatencyTelemetryTests
{
    private static readonly int[] BadIds = [0, 9];
    private static readonly int[] GoodIds = [0, 3];
    private static readonly Phase[] LowLatencyPhases = [Phase.LowLatencyDispatchSend, Phase.LowLatencyDispatchReceive, Phase.LowLatencyCombineSend, Phase.LowLatencyCombineReceive];

    [Fact]
    public async Task A_step_records_each_of_the_four_phases_once_with_the_expert_load_tokens_and_bytes()
    {
        string layer = "ll-metrics-" + Guid.NewGuid().ToString("N")[..8];
        using Recorder recorder = new(layer);
        LowLatencyStep step = LowLatencyStep.Draw(Environment.TickCount);
        CountingObserver observer = new();
        using InProcessLowLatencyGroup group = new(step.Config, new EpLowLatencyOptions { LayerName = layer, StepTimeout = TimeSpan.FromSeconds(20), Observer = observer });
        await step.RunAsync(group);

        for (int r = 0; r < step.Config.WorldSize; r++)
        {
            string rank = $"{r}";
            foreach (Phase phase in LowLatencyPhases)
            {
                int count = recorder.Count(EpTelemetry.PhaseDurationName, rank, ("phase", EpTelemetry.PhaseName(phase)));
                Assert.True(count == 1, $"seed {step.Seed}: rank {r} {phase} recorded {count} times");
                Assert.Equal(1, observer.Count(r, phase));
            }

            int rows = step.Expected.PerRank[r].RowsPerExpert.Sum();
            Assert.Equal(rows, recorder.Sum("epa2a.expert.rows", rank));
            Assert.Equal(step.Inputs[r].Count, recorder.Sum("epa2a.tokens", rank, ("operation", "ll_dispatch")));
            Assert.Equal(step.Inputs[r].Count, recorder.Sum("epa2a.tokens", rank, ("operation", "ll_combine")));
            Assert.Equal((long)rows * step.Config.Hidden * 2, recorder.Sum("epa2a.bytes", rank, ("phase", "ll_dispatch_receive")));
            Assert.Equal((long)rows * step.Config.Hidden * 2, recorder.Sum("epa2a.bytes", rank, ("phase", "ll_combine_send")));
        }

        Assert.Equal(["ll_dispatch_send", "ll_dispatch_receive", "ll_combine_send", "ll_combine_receive"], LowLatencyPhases.Select(EpTelemetry.PhaseName));
    }

    [Fact]
    public async Task Rejected_input_and_a_timed_out_receive_are_counted_with_their_operation_and_reason()
    {
        string layer = "ll-errors-" + Guid.NewGuid().ToString("N")[..8];
        using Recorder recorder = new(layer);
        EpConfig config = new(maxTokens: 4, hidden: 128, topK: 2, numExperts: 4, rank: 0, worldSize: 2, localWorldSize: 2);
        using InProcessLowLatencyGroup group = new(config, new EpLowLatencyOptions { LayerName = layer, StepTimeout = TimeSpan.FromMilliseconds(300) });
        EpLowLatencyLayer rank0 = group.Layers[0];
        CancellationToken ct = TestContext.Current.CancellationToken;
        Tensor<BFloat16> x = Tensor.Create(new BFloat16[128], [1, 128]);

        await Assert.ThrowsAsync<ArgumentException>(() => rank0.DispatchAsync(x, Tensor.Create(BadIds, [1, 2]), cancellationToken: ct).AsTask());
        await Assert.ThrowsAsync<InvalidOperationException>(() => rank0.DispatchReceiveAsync(ct).AsTask());
        await Assert.ThrowsAsync<EpStepTimeoutException>(() => rank0.DispatchAsync(x, Tensor.Create(GoodIds, [1, 2]), cancellationToken: ct).AsTask());

        Assert.Equal(2, recorder.Sum("epa2a.inputs.rejected", "0", ("operation", "ll_dispatch")));
        Assert.Equal(1, recorder.Sum("epa2a.steps.aborted", "0", ("operation", "ll_dispatch"), ("reason", "timeout")));
    }

    [Fact]
    public async Task While_listened_to_each_call_is_a_span_whose_children_are_its_phases()
    {
        string layer = "ll-spans-" + Guid.NewGuid().ToString("N")[..8];
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
        LowLatencyStep step = LowLatencyStep.Draw(Environment.TickCount);
        CancellationToken ct = TestContext.Current.CancellationToken;
        using InProcessLowLatencyGroup group = new(step.Config, new EpLowLatencyOptions { LayerName = layer, StepTimeout = TimeSpan.FromSeconds(20) });

        // One-call dispatch, split combine.
        LowLatencyDispatchResult[] got = await group.RunAsync((l, r) => step.DispatchAsync(l, r, ct));
        await group.RunAsync((l, r) => l.CombineSendAsync(step.ExpertOutput(r), got[r].Handle, cancellationToken: ct));
        await group.RunAsync((l, r) => l.CombineReceiveAsync(ct));

        int world = step.Config.WorldSize;
        Activity[] dispatches = [.. spans.Where(s => s.OperationName == "epa2a.ll_dispatch")];
        Assert.Equal(world, dispatches.Length);
        foreach (Activity dispatch in dispatches)
        {
            Activity[] phases = [.. spans.Where(s => s.ParentSpanId == dispatch.SpanId)];
            Assert.Equal(["epa2a.ll_dispatch_send", "epa2a.ll_dispatch_receive"], phases.Select(p => p.OperationName));
            Assert.All(phases, p => Assert.Equal(dispatch.GetTagItem(EpTelemetry.Tags.SpanRank), p.GetTagItem(EpTelemetry.Tags.SpanRank)));
        }

        Activity[] combines = [.. spans.Where(s => s.OperationName == "epa2a.ll_combine")];
        Assert.Equal(2 * world, combines.Length);
        Assert.Equal(world, combines.Count(c => spans.Single(s => s.ParentSpanId == c.SpanId).OperationName == "epa2a.ll_combine_send"));
        Assert.Equal(world, combines.Count(c => spans.Single(s => s.ParentSpanId == c.SpanId).OperationName == "epa2a.ll_combine_receive"));
        Assert.All(combines, c => Assert.Equal(1L, c.GetTagItem(EpTelemetry.Tags.SpanStep)));
        Assert.Null(Activity.Current);
    }

    private sealed class CountingObserver : IPhaseObserver
    {
        private readonly ConcurrentDictionary<(int, Phase), int> counts = [];

        public void OnPhase(int rank, Phase phase, TimeSpan elapsed, long tokens, long bytes) => counts.AddOrUpdate((rank, phase), 1, (_, c) => c + 1);

        public int Count(int rank, Phase phase) => counts.GetValueOrDefault((rank, phase));
    }
}

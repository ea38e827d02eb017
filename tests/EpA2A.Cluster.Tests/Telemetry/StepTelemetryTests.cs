using System.Diagnostics;
using EpA2A.Grains;
using EpA2A.Layer;
using EpA2A.Telemetry;
using OpenTelemetry;
using OpenTelemetry.Metrics;
using OpenTelemetry.Trace;
using Orleans.Diagnostics;

namespace EpA2A.Cluster.Tests.Telemetry;

/// <summary>
/// What an OpenTelemetry SDK receives from a step through four real silos: one trace from the client across the
/// coordinator and every rank's silo down to each phase, and the phase histogram with its explicit buckets.
/// </summary>
public sealed class StepTelemetryTests(RankCluster cluster) : IClassFixture<RankCluster>
{
    private static readonly string[] DispatchPhases = ["dispatch_copy_in", "dispatch_preprocess", "dispatch_output_size_wait", "dispatch_kernel", "dispatch_postprocess"];
    private static readonly string[] CombinePhases = ["combine_copy_in", "combine_kernel", "combine_cross_node_reduce"];

    private static LayerSpec Spec => new()
    {
        MaxTokens = 32,
        Hidden = 40,
        TopK = 4,
        NumExperts = 16,
        WorldSize = RankCluster.Silos,
        LocalWorldSize = 2,
        StepTimeout = TimeSpan.FromSeconds(10),
    };

    [Fact]
    public async Task A_client_step_is_one_trace_through_the_coordinator_and_every_ranks_silo_down_to_each_phase()
    {
        using ActivitySource clientSource = new("EpA2A.Tests.Client");
        List<Activity> spans = [];
        using TracerProvider tracing = Sdk.CreateTracerProviderBuilder()
            .AddSource(clientSource.Name, EpTelemetry.Name, ActivitySources.ApplicationGrainActivitySourceName)
            .AddInMemoryExporter(spans)
            .Build();
        ExpertLayerClient client = new(cluster.Grains, RankCluster.Group, "traced");
        await client.ConfigureAsync(Spec);

        ActivityTraceId traceId;
        using (Activity root = clientSource.StartActivity("client step") ?? throw new InvalidOperationException("the test's source is not sampled"))
        {
            traceId = root.TraceId;
            await GrainStepRunner.RunCheckedAsync(client, Spec, Environment.TickCount);
        }

        tracing.ForceFlush();
        Activity[] trace;
        lock (spans)
        {
            trace = [.. spans.Where(s => s.TraceId == traceId)];
        }

        Dictionary<ActivitySpanId, Activity> byId = trace.ToDictionary(s => s.SpanId);
        Activity coordinator = Assert.Single(trace, s => s.OperationName == "epa2a.step");
        Assert.Equal("traced", coordinator.GetTagItem(EpTelemetry.Tags.SpanLayer));
        Activity[] rankSteps = [.. trace.Where(s => s.OperationName == "epa2a.rank.step").OrderBy(s => (int)s.GetTagItem(EpTelemetry.Tags.SpanRank)!)];
        Assert.Equal(Enumerable.Range(0, RankCluster.Silos), rankSteps.Select(s => (int)s.GetTagItem(EpTelemetry.Tags.SpanRank)!));
        foreach (Activity rankStep in rankSteps)
        {
            // Across a grain call: the rank's span hangs off Orleans' server span of IRankControl.RunStep, which hangs
            // (through the coordinator silo's client span) off the coordinator's span.
            Activity server = byId[rankStep.ParentSpanId];
            Assert.Equal(ActivityKind.Server, server.Kind);
            Assert.Contains(coordinator, Ancestors(server, byId));

            int rank = (int)rankStep.GetTagItem(EpTelemetry.Tags.SpanRank)!;
            Activity dispatch = Assert.Single(trace, s => s.OperationName == "epa2a.dispatch" && s.ParentSpanId == rankStep.SpanId);
            Activity combine = Assert.Single(trace, s => s.OperationName == "epa2a.combine" && s.ParentSpanId == rankStep.SpanId);
            AssertPhases(trace, dispatch, rank, DispatchPhases);
            AssertPhases(trace, combine, rank, CombinePhases);
        }
    }

    [Fact]
    public async Task The_phase_histogram_reaches_the_exporter_with_buckets_from_one_microsecond_to_ten_seconds()
    {
        List<Metric> exported = [];
        using MeterProvider metrics = Sdk.CreateMeterProviderBuilder()
            .AddMeter(EpTelemetry.Name)
            .AddInMemoryExporter(exported)
            .Build();
        ExpertLayerClient client = new(cluster.Grains, RankCluster.Group, "metered");
        await client.ConfigureAsync(Spec);
        await GrainStepRunner.RunCheckedAsync(client, Spec, Environment.TickCount);
        metrics.ForceFlush();

        Metric histogram = Assert.Single(exported, m => m.Name == EpTelemetry.PhaseDurationName);
        Assert.Equal("s", histogram.Unit);
        Assert.Equal(MetricType.Histogram, histogram.MetricType);
        bool found = false;
        foreach (ref readonly MetricPoint point in histogram.GetMetricPoints())
        {
            if (!Tag(point, EpTelemetry.Tags.Layer).Equals("metered"))
            {
                continue;
            }

            found = true;
            List<double> bounds = [];
            foreach (HistogramBucket bucket in point.GetHistogramBuckets())
            {
                bounds.Add(bucket.ExplicitBound);
            }

            Assert.Equal([.. EpTelemetry.DurationBuckets, double.PositiveInfinity], bounds);
            Assert.Equal(1e-6, bounds[0]);
            Assert.Equal(10, bounds[^2]);
        }

        Assert.True(found, "no phase-duration point of layer 'metered' reached the exporter");
        Assert.Contains(exported, m => m.Name == "epa2a.expert.rows");
        Assert.Contains(exported, m => m.Name == "epa2a.bytes" && m.Unit == "By");
        Assert.Contains(exported, m => m.Name == EpTelemetry.StepDurationName);
    }

    private static void AssertPhases(Activity[] trace, Activity operation, int rank, string[] phases)
    {
        foreach (string phase in phases)
        {
            Activity span = Assert.Single(trace, s => s.OperationName == "epa2a." + phase && s.ParentSpanId == operation.SpanId);
            Assert.Equal(rank, span.GetTagItem(EpTelemetry.Tags.SpanRank));
            Assert.Equal("traced", span.GetTagItem(EpTelemetry.Tags.SpanLayer));
            Assert.NotNull(span.GetTagItem(EpTelemetry.Tags.SpanStep));
            Assert.NotNull(span.GetTagItem(EpTelemetry.Tags.SpanTokens));
            Assert.NotNull(span.GetTagItem(EpTelemetry.Tags.SpanBytes));
            Assert.True(span.StartTimeUtc >= operation.StartTimeUtc.AddMilliseconds(-1), $"{phase} starts before its operation");
            Assert.True(span.Duration <= operation.Duration + TimeSpan.FromMilliseconds(1), $"{phase} outlasts its operation");
        }
    }

    private static IEnumerable<Activity> Ancestors(Activity span, Dictionary<ActivitySpanId, Activity> byId)
    {
        Activity? at = span;
        while (at is not null && byId.TryGetValue(at.ParentSpanId, out Activity? parent))
        {
            yield return parent;
            at = parent;
        }
    }

    private static object Tag(MetricPoint point, string key)
    {
        foreach (KeyValuePair<string, object?> tag in point.Tags)
        {
            if (tag.Key == key)
            {
                return tag.Value ?? string.Empty;
            }
        }

        return string.Empty;
    }
}

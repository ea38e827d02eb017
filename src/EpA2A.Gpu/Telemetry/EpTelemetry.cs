using System.Diagnostics;
using System.Diagnostics.Metrics;
using EpA2A.Layer;

namespace EpA2A.Telemetry;

/// <summary>
/// EpA2A's one <see cref="ActivitySource"/> and one <see cref="Meter"/>, both named "EpA2A", and their
/// instruments. Plain System.Diagnostics: an OpenTelemetry SDK (or any listener) subscribes by name; while
/// nothing does, recording is a flag check.
/// </summary>
public static class EpTelemetry
{
    /// <summary>The name of the activity source and of the meter.</summary>
    public const string Name = "EpA2A";

    /// <summary>The phase-duration histogram's name.</summary>
    public const string PhaseDurationName = "epa2a.phase.duration";

    /// <summary>The GPU-time histogram's name (the CUDA backend's kernel times, from CUDA events).</summary>
    public const string PhaseGpuDurationName = "epa2a.phase.gpu.duration";

    /// <summary>The grain-path step histogram's name (the coordinator's view of a whole step).</summary>
    public const string StepDurationName = "epa2a.step.duration";

    /// <summary>The span attribute and metric tag keys.</summary>
    public static class Tags
    {
        /// <summary>Metric tag: the rank.</summary>
        public const string Rank = "rank";

        /// <summary>Metric tag: the layer's name.</summary>
        public const string Layer = "layer";

        /// <summary>Metric tag: the phase (<see cref="PhaseName"/>).</summary>
        public const string Phase = "phase";

        /// <summary>Metric tag: the backend ("cpu", "cuda").</summary>
        public const string Backend = "backend";

        /// <summary>Metric tag: dispatch, combine, barrier, ll_dispatch or ll_combine.</summary>
        public const string Operation = "operation";

        /// <summary>Metric tag: the global expert id (expert rows).</summary>
        public const string Expert = "expert";

        /// <summary>Metric tag: why an operation was aborted (timeout, aborted, cancelled, config_mismatch, failed).</summary>
        public const string Reason = "reason";

        /// <summary>Metric tag: ok or failed (grain-path steps).</summary>
        public const string Outcome = "outcome";

        /// <summary>Span attribute: the rank.</summary>
        public const string SpanRank = "epa2a.rank";

        /// <summary>Span attribute: the layer.</summary>
        public const string SpanLayer = "epa2a.layer";

        /// <summary>Span attribute: the group (grain path).</summary>
        public const string SpanGroup = "epa2a.group";

        /// <summary>Span attribute: the step (grain path: the client's step; layer: the sequence number of the dispatch the operation belongs to).</summary>
        public const string SpanStep = "epa2a.step";

        /// <summary>Span attribute: the group's epoch (grain path).</summary>
        public const string SpanEpoch = "epa2a.epoch";

        /// <summary>Span attribute: the phase.</summary>
        public const string SpanPhase = "epa2a.phase";

        /// <summary>Span attribute: tokens the operation or phase handled.</summary>
        public const string SpanTokens = "epa2a.tokens";

        /// <summary>Span attribute: bytes the phase moved.</summary>
        public const string SpanBytes = "epa2a.bytes";

        /// <summary>Span attribute: rows received.</summary>
        public const string SpanRows = "epa2a.rows";

        /// <summary>Span attribute: the backend.</summary>
        public const string SpanBackend = "epa2a.backend";

        /// <summary>Span attribute: GPU time of the phase in seconds (CUDA events).</summary>
        public const string SpanGpuDuration = "epa2a.gpu.duration";
    }

    /// <summary>Explicit bucket boundaries of the duration histograms, in seconds: 1 µs to 10 s in 1-2-5 steps.</summary>
    public static IReadOnlyList<double> DurationBuckets { get; } =
    [
        1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1, 2, 5, 10,
    ];

    /// <summary>The activity source of every EpA2A span.</summary>
    public static ActivitySource Source { get; } = new(Name, typeof(EpTelemetry).Assembly.GetName().Version?.ToString());

    /// <summary>The meter of every EpA2A instrument.</summary>
    public static Meter Meter { get; } = new(Name, typeof(EpTelemetry).Assembly.GetName().Version?.ToString());

    /// <summary>Wall time of each phase of each operation (rank, layer, backend, phase).</summary>
    public static Histogram<double> PhaseDuration { get; } = Meter.CreateHistogram(
        PhaseDurationName, "s", "Wall time of one phase of a dispatch, combine or barrier on one rank", advice: BucketAdvice());

    /// <summary>GPU time of a phase's kernels from CUDA events (rank, layer, backend, phase); the CUDA backend records it.</summary>
    public static Histogram<double> PhaseGpuDuration { get; } = Meter.CreateHistogram(
        PhaseGpuDurationName, "s", "GPU time of one phase's kernels on one rank, from CUDA events", advice: BucketAdvice());

    /// <summary>A whole step through the grains as the coordinator saw it (layer, outcome).</summary>
    public static Histogram<double> StepDuration { get; } = Meter.CreateHistogram(
        StepDurationName, "s", "Wall time of one step through the grains (every rank's dispatch, experts and combine), at the coordinator", advice: BucketAdvice());

    /// <summary>Tokens dispatched (operation=dispatch) and combined (operation=combine).</summary>
    public static Counter<long> Tokens { get; } = Meter.CreateCounter<long>(
        "epa2a.tokens", "{token}", "Tokens this rank dispatched or combined");

    /// <summary>Bytes each phase moved (copy-in: staged; kernel phases: received or sent rows).</summary>
    public static Counter<long> Bytes { get; } = Meter.CreateCounter<long>(
        "epa2a.bytes", "By", "Bytes moved by each phase on this rank");

    /// <summary>Rows received per local expert (tagged with the global expert id): the expert load.</summary>
    public static Counter<long> ExpertRows { get; } = Meter.CreateCounter<long>(
        "epa2a.expert.rows", "{row}", "Rows received for each expert held by this rank");

    /// <summary>Times the dispatch output buffers grew.</summary>
    public static Counter<long> Reallocations { get; } = Meter.CreateCounter<long>(
        "epa2a.reallocations", "{reallocation}", "Times this rank's dispatch output buffers grew (collectively)");

    /// <summary>Operations that failed after they began: a peer timed out or aborted, or the caller cancelled.</summary>
    public static Counter<long> StepsAborted { get; } = Meter.CreateCounter<long>(
        "epa2a.steps.aborted", "{operation}", "Dispatch, combine or barrier operations that did not complete on this rank");

    /// <summary>Operations refused before anything was sent (bad shapes, ids, sizes, stale layouts).</summary>
    public static Counter<long> InputsRejected { get; } = Meter.CreateCounter<long>(
        "epa2a.inputs.rejected", "{operation}", "Operations refused on this rank for bad input, before anything was sent");

    /// <summary>
    /// Records a phase's GPU time (CUDA events) on <see cref="PhaseGpuDuration"/> with the layer's tags: the hook for a
    /// backend that measures kernels after the phase's host-side span has ended.
    /// </summary>
    public static void RecordGpuPhase(int rank, string? layer, string backend, Phase phase, TimeSpan gpuElapsed)
    {
        if (PhaseGpuDuration.Enabled)
        {
            PhaseGpuDuration.Record(
                gpuElapsed.TotalSeconds,
                new KeyValuePair<string, object?>(Tags.Rank, rank),
                new KeyValuePair<string, object?>(Tags.Layer, string.IsNullOrEmpty(layer) ? "layer" : layer),
                new KeyValuePair<string, object?>(Tags.Backend, backend),
                new KeyValuePair<string, object?>(Tags.Phase, PhaseName(phase)));
        }
    }

    /// <summary>The tag value of a phase (also the suffix of its span name "epa2a.&lt;phase&gt;").</summary>
    public static string PhaseName(Phase phase) => phase switch
    {
        Phase.DispatchCopyIn => "dispatch_copy_in",
        Phase.DispatchPreprocess => "dispatch_preprocess",
        Phase.DispatchOutputSizeWait => "dispatch_output_size_wait",
        Phase.DispatchKernel => "dispatch_kernel",
        Phase.DispatchPostprocess => "dispatch_postprocess",
        Phase.CombineCopyIn => "combine_copy_in",
        Phase.CombineKernel => "combine_kernel",
        Phase.CombineCrossNodeReduce => "combine_cross_node_reduce",
        Phase.Barrier => "barrier",
        Phase.LowLatencyDispatchSend => "ll_dispatch_send",
        Phase.LowLatencyDispatchReceive => "ll_dispatch_receive",
        Phase.LowLatencyCombineSend => "ll_combine_send",
        Phase.LowLatencyCombineReceive => "ll_combine_receive",
        _ => phase.ToString(),
    };

    private static InstrumentAdvice<double> BucketAdvice() => new() { HistogramBucketBoundaries = DurationBuckets };
}

using System.Diagnostics;
using System.Globalization;
using EpA2A.Config;
using EpA2A.Errors;
using EpA2A.Layer;

namespace EpA2A.Telemetry;

/// <summary>The collective operations of a layer, as telemetry names them.</summary>
internal enum LayerOperation
{
    Dispatch = 0,
    Combine = 1,
    Barrier = 2,
    LowLatencyDispatch = 3,
    LowLatencyCombine = 4,
}

/// <summary>
/// One layer's telemetry: records each phase on the <see cref="EpTelemetry"/> instruments with the layer's
/// tags (rank, layer, backend, phase), and, only while the activity source has listeners, a span per
/// operation with a child span per phase. Tag values are boxed once here, so recording allocates nothing;
/// with no listener every call is a few flag checks.
/// </summary>
internal sealed class LayerTelemetry
{
    private static readonly string[] OperationNames = ["dispatch", "combine", "barrier", "ll_dispatch", "ll_combine"];
    private static readonly string[] OperationSpanNames = ["epa2a.dispatch", "epa2a.combine", "epa2a.barrier", "epa2a.ll_dispatch", "epa2a.ll_combine"];
    private static readonly string[] PhaseNames = ByPhase(EpTelemetry.PhaseName);
    private static readonly string[] PhaseSpanNames = ByPhase(p => "epa2a." + EpTelemetry.PhaseName(p));

    private readonly DispatchCombineContext? context;
    private readonly object rank;
    private readonly string backend;
    private readonly int firstExpert;
    private object[]? expertTags;
    private int seenReallocations;
    private LayerOperation operation;
    private long step;
    private Activity? span;

    /// <param name="context">The normal layer's growable buffers (reallocations are counted from it); null for a fixed-capacity layer.</param>
    public LayerTelemetry(EpConfig config, string backend, string? layerName, DispatchCombineContext? context)
    {
        this.context = context;
        this.backend = backend;
        Config = config;
        rank = config.Rank;
        firstExpert = config.Rank * config.ExpertsPerRank;
        Layer = string.IsNullOrEmpty(layerName) ? "layer" : layerName;
        seenReallocations = context?.Reallocations ?? 0;
    }

    public EpConfig Config { get; }

    public string Layer { get; }

    /// <summary>Opens an operation: its span (when listened to) becomes the parent of its phases' spans.</summary>
    public OperationTrace Begin(LayerOperation op, long stepNumber, long tokens)
    {
        operation = op;
        step = stepNumber;
        span = null;
        if (EpTelemetry.Source.HasListeners())
        {
            span = EpTelemetry.Source.StartActivity(OperationSpanNames[(int)op], ActivityKind.Internal);
            if (span is { IsAllDataRequested: true })
            {
                span.SetTag(EpTelemetry.Tags.SpanRank, rank);
                span.SetTag(EpTelemetry.Tags.SpanLayer, Layer);
                span.SetTag(EpTelemetry.Tags.SpanBackend, backend);
                span.SetTag(EpTelemetry.Tags.SpanStep, stepNumber);
                span.SetTag(EpTelemetry.Tags.SpanTokens, tokens);
            }
        }

        return new OperationTrace(this, span);
    }

    /// <summary>
    /// A phase ended: the duration histogram, the byte and token counters, a reallocation when the output grew,
    /// and a span from end − elapsed to now. <paramref name="gpuElapsed"/> is the GPU time of the phase's
    /// kernels (CUDA events), when the backend measured it.
    /// </summary>
    public void PhaseEnded(Phase phase, TimeSpan elapsed, long tokens, long bytes, TimeSpan? gpuElapsed)
    {
        string name = PhaseNames[(int)phase];
        if (EpTelemetry.PhaseDuration.Enabled)
        {
            EpTelemetry.PhaseDuration.Record(elapsed.TotalSeconds, Tags(EpTelemetry.Tags.Phase, name));
        }

        if (gpuElapsed is { } gpu && EpTelemetry.PhaseGpuDuration.Enabled)
        {
            EpTelemetry.PhaseGpuDuration.Record(gpu.TotalSeconds, Tags(EpTelemetry.Tags.Phase, name));
        }

        if (bytes > 0 && EpTelemetry.Bytes.Enabled)
        {
            EpTelemetry.Bytes.Add(bytes, Tags(EpTelemetry.Tags.Phase, name));
        }

        if (phase is Phase.DispatchKernel or Phase.CombineKernel or Phase.LowLatencyDispatchSend or Phase.LowLatencyCombineReceive && EpTelemetry.Tokens.Enabled)
        {
            LayerOperation counted = phase switch
            {
                Phase.DispatchKernel => LayerOperation.Dispatch,
                Phase.CombineKernel => LayerOperation.Combine,
                Phase.LowLatencyDispatchSend => LayerOperation.LowLatencyDispatch,
                _ => LayerOperation.LowLatencyCombine,
            };
            EpTelemetry.Tokens.Add(tokens, Tags(EpTelemetry.Tags.Operation, OperationNames[(int)counted]));
        }

        if (phase == Phase.DispatchOutputSizeWait && context is not null && context.Reallocations != seenReallocations)
        {
            // The backend grows the buffers inside this phase; the context counts it.
            if (EpTelemetry.Reallocations.Enabled)
            {
                EpTelemetry.Reallocations.Add(context.Reallocations - seenReallocations, Tags());
            }

            seenReallocations = context?.Reallocations ?? 0;
        }

        // A barrier's operation span is its only span.
        if (span is not null && phase != Phase.Barrier)
        {
            // Parented through Activity.Current (the operation span), so that ending the child restores it.
            DateTime end = DateTime.UtcNow;
            ActivityContext parent = Activity.Current == span ? default : span.Context;
            using Activity? child = EpTelemetry.Source.StartActivity(PhaseSpanNames[(int)phase], ActivityKind.Internal, parent, startTime: end - elapsed);
            if (child is { IsAllDataRequested: true })
            {
                child.SetTag(EpTelemetry.Tags.SpanRank, rank);
                child.SetTag(EpTelemetry.Tags.SpanLayer, Layer);
                child.SetTag(EpTelemetry.Tags.SpanStep, step);
                child.SetTag(EpTelemetry.Tags.SpanPhase, name);
                child.SetTag(EpTelemetry.Tags.SpanTokens, tokens);
                child.SetTag(EpTelemetry.Tags.SpanBytes, bytes);
                if (gpuElapsed is { } g)
                {
                    child.SetTag(EpTelemetry.Tags.SpanGpuDuration, g.TotalSeconds);
                }
            }

            child?.SetEndTime(end);
        }
    }

    /// <summary>Rows received per local expert (the expert load), after a dispatch.</summary>
    public void Received(EpAllToAllLayout layout) => Received(layout.RecvRows, layout.RowsPerLocalExpert);

    /// <summary>Rows received per local expert (the expert load): <paramref name="recvRows"/> in all, <paramref name="rows"/> per expert.</summary>
    public void Received(int recvRows, ReadOnlySpan<int> rows)
    {
        span?.SetTag(EpTelemetry.Tags.SpanRows, recvRows);
        if (!EpTelemetry.ExpertRows.Enabled)
        {
            return;
        }

        expertTags ??= [.. Enumerable.Range(firstExpert, Config.ExpertsPerRank).Select(e => (object)e.ToString(CultureInfo.InvariantCulture))];
        for (int j = 0; j < rows.Length; j++)
        {
            EpTelemetry.ExpertRows.Add(rows[j], Tags(EpTelemetry.Tags.Expert, expertTags[j]));
        }
    }

    /// <summary>Counts an operation refused for bad input. Returns false, to serve as an exception filter.</summary>
    public bool Rejected(LayerOperation op)
    {
        if (EpTelemetry.InputsRejected.Enabled)
        {
            EpTelemetry.InputsRejected.Add(1, Tags(EpTelemetry.Tags.Operation, OperationNames[(int)op]));
        }

        return false;
    }

    /// <summary>Counts an operation that failed once begun and marks its span. Returns false (an exception filter).</summary>
    internal bool Failed(Activity? operationSpan, Exception error)
    {
        string reason = error switch
        {
            EpStepTimeoutException => "timeout",
            EpStepAbortedException => "aborted",
            EpConfigMismatchException => "config_mismatch",
            EpStepFailedException => "failed",
            OperationCanceledException => "cancelled",
            _ => "error",
        };
        if (EpTelemetry.StepsAborted.Enabled)
        {
            TagList tags = Tags(EpTelemetry.Tags.Operation, OperationNames[(int)operation]);
            tags.Add(EpTelemetry.Tags.Reason, reason);
            EpTelemetry.StepsAborted.Add(1, tags);
        }

        if (operationSpan is not null)
        {
            operationSpan.SetStatus(ActivityStatusCode.Error, error.Message);
            operationSpan.SetTag("error.type", reason);
            operationSpan.AddException(error);
        }

        return false;
    }

    /// <summary>Ends the operation's span; phases after it (an operation not opened with <see cref="Begin"/>) get no span.</summary>
    internal void End(Activity? operationSpan)
    {
        if (ReferenceEquals(span, operationSpan))
        {
            span = null;
        }

        operationSpan?.Dispose();
    }

    private static string[] ByPhase(Func<Phase, string> name)
    {
        Phase[] phases = Enum.GetValues<Phase>();
        string[] names = new string[(int)phases.Max() + 1];
        foreach (Phase p in phases)
        {
            names[(int)p] = name(p);
        }

        return names;
    }

    private TagList Tags() => new()
    {
        { EpTelemetry.Tags.Rank, rank },
        { EpTelemetry.Tags.Layer, Layer },
        { EpTelemetry.Tags.Backend, backend },
    };

    private TagList Tags(string key, object value)
    {
        TagList tags = Tags();
        tags.Add(key, value);
        return tags;
    }
}

/// <summary>An operation's span (null while nobody listens); disposing ends it.</summary>
internal readonly struct OperationTrace(LayerTelemetry telemetry, Activity? span) : IDisposable
{
    /// <summary>Records the failure (counter, span status). Returns false, so it can be an exception filter.</summary>
    public bool Failed(Exception error) => telemetry.Failed(span, error);

    public void Dispose() => telemetry.End(span);
}

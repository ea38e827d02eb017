using System.Diagnostics.Metrics;
using EpA2A.Silo.Commands;
using EpA2A.Telemetry;

namespace EpA2A.Silo.Telemetry;

/// <summary>
/// Listens to the EpA2A meter in this process (a <see cref="MeterListener"/>: what any exporter would see) and
/// puts every phase-duration, GPU-duration and step-duration measurement of one layer into a <see cref="PhaseTable"/>.
/// </summary>
internal sealed class PhaseMetricsCollector : IDisposable
{
    private readonly MeterListener listener = new();
    private readonly string layer;

    public PhaseMetricsCollector(string layer)
    {
        this.layer = layer;
        listener.InstrumentPublished = (instrument, l) =>
        {
            if (instrument.Meter.Name == EpTelemetry.Name
                && instrument.Name is EpTelemetry.PhaseDurationName or EpTelemetry.PhaseGpuDurationName or EpTelemetry.StepDurationName)
            {
                l.EnableMeasurementEvents(instrument);
            }
        };
        listener.SetMeasurementEventCallback<double>(OnMeasurement);
        listener.Start();
    }

    /// <summary>Microseconds per phase (and "coordinator step"), over every rank and step so far.</summary>
    public PhaseTable Table { get; } = new();

    public void Dispose() => listener.Dispose();

    private void OnMeasurement(Instrument instrument, double seconds, ReadOnlySpan<KeyValuePair<string, object?>> tags, object? state)
    {
        string? measuredLayer = null;
        string? phase = null;
        foreach (KeyValuePair<string, object?> tag in tags)
        {
            if (tag.Key == EpTelemetry.Tags.Layer)
            {
                measuredLayer = tag.Value as string;
            }
            else if (tag.Key == EpTelemetry.Tags.Phase)
            {
                phase = tag.Value as string;
            }
        }

        if (measuredLayer != layer)
        {
            return;
        }

        string row = instrument.Name switch
        {
            EpTelemetry.PhaseDurationName => phase ?? "?",
            EpTelemetry.PhaseGpuDurationName => $"{phase} (GPU)",
            _ => "coordinator step",
        };
        lock (Table)
        {
            Table.Add(row, seconds * 1e6);
        }
    }
}

using System.Collections.Concurrent;
using System.Diagnostics.Metrics;
using EpA2A.Telemetry;

namespace EpA2A.Tests.Telemetry;

/// <summary>Every measurement of the EpA2A meter for one layer.</summary>
internal sealed class Recorder : IDisposable
{
    private readonly MeterListener listener = new();

    public Recorder(string layer)
    {
        listener.InstrumentPublished = (i, l) =>
        {
            if (i.Meter.Name == EpTelemetry.Name)
            {
                l.EnableMeasurementEvents(i, layer);
            }
        };
        listener.SetMeasurementEventCallback<double>((i, v, tags, state) => Add(i, v, tags, (string)state!));
        listener.SetMeasurementEventCallback<long>((i, v, tags, state) => Add(i, v, tags, (string)state!));
        listener.Start();
    }

    public ConcurrentBag<(string Instrument, double Value, Dictionary<string, string> Tags)> Measurements { get; } = [];

    public int Count(string instrument, string rank, params (string Key, string Value)[] tags) => Matching(instrument, rank, tags).Count();

    public double Sum(string instrument, string rank, params (string Key, string Value)[] tags) => Matching(instrument, rank, tags).Sum(m => m.Value);

    public void Dispose() => listener.Dispose();

    private IEnumerable<(string Instrument, double Value, Dictionary<string, string> Tags)> Matching(string instrument, string rank, (string Key, string Value)[] tags) =>
        Measurements.Where(m => m.Instrument == instrument && m.Tags["rank"] == rank && tags.All(t => m.Tags.GetValueOrDefault(t.Key) == t.Value));

    private void Add(Instrument instrument, double value, ReadOnlySpan<KeyValuePair<string, object?>> tags, string layer)
    {
        Dictionary<string, string> map = [];
        foreach (KeyValuePair<string, object?> tag in tags)
        {
            map[tag.Key] = System.Convert.ToString(tag.Value, System.Globalization.CultureInfo.InvariantCulture) ?? string.Empty;
        }

        if (map.GetValueOrDefault("layer") == layer)
        {
            Measurements.Add((instrument.Name, value, map));
        }
    }
}

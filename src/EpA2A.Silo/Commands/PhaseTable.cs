using System.Globalization;
using System.Text;
using EpA2A.Telemetry;

namespace EpA2A.Silo.Commands;

/// <summary>Collects per-phase samples (µs) and renders p50 / p95 / max as a table.</summary>
internal sealed class PhaseTable
{
    private readonly Dictionary<string, List<double>> samples = [];

    public void Add(string phase, double micros)
    {
        if (!samples.TryGetValue(phase, out List<double>? list))
        {
            list = [];
            samples[phase] = list;
        }

        list.Add(micros);
    }

    public PhaseTable Copy()
    {
        PhaseTable copy = new();
        foreach ((string phase, List<double> values) in samples)
        {
            copy.samples[phase] = [.. values];
        }

        return copy;
    }

    public string Render()
    {
        StringBuilder sb = new();
        sb.AppendLine(CultureInfo.InvariantCulture, $"| {"phase",-26} | {"n",5} | {"p50 µs",10} | {"p95 µs",10} | {"max µs",10} |");
        sb.AppendLine(CultureInfo.InvariantCulture, $"|{new string('-', 28)}|{new string('-', 7)}|{new string('-', 12)}|{new string('-', 12)}|{new string('-', 12)}|");
        foreach ((string phase, List<double> values) in samples)
        {
            double[] sorted = [.. values.Order()];
            sb.AppendLine(CultureInfo.InvariantCulture, $"| {phase,-26} | {sorted.Length,5} | {Percentile(sorted, 0.50),10:0.0} | {Percentile(sorted, 0.95),10:0.0} | {sorted[^1],10:0.0} |");
        }

        return sb.ToString();
    }

    private static double Percentile(double[] sorted, double q) => SampleStats.PercentileOfSorted(sorted, q);
}

using System.CommandLine;
using System.Globalization;
using EpA2A.Silo.Telemetry;

namespace EpA2A.Silo.Commands;

/// <summary>The telemetry options of `epa2a silo` and `epa2a local`, as overrides of the EpA2A:Telemetry settings.</summary>
internal sealed class TelemetryCommandOptions
{
    private readonly Option<int?> prometheusPortBase = new("--prometheus-port-base") { Description = "Prometheus scrape endpoint at http://host:(base + rank)/metrics (off by default)" };
    private readonly Option<string?> prometheusHost = new("--prometheus-host") { Description = "What the Prometheus endpoint binds: localhost (default) or * for every interface" };
    private readonly Option<string?> otlpEndpoint = new("--otlp-endpoint") { Description = "OTLP collector for traces and metrics, e.g. http://localhost:4317 (off by default)" };
    private readonly Option<string?> otlpProtocol = new("--otlp-protocol") { Description = "grpc (default) or http/protobuf" };
    private readonly Option<bool> console = new("--console-telemetry") { Description = "Write spans and metrics to standard output" };

    public void AddTo(Command command)
    {
        command.Options.Add(prometheusPortBase);
        command.Options.Add(prometheusHost);
        command.Options.Add(otlpEndpoint);
        command.Options.Add(otlpProtocol);
        command.Options.Add(console);
    }

    /// <summary>The settings given on the command line, as configuration keys (absent ones stay as configured elsewhere).</summary>
    public Dictionary<string, string?> ToConfiguration(ParseResult parse)
    {
        const string S = EpA2ATelemetryOptions.SectionName;
        Dictionary<string, string?> settings = [];
        if (parse.GetValue(prometheusPortBase) is int port)
        {
            settings[$"{S}:{nameof(EpA2ATelemetryOptions.PrometheusPortBase)}"] = port.ToString(CultureInfo.InvariantCulture);
        }

        if (parse.GetValue(prometheusHost) is string host)
        {
            settings[$"{S}:{nameof(EpA2ATelemetryOptions.PrometheusHost)}"] = host;
        }

        if (parse.GetValue(otlpEndpoint) is string endpoint)
        {
            settings[$"{S}:{nameof(EpA2ATelemetryOptions.OtlpEndpoint)}"] = endpoint;
        }

        if (parse.GetValue(otlpProtocol) is string protocol)
        {
            settings[$"{S}:{nameof(EpA2ATelemetryOptions.OtlpProtocol)}"] = protocol;
        }

        if (parse.GetValue(console))
        {
            settings[$"{S}:{nameof(EpA2ATelemetryOptions.Console)}"] = "true";
        }

        return settings;
    }
}

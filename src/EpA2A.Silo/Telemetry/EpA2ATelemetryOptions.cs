using System.Globalization;

namespace EpA2A.Silo.Telemetry;

/// <summary>
/// Where a host sends EpA2A's spans and metrics; bound from the configuration section "EpA2A:Telemetry"
/// (appsettings.json, environment variables such as <c>EpA2A__Telemetry__PrometheusPortBase</c>, or the
/// command line's telemetry options). Everything is off by default: with no exporter on, no OpenTelemetry
/// pipeline is built at all, and the layer's instruments cost a flag check.
/// </summary>
public sealed class EpA2ATelemetryOptions
{
    /// <summary>The configuration section.</summary>
    public const string SectionName = "EpA2A:Telemetry";

    /// <summary>OTLP collector endpoint for traces and metrics (e.g. http://localhost:4317); null for none.</summary>
    public Uri? OtlpEndpoint { get; set; }

    /// <summary>OTLP transport: "grpc" (default, port 4317) or "http/protobuf" (port 4318).</summary>
    public string OtlpProtocol { get; set; } = "grpc";

    /// <summary>
    /// First port of the Prometheus scrape endpoints (http://host:port/metrics); a silo listens on this plus its
    /// rank, so the silos of one host never clash. 0 (default) for none.
    /// </summary>
    public int PrometheusPortBase { get; set; }

    /// <summary>What the Prometheus listener binds: "localhost" (default) or "*" for every interface.</summary>
    public string PrometheusHost { get; set; } = "localhost";

    /// <summary>Writes spans and metrics to standard output (debugging).</summary>
    public bool Console { get; set; }

    /// <summary>The service name on the resource (Prometheus' job is the scrape config's).</summary>
    public string ServiceName { get; set; } = "epa2a";

    /// <summary>Whether any exporter is on.</summary>
    public bool Enabled => OtlpEndpoint is not null || PrometheusPortBase != 0 || Console;

    /// <summary>The Prometheus port of the host at <paramref name="offset"/> (a silo's rank).</summary>
    public int PrometheusPort(int offset) => PrometheusPortBase + offset;

    /// <summary>Throws an <see cref="ArgumentException"/> naming the setting and the rule when a setting is invalid.</summary>
    public void Validate(int portOffset)
    {
        if (PrometheusPortBase != 0 && (PrometheusPortBase < 1 || PrometheusPort(portOffset) > 65535))
        {
            throw new ArgumentException(string.Create(CultureInfo.InvariantCulture, $"{SectionName}:PrometheusPortBase = {PrometheusPortBase} (+ rank {portOffset}) must be a port in [1, 65535], or 0 for none"));
        }

        if (OtlpEndpoint is { } otlp && (!otlp.IsAbsoluteUri || (otlp.Scheme != Uri.UriSchemeHttp && otlp.Scheme != Uri.UriSchemeHttps)))
        {
            throw new ArgumentException($"{SectionName}:OtlpEndpoint = '{otlp}' must be an absolute http(s) URI");
        }

        if (OtlpProtocol is not ("grpc" or "http/protobuf"))
        {
            throw new ArgumentException($"{SectionName}:OtlpProtocol = '{OtlpProtocol}' must be grpc or http/protobuf");
        }

        if (string.IsNullOrWhiteSpace(PrometheusHost) || PrometheusHost.Contains('/', StringComparison.Ordinal))
        {
            throw new ArgumentException($"{SectionName}:PrometheusHost = '{PrometheusHost}' must be a host name, an address or *");
        }
    }
}

using EpA2A.Telemetry;
using Microsoft.Extensions.Configuration;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using OpenTelemetry.Exporter;
using OpenTelemetry.Metrics;
using OpenTelemetry.Resources;
using OpenTelemetry.Trace;
using Orleans.Diagnostics;

namespace EpA2A.Silo.Telemetry;

/// <summary>Wires EpA2A's activity source and meter to the exporters that configuration turns on.</summary>
public static class TelemetryHostingExtensions
{
    /// <summary>
    /// Reads <see cref="EpA2ATelemetryOptions"/> from "EpA2A:Telemetry" and, when an exporter is on, adds an
    /// OpenTelemetry pipeline: traces of the EpA2A source and of Orleans' application grain calls (so a step
    /// is one trace across silos), metrics of the EpA2A meter, to OTLP, a Prometheus endpoint on
    /// PrometheusPortBase + <paramref name="portOffset"/>, and/or the console. The listeners are process-wide:
    /// build one pipeline per process (several silos in one process share it).
    /// </summary>
    /// <param name="builder">The host.</param>
    /// <param name="portOffset">Added to the Prometheus base port: the silo's rank.</param>
    /// <param name="instance">The service instance on the resource (e.g. "group/rank-3").</param>
    public static IHostApplicationBuilder AddEpA2ATelemetry(this IHostApplicationBuilder builder, int portOffset = 0, string? instance = null)
    {
        ArgumentNullException.ThrowIfNull(builder);
        EpA2ATelemetryOptions options = builder.Configuration.GetSection(EpA2ATelemetryOptions.SectionName).Get<EpA2ATelemetryOptions>() ?? new();
        options.Validate(portOffset);
        builder.Services.AddSingleton(options);
        if (!options.Enabled)
        {
            return builder;
        }

        AddPipeline(builder.Services, options, portOffset, instance);
        return builder;
    }

    private static void AddPipeline(IServiceCollection services, EpA2ATelemetryOptions options, int portOffset, string? instance)
    {
        OpenTelemetry.OpenTelemetryBuilder otel = services.AddOpenTelemetry()
            .ConfigureResource(r => r.AddService(options.ServiceName, serviceInstanceId: instance ?? Environment.MachineName + "/" + Environment.ProcessId));

        // Prometheus is metrics only: trace only when something receives spans.
        if (options.OtlpEndpoint is not null || options.Console)
        {
            otel.WithTracing(t =>
            {
                t.AddSource(EpTelemetry.Name, ActivitySources.ApplicationGrainActivitySourceName);
                if (options.OtlpEndpoint is { } endpoint)
                {
                    t.AddOtlpExporter(o => Otlp(o, options, endpoint, "v1/traces"));
                }

                if (options.Console)
                {
                    t.AddConsoleExporter();
                }
            });
        }

        otel.WithMetrics(m =>
        {
            m.AddMeter(EpTelemetry.Name);
            if (options.PrometheusPortBase != 0)
            {
                m.AddPrometheusHttpListener(o =>
                {
                    o.Host = options.PrometheusHost;
                    o.Port = options.PrometheusPort(portOffset);
                });
            }

            if (options.OtlpEndpoint is { } endpoint)
            {
                m.AddOtlpExporter(o => Otlp(o, options, endpoint, "v1/metrics"));
            }

            if (options.Console)
            {
                m.AddConsoleExporter();
            }
        });
    }

    private static void Otlp(OtlpExporterOptions o, EpA2ATelemetryOptions options, Uri endpoint, string httpPath)
    {
        bool http = options.OtlpProtocol == "http/protobuf";
        o.Protocol = http ? OtlpExportProtocol.HttpProtobuf : OtlpExportProtocol.Grpc;

        // Set in code, the endpoint is taken as is: over HTTP it must name the signal's path.
        o.Endpoint = http && endpoint.AbsolutePath is "/" or "" ? new Uri(endpoint, httpPath) : endpoint;
    }
}

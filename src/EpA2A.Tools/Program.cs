using System.CommandLine;

using EpA2A.Tools.Bench;
using EpA2A.Tools.GpuCheck;
using EpA2A.Tools.Soak;
using EpA2A.Tools.TelemetryOverhead;

RootCommand root = new("EpA2A tools: the GPU suite, the benchmark, the soak and the telemetry overhead, each run checked against the reference.")
{
    GpuCheckCommand.Create(),
    SoakCommand.Create(),
    TelemetryOverheadCommand.Create(),
    BenchCommand.Create(),
};
return await root.Parse(args).InvokeAsync();

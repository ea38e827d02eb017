using System.Text.Json;
using System.Text.Json.Serialization;

namespace EpA2A.Tools.Bench;

/// <summary>
/// What every rank process and the PyTorch peer read: the points of the sweep and the routing files of each
/// routing set (raw little-endian int32 [tokens, topk] expert ids, one file per rank).
/// </summary>
internal sealed record BenchManifest
{
    [JsonPropertyName("seed")]
    public int Seed { get; init; }

    [JsonPropertyName("warmup")]
    public int Warmup { get; init; }

    [JsonPropertyName("iterations")]
    public int Iterations { get; init; }

    /// <summary>CUDA normal mode: libepa2a calls on the caller's thread (EpLayerOptions.DeviceCallsOnCallerThread) or on the GPU worker.</summary>
    [JsonPropertyName("caller_thread")]
    public bool CallerThread { get; init; } = true;

    /// <summary>EpConfig.NumSms of the swept layers (blocks of each token kernel per rank).</summary>
    [JsonPropertyName("num_sms")]
    public int NumSms { get; init; } = 32;

    /// <summary>Whether each rank's GPU thread had a core of its own (CoreAffinity), for the record.</summary>
    [JsonPropertyName("pin_cores")]
    public bool PinCores { get; init; }

    /// <summary>After the points: this many checked-size steps with random token counts on one layer (GPU soak).</summary>
    [JsonPropertyName("soak_steps")]
    public int SoakSteps { get; init; }

    /// <summary>How often each rank process runs the whole sweep (in the same process, so pass 2 shows the spread and whether device memory comes back).</summary>
    [JsonPropertyName("passes")]
    public int Passes { get; init; } = 1;

    [JsonPropertyName("points")]
    public List<BenchPoint> Points { get; init; } = [];
}

/// <summary>One point of the sweep.</summary>
internal sealed record BenchPoint
{
    [JsonPropertyName("name")]
    public required string Name { get; init; }

    [JsonPropertyName("world")]
    public int World { get; init; }

    [JsonPropertyName("local")]
    public int Local { get; init; }

    [JsonPropertyName("tokens")]
    public int Tokens { get; init; }

    [JsonPropertyName("hidden")]
    public int Hidden { get; init; }

    [JsonPropertyName("topk")]
    public int TopK { get; init; }

    [JsonPropertyName("experts")]
    public int Experts { get; init; }

    [JsonPropertyName("routing")]
    public required string Routing { get; init; }

    /// <summary>Per routing set, one file per rank (relative to the manifest's folder).</summary>
    [JsonPropertyName("sets")]
    public List<List<string>> Sets { get; init; } = [];

    /// <summary>Per routing set, the rows each rank receives (counted from the files).</summary>
    [JsonPropertyName("recv_rows")]
    public List<int[]> RecvRows { get; init; } = [];

    /// <summary>EpLayerOptions.Capacity of the graph-mode layer: enough for the largest receive of every set.</summary>
    [JsonPropertyName("graph_capacity")]
    public int GraphCapacity { get; init; }

    [JsonIgnore]
    public string Layout => Local == World ? "intra" : "inter";

    [JsonIgnore]
    public int RowBytes => Hidden * 2;
}

/// <summary>One rank's samples of one point (µs). Sample i of every list is iteration i (sets x iterations).</summary>
internal sealed record BenchRankPoint
{
    public required string Name { get; init; }

    /// <summary>Which run of the sweep (0 first) these samples are from.</summary>
    public int Pass { get; init; }

    public string? Error { get; set; }

    /// <summary>Dispatch on the GPU timeline: prepare start to finish end (CUDA events), host size poll included.</summary>
    public List<double> DispatchGpu { get; init; } = [];

    /// <summary>The part of <see cref="DispatchGpu"/> in the counting kernels: count, the all-to-all of per-expert counts, row assignment.</summary>
    public List<double> DispatchPrepareGpu { get; init; } = [];

    /// <summary>The part of <see cref="DispatchGpu"/> between the counting kernels and the send (host poll, launch).</summary>
    public List<double> DispatchHostGap { get; init; } = [];

    public List<double> CombineGpu { get; init; } = [];

    public List<double> DispatchWall { get; init; } = [];

    public List<double> CombineWall { get; init; } = [];

    /// <summary>
    /// Per timed normal-mode iteration: how often the kernel took the CPU from this rank's launching thread during the
    /// step (its involuntary context switches; -1 where unknown). Ties a slow iteration to a lost core.
    /// </summary>
    public List<long> Preemptions { get; init; } = [];

    /// <summary>The same C# calls with GPU timing off (no CUDA events recorded or read): what a user without an observer pays.</summary>
    public List<double> DispatchWallUntimed { get; init; } = [];

    public List<double> CombineWallUntimed { get; init; } = [];

    /// <summary>The same step by direct libepa2a calls (no C# orchestration), host wall time.</summary>
    public List<double> DirectDispatchWall { get; init; } = [];

    public List<double> DirectCombineWall { get; init; } = [];

    public List<double> GraphDispatchGpu { get; init; } = [];

    public List<double> GraphCombineGpu { get; init; } = [];

    /// <summary>Host wall time of one graph replay of dispatch + combine (launches, sync, layout read).</summary>
    public List<double> GraphWall { get; init; } = [];

    /// <summary>Per timed normal-mode iteration: when this rank's dispatch call began (<see cref="System.Diagnostics.Stopwatch"/> timestamps, one clock for every rank process).</summary>
    public List<long> DispatchStarts { get; init; } = [];

    /// <summary>Per timed normal-mode iteration: when the dispatch call returned, which is when the combine call began.</summary>
    public List<long> DispatchEnds { get; init; } = [];

    /// <summary>Per timed normal-mode iteration: when the combine call returned.</summary>
    public List<long> CombineEnds { get; init; } = [];

    /// <summary>Per timed graph replay (dispatch + combine): when it was launched and when it had ended.</summary>
    public List<long> GraphStarts { get; init; } = [];

    public List<long> GraphEnds { get; init; } = [];

    public string? GraphError { get; set; }

    public bool Checked { get; set; }
}

/// <summary>One rank's report: its points, and (rank 0) the device copy bandwidth measured after them.</summary>
internal sealed record BenchRankReport(int Rank, double CopyBytesPerSecond, List<BenchRankPoint> Points, long DeviceFreeBefore, long DeviceFreeAfter)
{
    public List<BenchSoakSample> Soak { get; init; } = [];

    public string? SoakError { get; init; }

    /// <summary>Free device memory after each pass of the sweep (every layer of it disposed).</summary>
    public List<long> DeviceFreeAfterPass { get; init; } = [];
}

/// <summary>One soak sample of a rank: after this many steps, free device memory, managed heap, handles and threads.</summary>
internal sealed record BenchSoakSample(int Step, long DeviceFreeBytes, long ManagedBytes, int Handles, int Threads, double StepMedianUs);

internal static class BenchJson
{
    public static readonly JsonSerializerOptions Indented = new() { WriteIndented = true, DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull };

    public static readonly JsonSerializerOptions Compact = new() { DefaultIgnoreCondition = JsonIgnoreCondition.WhenWritingNull };
}

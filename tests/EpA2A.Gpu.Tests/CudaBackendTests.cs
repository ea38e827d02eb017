using System.Diagnostics;
using System.Numerics.Tensors;
using System.Text.Json;
using EpA2A.Config;
using EpA2A.Cuda;
using EpA2A.Layer;
using EpA2A.Numerics;

namespace EpA2A.Tests;

/// <summary>
/// The CUDA backend. On a machine with a GPU and libepa2a (native/build, or EPA2A_NATIVE_DIR) the GPU tests run
/// `epa2a-tools gpu-check` for a small group of rank processes; elsewhere they are reported as skipped, not passed.
/// The rest (the device-buffer API's checks) runs everywhere.
/// </summary>
public sealed class CudaBackendTests
{
    [Fact]
    public async Task Two_rank_processes_on_the_gpu_match_the_reference_and_the_cpu_backend()
    {
        Assert.SkipUnless(NvshmemRuntime.IsAvailable(out string reason), $"no usable GPU / libepa2a: {FirstLine(reason)}");
        string cli = FindCli() ?? throw SkipException("epa2a-tools not built (dotnet build src/EpA2A.Tools, or set EPA2A_TOOLS)");
        string outDir = Directory.CreateTempSubdirectory("epa2a-gpu-test-").FullName;

        (int exit, string log) = await RunAsync(cli, ["gpu-check", "--groups", "w2", "--out", outDir], TimeSpan.FromMinutes(4));

        Assert.True(exit == 0, $"epa2a-tools gpu-check exited with {exit}:\n{log}");
        using JsonDocument json = JsonDocument.Parse(await File.ReadAllTextAsync(Path.Combine(outDir, "gpu-check.json"), TestContext.Current.CancellationToken));
        JsonElement[] cases = [.. json.RootElement.GetProperty("cases").EnumerateArray()];
        Assert.NotEmpty(cases);
        Assert.All(cases, c => Assert.True(c.GetProperty("Pass").GetBoolean(), c.ToString()));
    }

    [Fact]
    public async Task Graph_capture_caller_thread_calls_and_a_fixed_capacity_overflow_on_the_gpu()
    {
        Assert.SkipUnless(NvshmemRuntime.IsAvailable(out string reason), $"no usable GPU / libepa2a: {FirstLine(reason)}");
        string cli = FindCli() ?? throw SkipException("epa2a-tools not built (dotnet build src/EpA2A.Tools, or set EPA2A_TOOLS)");
        string outDir = Directory.CreateTempSubdirectory("epa2a-gpu-test-").FullName;

        (int exit, string log) = await RunAsync(cli, ["gpu-check", "--groups", "graph", "--out", outDir], TimeSpan.FromMinutes(4));

        Assert.True(exit == 0, $"epa2a-tools gpu-check --groups graph exited with {exit}:\n{log}");
        using JsonDocument json = JsonDocument.Parse(await File.ReadAllTextAsync(Path.Combine(outDir, "gpu-check.json"), TestContext.Current.CancellationToken));
        JsonElement[] cases = [.. json.RootElement.GetProperty("cases").EnumerateArray()];
        Assert.Equal(2, cases.Length);
        Assert.All(cases, c => Assert.True(c.GetProperty("Pass").GetBoolean(), c.ToString()));
    }

    [Fact]
    public async Task Bench_on_the_gpu_checks_every_point_and_writes_its_results()
    {
        Assert.SkipUnless(NvshmemRuntime.IsAvailable(out string reason), $"no usable GPU / libepa2a: {FirstLine(reason)}");
        string cli = FindCli() ?? throw SkipException("epa2a-tools not built (dotnet build src/EpA2A.Tools, or set EPA2A_TOOLS)");
        string outDir = Directory.CreateTempSubdirectory("epa2a-gpu-bench-").FullName;

        (int exit, string log) = await RunAsync(
            cli,
            ["bench", "--backend", "cuda", "--ranks", "4", "--local", "2", "--experts", "32", "--tokens", "16,256", "--hidden", "1024", "--sets", "1", "--iterations", "3", "--peer", "none", "--no-grains", "--soak-steps", "200", "--out", outDir],
            TimeSpan.FromMinutes(4));

        Assert.True(exit == 0, $"epa2a-tools bench exited with {exit}:\n{log}");
        string jsonFile = Assert.Single(Directory.GetFiles(outDir, "bench-*.json"));
        using JsonDocument json = JsonDocument.Parse(await File.ReadAllTextAsync(jsonFile, TestContext.Current.CancellationToken));
        JsonElement[] points = [.. json.RootElement.GetProperty("Points").EnumerateArray()];
        Assert.Equal(8, points.Length);
        Assert.All(points, p => Assert.True(p.GetProperty("Cuda").GetProperty("Checked").GetBoolean(), p.ToString()));
        Assert.Single(Directory.GetFiles(outDir, "bench-*.png"));
    }

    [Fact]
    public void IsAvailable_explains_why_not()
    {
        bool available = NvshmemRuntime.IsAvailable(out string reason);

        Assert.True(available || reason.Length > 0, "IsAvailable returned false without a reason");
    }

    [Fact]
    public async Task Device_buffer_overloads_say_the_cpu_backend_has_no_device_buffers()
    {
        EpConfig config = new(maxTokens: 4, hidden: 8, topK: 1, numExperts: 2, rank: 0, worldSize: 1, localWorldSize: 1);
        using InProcessGroup group = new(config);
        EpAll2AllLayer layer = group.Layers[0];
        DeviceTensor<BFloat16> input = new(0x1000, [2, 8]);
        DeviceTensor<int> ids = new(0x2000, [2, 1]);

        NotSupportedException e = await Assert.ThrowsAsync<NotSupportedException>(async () => await layer.DispatchOnDeviceAsync(input, ids, cancellationToken: TestContext.Current.CancellationToken));

        Assert.Contains("cpu backend has no device buffers", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Device_tensor_rejects_negative_lengths_and_a_null_pointer_for_data()
    {
        Assert.Throws<ArgumentException>(() => new DeviceTensor<float>(0x1000, [3, -1]));
        Assert.Throws<ArgumentException>(() => new DeviceTensor<float>(0, [3, 4]));

        DeviceTensor<Half> empty = new(0, [0, 4]);
        DeviceTensor<Half> rows = new(0x1000, [3, 4]);
        Assert.Equal(0, empty.FlattenedLength);
        Assert.Equal(24, rows.ByteLength);
        Assert.Equal([3, 4], rows.Lengths.ToArray());
    }

    [Fact]
    public async Task Device_inputs_of_the_wrong_shape_or_type_are_rejected_before_anything_runs()
    {
        EpConfig config = new(maxTokens: 4, hidden: 8, topK: 2, numExperts: 2, rank: 0, worldSize: 1, localWorldSize: 1);
        EpAll2AllLayer layer = EpAll2AllLayerForShapeChecks(config);

        // The CPU backend refuses device buffers first; the shape checks are the same code for CUDA (DeviceTensorValidator).
        await Assert.ThrowsAsync<NotSupportedException>(async () => await layer.DispatchOnDeviceAsync(new DeviceTensor<BFloat16>(0x1000, [5, 8]), new DeviceTensor<int>(0x2000, [5, 2]), cancellationToken: TestContext.Current.CancellationToken));
        ArgumentException tooMany = Assert.Throws<ArgumentException>(() => DeviceTensorValidator.Dispatch(config, new DeviceTensor<BFloat16>(0x1000, [5, 8]), new DeviceTensor<int>(0x2000, [5, 2]), null, null));
        Assert.Contains("MaxTokens", tooMany.Message, StringComparison.Ordinal);
        ArgumentException ids = Assert.Throws<ArgumentException>(() => DeviceTensorValidator.Dispatch(config, new DeviceTensor<BFloat16>(0x1000, [3, 8]), new DeviceTensor<int>(0x2000, [3, 1]), null, null));
        Assert.Equal("expertIds", ids.ParamName);
        ArgumentException type = Assert.Throws<ArgumentException>(() => DeviceTensorValidator.Dispatch(config, new DeviceTensor<float>(0x1000, [3, 8]), new DeviceTensor<int>(0x2000, [3, 2]), null, null));
        Assert.Equal("input", type.ParamName);
        ArgumentException weights = Assert.Throws<ArgumentException>(() => DeviceTensorValidator.Dispatch(config, new DeviceTensor<BFloat16>(0x1000, [3, 8]), new DeviceTensor<int>(0x2000, [3, 2]), new DeviceTensor<float>(0x3000, [3, 1]), null));
        Assert.Equal("weights", weights.ParamName);
        layer.Dispose();
    }

    private static EpAll2AllLayer EpAll2AllLayerForShapeChecks(EpConfig config) =>
        EpAll2AllLayer.CreateCpu(config, new Transport.InProcessFabric(1).TransportFor(0));

    private static string FirstLine(string s) => s.Split('\n', 2)[0];

    private static UnreachableException SkipException(string why)
    {
        Assert.Skip(why);
        return new UnreachableException();
    }

    /// <summary>EPA2A_TOOLS, else the epa2a-tools.dll built beside this checkout.</summary>
    private static string? FindCli()
    {
        if (Environment.GetEnvironmentVariable("EPA2A_TOOLS") is { Length: > 0 } env && File.Exists(env))
        {
            return env;
        }

        for (DirectoryInfo? d = new(AppContext.BaseDirectory); d is not null; d = d.Parent)
        {
            foreach (string configuration in new[] { "Release", "Debug" })
            {
                string candidate = Path.Combine(d.FullName, "src", "EpA2A.Tools", "bin", configuration, "net10.0", "epa2a-tools.dll");
                if (File.Exists(candidate))
                {
                    return candidate;
                }
            }
        }

        return null;
    }

    private static async Task<(int Exit, string Log)> RunAsync(string cli, string[] args, TimeSpan limit)
    {
        ProcessStartInfo psi = new(cli.EndsWith(".dll", StringComparison.Ordinal) ? "dotnet" : cli) { RedirectStandardOutput = true, RedirectStandardError = true };
        if (cli.EndsWith(".dll", StringComparison.Ordinal))
        {
            psi.ArgumentList.Add(cli);
        }

        foreach (string a in args)
        {
            psi.ArgumentList.Add(a);
        }

        using Process p = Process.Start(psi)!;
        Task<string> stdout = p.StandardOutput.ReadToEndAsync();
        Task<string> stderr = p.StandardError.ReadToEndAsync();
        using CancellationTokenSource cts = new(limit);
        try
        {
            await p.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"epa2a {args[0]} ran past {limit}");
        }

        return (p.ExitCode, await stdout + await stderr);
    }
}

using System.CommandLine;
using System.Diagnostics;
using EpA2A.Safetensors;
using EpA2A.Silo.Commands;
using EpA2A.Silo.StepFiles;

namespace EpA2A.Cluster.Tests;

/// <summary>
/// The promises of `epa2a step` that a careless user tested (issue 17, findings 2, 4, 5, 7 and 11): outputs whole or
/// not at all and never over the input, no open that blocks on a FIFO, bounds before allocation, and NaN or Inf
/// compared by identity.
/// </summary>
public sealed class StepCommandPromiseTests : IDisposable
{
    private readonly string directory = Directory.CreateTempSubdirectory("epa2a-step-promise-").FullName;

    [Fact]
    public async Task An_out_directory_that_holds_the_input_is_refused_and_the_input_is_left_as_it_was()
    {
        string input = Path.Combine(directory, StepCommand.CombineFileName);
        SafetensorsWriter.Write(input, Trace(world: 2, tokens: 3, hidden: 4, seed: 1));
        byte[] before = File.ReadAllBytes(input);

        (int code, _, string stderr) = await InvokeAsync("--input", input, "--out", directory);

        Assert.True(code == 2, $"exit {code}: {stderr}");
        Assert.Contains("would overwrite --input", stderr, StringComparison.Ordinal);
        Assert.Equal(before, File.ReadAllBytes(input));
        Assert.False(File.Exists(Path.Combine(directory, StepCommand.DispatchFileName)));
    }

    [Fact]
    public async Task A_fifo_as_input_is_refused_at_once_instead_of_blocking_in_open()
    {
        string fifo = Path.Combine(directory, "trace.fifo");
        using (Process mkfifo = Process.Start("mkfifo", fifo))
        {
            await mkfifo.WaitForExitAsync(TestContext.Current.CancellationToken);
        }

        Stopwatch clock = Stopwatch.StartNew();
        (int code, _, string stderr) = await InvokeAsync("--input", fifo, "--out", Path.Combine(directory, "out")).WaitAsync(TimeSpan.FromSeconds(20), TestContext.Current.CancellationToken);

        Assert.True(code == 2, $"exit {code}: {stderr}");
        Assert.Contains("not a regular file", stderr, StringComparison.Ordinal);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(5), $"took {clock.Elapsed}");
    }

    [Fact]
    public async Task More_ranks_than_a_replay_runs_in_one_process_are_refused_before_anything_is_allocated()
    {
        string input = Path.Combine(directory, "wide.safetensors");
        SafetensorsWriter.Write(input, Trace(world: StepCommand.MaxWorldSize + 1, tokens: 1, hidden: 2, seed: 2));

        (int code, _, string stderr) = await InvokeAsync("--input", input, "--out", Path.Combine(directory, "out"), "--experts", $"{StepCommand.MaxWorldSize + 1}");

        Assert.True(code == 2, $"exit {code}: {stderr}");
        Assert.Contains($"has {StepCommand.MaxWorldSize + 1} ranks", stderr, StringComparison.Ordinal);
        Assert.Contains($"at most {StepCommand.MaxWorldSize}", stderr, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_failure_writing_the_second_file_leaves_the_last_runs_files_whole_and_no_partial_file()
    {
        string input = Path.Combine(directory, "trace.safetensors");
        string output = Path.Combine(directory, "out");
        SafetensorsWriter.Write(input, Trace(world: 2, tokens: 3, hidden: 4, seed: 3));
        (int code, _, string stderr) = await InvokeAsync("--input", input, "--out", output);
        Assert.True(code == 0, $"exit {code}: {stderr}");
        byte[] dispatch = File.ReadAllBytes(Path.Combine(output, StepCommand.DispatchFileName));
        byte[] combine = File.ReadAllBytes(Path.Combine(output, StepCommand.CombineFileName));

        // Another trace; the combine file cannot be written (its partial name is taken by a directory).
        SafetensorsWriter.Write(input, Trace(world: 2, tokens: 5, hidden: 4, seed: 4));
        string blocked = Path.Combine(output, StepCommand.CombineFileName + StepCommand.PartialSuffix);
        Directory.CreateDirectory(blocked);
        (code, _, stderr) = await InvokeAsync("--input", input, "--out", output);
        Directory.Delete(blocked);

        Assert.True(code == 4, $"exit {code}: {stderr}");
        Assert.DoesNotContain('\n', stderr.TrimEnd());
        Assert.Equal(dispatch, File.ReadAllBytes(Path.Combine(output, StepCommand.DispatchFileName)));
        Assert.Equal(combine, File.ReadAllBytes(Path.Combine(output, StepCommand.CombineFileName)));
        Assert.False(File.Exists(Path.Combine(output, StepCommand.DispatchFileName + StepCommand.PartialSuffix)));
    }

    [Theory]
    [InlineData(float.NaN)]
    [InlineData(float.PositiveInfinity)]
    public async Task A_non_finite_token_that_the_reference_carries_the_same_way_is_not_a_mismatch(float poison)
    {
        string input = Path.Combine(directory, "nan.safetensors");
        SafetensorsWriter.Write(input, Trace(world: 2, tokens: 4, hidden: 6, seed: 5, poison: poison));

        (int code, string stdout, string stderr) = await InvokeAsync("--input", input, "--out", Path.Combine(directory, "out"));

        Assert.True(code == 0, $"exit {code}: {stderr} {stdout}");
        SafetensorsFile combine = SafetensorsReader.Read(Path.Combine(directory, "out", StepCommand.CombineFileName));
        float[] combined = [.. combine.Tensors.Single(t => t.Name == "rank0.combined").ToArray<float>()];
        Assert.Contains(combined, v => !float.IsFinite(v)); // the poison really reached the output
    }

    [Theory]
    [InlineData("--timeout-seconds", "1e12", "--timeout-seconds must be in (0, 3600]")]
    [InlineData("--alignment", "3", "--alignment 3 must be a power of two")]
    public async Task Out_of_range_options_exit_2_naming_the_option(string option, string value, string message)
    {
        string input = Path.Combine(directory, "trace.safetensors");
        SafetensorsWriter.Write(input, Trace(world: 2, tokens: 3, hidden: 4, seed: 6));
        (int code, _, string stderr) = await InvokeAsync("--input", input, "--out", Path.Combine(directory, "out"), option, value);
        Assert.True(code == 2, $"exit {code}: {stderr}");
        Assert.Contains(message, stderr, StringComparison.Ordinal);
    }

    public void Dispose() => Directory.Delete(directory, recursive: true);

    /// <summary>A trace of fp32 tokens (values drawn from <paramref name="seed"/>, never zero); <paramref name="poison"/> goes into rank 0's first token.</summary>
    private static SafetensorsFile Trace(int world, int tokens, int hidden, int seed, float? poison = null)
    {
        Random rng = new(seed);
        const int TopK = 2;
        int experts = world * 2;
        List<SafetensorsTensor> tensors = [];
        for (int r = 0; r < world; r++)
        {
            float[] values = [.. Enumerable.Range(0, tokens * hidden).Select(_ => (float)(rng.NextDouble() + 0.5))];
            if (r == 0 && poison is float p)
            {
                values[1] = p;
            }

            int[] ids = [.. Enumerable.Range(0, tokens * TopK).Select(i => ((i / TopK) + (i % TopK * 3) + rng.Next(experts)) % experts)];
            for (int t = 0; t < tokens; t++)
            {
                if (ids[t * TopK] == ids[(t * TopK) + 1])
                {
                    ids[(t * TopK) + 1] = (ids[t * TopK] + 1) % experts;
                }
            }

            tensors.Add(SafetensorsTensor.FromValues<float>(StepTraceNames.Of(r, StepTraceNames.Tokens), [tokens, hidden], values));
            tensors.Add(SafetensorsTensor.FromValues<int>(StepTraceNames.Of(r, StepTraceNames.ExpertIds), [tokens, TopK], ids));
        }

        return new SafetensorsFile(tensors, new Dictionary<string, string> { [StepTraceNames.NumExpertsKey] = $"{experts}" });
    }

    private static async Task<(int Code, string Stdout, string Stderr)> InvokeAsync(params string[] args)
    {
        using StringWriter stdout = new();
        using StringWriter stderr = new();
        RootCommand root = new("test") { StepCommand.Create() };
        int code = await root.Parse(["step", .. args]).InvokeAsync(
            new InvocationConfiguration { Output = stdout, Error = stderr }, TestContext.Current.CancellationToken);
        return (code, stdout.ToString(), stderr.ToString());
    }
}

using System.CommandLine;
using System.Globalization;
using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Experts;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Reference;
using EpA2A.Safetensors;
using EpA2A.Silo.Commands;
using EpA2A.Silo.StepFiles;

namespace EpA2A.Cluster.Tests;

/// <summary>
/// `epa2a step` end to end: a routing trace written as safetensors goes in through the command line, the
/// outputs are read back and compared with the independent reference (dispatch exactly, combine within the
/// token type's rounding); bad files give exit code 2 and one line naming the problem.
/// </summary>
public sealed class StepCommandTests : IDisposable
{
    private readonly string directory = Directory.CreateTempSubdirectory("epa2a-step-").FullName;

    /// <summary>A step to replay: the group, the routing, the file's token dtype and how the command is asked to run it.</summary>
    public sealed record Scenario(
        int World,
        int Local,
        int Experts,
        int Hidden,
        int TopK,
        TokenType FileType,
        TokenType RunType,
        bool Weights = false,
        bool Weighted = false,
        int Alignment = 1,
        bool LocalCombine = false,
        bool Scatter = false,
        bool LongIds = false,
        bool ExpertsInMetadata = true,
        bool LastRankEmpty = false)
    {
        public EpConfig Config(int maxTokens) => new(
            maxTokens, Hidden, TopK, Experts, 0, World, Local, RunType, enableLocalCombine: LocalCombine, expertAlignment: Alignment);
    }

    public static TheoryData<string> ScenarioNames() => [.. Scenarios.Keys];

    private static Dictionary<string, Scenario> Scenarios { get; } = new()
    {
        ["bf16 intra-node, weights carried, unweighted combine"] =
            new(World: 4, Local: 4, Experts: 16, Hidden: 40, TopK: 3, TokenType.BFloat16, TokenType.BFloat16, Weights: true),
        ["fp16 inter-node, weighted, I64 ids, alignment 8, an empty rank"] =
            new(World: 4, Local: 2, Experts: 8, Hidden: 33, TopK: 2, TokenType.Float16, TokenType.Float16, Weights: true, Weighted: true, Alignment: 8, LongIds: true, ExpertsInMetadata: false, LastRankEmpty: true),
        ["fp32 local combine with scatter indices"] =
            new(World: 2, Local: 2, Experts: 8, Hidden: 17, TopK: 4, TokenType.Float32, TokenType.Float32, LocalCombine: true, Scatter: true),
        ["fp32 file run as bf16 on four nodes, weighted"] =
            new(World: 4, Local: 1, Experts: 12, Hidden: 24, TopK: 3, TokenType.Float32, TokenType.BFloat16, Weights: true, Weighted: true),
        ["one rank"] =
            new(World: 1, Local: 1, Experts: 4, Hidden: 8, TopK: 2, TokenType.BFloat16, TokenType.BFloat16),
    };

    [Theory]
    [MemberData(nameof(ScenarioNames))]
    public async Task A_replayed_trace_writes_outputs_equal_to_the_reference(string name)
    {
        Scenario s = Scenarios[name];
        int seed = Random.Shared.Next();
        try
        {
            await ((s.FileType, s.RunType) switch
            {
                (TokenType.BFloat16, TokenType.BFloat16) => ReplayAsync<BFloat16, BFloat16>(s, seed),
                (TokenType.Float16, TokenType.Float16) => ReplayAsync<Half, Half>(s, seed),
                (TokenType.Float32, TokenType.Float32) => ReplayAsync<float, float>(s, seed),
                (TokenType.Float32, TokenType.BFloat16) => ReplayAsync<float, BFloat16>(s, seed),
                _ => throw new NotSupportedException(name),
            });
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            throw new InvalidOperationException($"scenario '{name}', seed {seed}: {e.Message}", e);
        }
    }

    public static TheoryData<string> BadFileNames() => [.. BadFiles.Keys];

    /// <summary>A broken input, and what the error line must name.</summary>
    private static Dictionary<string, (Action<string> Write, string[] Message)> BadFiles { get; } = new()
    {
        ["not a safetensors file"] = (path => File.WriteAllText(path, "tokens,expert_ids\n1,2\n"), ["bad input file", "more than the 100000000"]),
        ["truncated file"] = (path => File.WriteAllBytes(path, ValidTraceBytes()[..^6]), ["bad input file", "past the end of the", "rank1.tokens"]),
        ["expert id out of range"] = (path => WriteTrace(path, ids: (r, i) => r == 1 && i == 5 ? 17 : i % 8), ["rank1.expert_ids[2, 1] = 17 is outside [0, 8]"]),
        ["a rank missing"] = (path => WriteTrace(path, skipRank: 1), ["none for rank 1", "0..W-1"]),
        ["weights on some ranks only"] = (path => WriteTrace(path, weightsOnRank0Only: true), ["rank1.weights is missing but rank0.weights is present"]),
        ["integer tokens"] = (path => WriteTrace(path, intTokens: true), ["rank0.tokens is I32", "BF16, F16 or F32"]),
        ["an unknown tensor"] = (path => WriteTrace(path, extra: "rank0.weight"), ["tensor 'rank0.weight' is not a step input"]),
        ["no expert count"] = (path => WriteTrace(path, metadata: false), ["--experts", "num_experts"]),
        ["a scatter index repeated"] = (path => WriteTrace(path, scatter: (r, i) => 0), ["scatter_indices", "each row takes one slot"]),
    };

    [Theory]
    [MemberData(nameof(BadFileNames))]
    public async Task A_bad_input_file_exits_with_code_2_and_one_line_that_names_the_problem(string name)
    {
        (Action<string> write, string[] message) = BadFiles[name];
        string input = Path.Combine(directory, "bad.safetensors");
        write(input);
        string output = Path.Combine(directory, "out");

        (int code, string stdout, string stderr) = await InvokeAsync("--input", input, "--out", output);

        Assert.True(code == 2, $"exit {code}; stderr: {stderr}; stdout: {stdout}");
        string line = stderr.TrimEnd();
        Assert.DoesNotContain('\n', line);
        Assert.DoesNotContain("   at ", line, StringComparison.Ordinal);
        foreach (string part in message)
        {
            Assert.Contains(part, line, StringComparison.Ordinal);
        }

        Assert.False(Directory.Exists(output), "no output may be written for a bad input");
    }

    [Fact]
    public async Task Options_that_contradict_the_file_exit_with_code_2_naming_the_option()
    {
        string input = Path.Combine(directory, "trace.safetensors");
        File.WriteAllBytes(input, ValidTraceBytes());
        string output = Path.Combine(directory, "out");

        (int code, _, string stderr) = await InvokeAsync("--input", input, "--out", output, "--max-tokens", "2");
        Assert.Equal(2, code);
        Assert.Contains("--max-tokens 2 is less than", stderr, StringComparison.Ordinal);

        (code, _, stderr) = await InvokeAsync("--input", input, "--out", output, "--experts", "5");
        Assert.Equal(2, code);
        Assert.Contains("--experts = 5 must be a positive multiple of the 2 ranks", stderr, StringComparison.Ordinal);

        (code, _, stderr) = await InvokeAsync("--input", input, "--out", output, "--weighted");
        Assert.Equal(2, code);
        Assert.Contains("--weighted needs routing weights", stderr, StringComparison.Ordinal);

        (code, _, stderr) = await InvokeAsync("--input", Path.Combine(directory, "missing.safetensors"), "--out", output);
        Assert.Equal(2, code);
        Assert.Contains("no such file", stderr, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Experts_other_than_the_reference_assumes_make_the_check_fail_with_exit_code_1()
    {
        string input = Path.Combine(directory, "trace.safetensors");
        File.WriteAllBytes(input, ValidTraceBytes());
        using StringWriter stdout = new();
        using StringWriter stderr = new();

        int code = await StepCommand.RunAsync(
            new StepRequest(input, Path.Combine(directory, "out")), stdout, stderr, new ShiftedExperts(), TestContext.Current.CancellationToken);

        Assert.True(code == 1, $"exit {code}; stderr: {stderr}");
        Assert.Contains("MISMATCH", stdout.ToString(), StringComparison.Ordinal);
        Assert.Contains("differs from the reference: rank 0 combined[", stderr.ToString(), StringComparison.Ordinal);
        Assert.True(File.Exists(Path.Combine(directory, "out", StepCommand.CombineFileName)), "outputs are written even when they differ, to inspect them");
    }

    public void Dispose() => Directory.Delete(directory, recursive: true);

    private async Task ReplayAsync<TFile, TRun>(Scenario s, int seed)
        where TFile : unmanaged
        where TRun : unmanaged
    {
        Random rng = new(seed);
        int maxTokens = 24;
        EpConfig fileConfig = new(maxTokens, s.Hidden, s.TopK, s.Experts, 0, s.World, s.World, s.FileType);
        int[] counts = [.. Enumerable.Range(0, s.World).Select(r => s.LastRankEmpty && r == s.World - 1 ? 0 : rng.Next(1, maxTokens + 1))];
        RankInput<TFile>[] drawn = RoutingGenerator.Draw<TFile>(fileConfig, counts, dropRatio: 0.2, skewed: rng.Next(2) == 0, s.Weights, rng);
        if (s.Scatter)
        {
            drawn = WithShuffledScatter(fileConfig, drawn, rng);
        }

        // The file, as a model would dump it.
        List<SafetensorsTensor> tensors = [];
        for (int r = 0; r < s.World; r++)
        {
            RankInput<TFile> input = drawn[r];
            tensors.Add(SafetensorsTensor.FromValues<TFile>(StepTraceNames.Of(r, StepTraceNames.Tokens), [input.Count, s.Hidden], input.Tokens));
            tensors.Add(Indices(StepTraceNames.Of(r, StepTraceNames.ExpertIds), input.Count, s.TopK, input.ExpertIds, s.LongIds));
            if (input.Weights is { } w)
            {
                tensors.Add(SafetensorsTensor.FromValues<float>(StepTraceNames.Of(r, StepTraceNames.Weights), [input.Count, s.TopK], w));
            }

            if (input.ScatterIndices is { } si)
            {
                tensors.Add(Indices(StepTraceNames.Of(r, StepTraceNames.ScatterIndices), input.Count, s.TopK, si, s.LongIds));
            }
        }

        Dictionary<string, string> metadata = s.ExpertsInMetadata ? new() { [StepTraceNames.NumExpertsKey] = $"{s.Experts}" } : [];
        string inputPath = Path.Combine(directory, "trace.safetensors");
        SafetensorsWriter.Write(inputPath, new SafetensorsFile(tensors, metadata));

        List<string> args = ["--input", inputPath, "--out", Path.Combine(directory, "out"), "--local-world-size", $"{s.Local}", "--alignment", $"{s.Alignment}"];
        args.AddRange(s.ExpertsInMetadata ? [] : ["--experts", $"{s.Experts}"]);
        args.AddRange(s.RunType == s.FileType ? [] : ["--token-type", s.RunType == TokenType.BFloat16 ? "bf16" : "fp16"]);
        args.AddRange(s.Weighted ? ["--weighted"] : []);
        args.AddRange(s.LocalCombine ? ["--local-combine"] : []);
        (int code, string stdout, string stderr) = await InvokeAsync([.. args]);
        Assert.True(code == 0, $"exit {code}; stderr: {stderr}; stdout: {stdout}");
        Assert.Empty(stderr);
        Assert.Contains("equal bit for bit", stdout, StringComparison.Ordinal);

        // The reference, on the inputs as the step ran them (tokens rounded to the run's type when it differs).
        int largest = counts.Max();
        EpConfig config = s.Config(largest);
        RankInput<TRun>[] inputs = [.. drawn.Select(i => new RankInput<TRun>(
            [.. i.Tokens.Select(t => TokenConvert.FromSingle<TRun>(TokenConvert.ToSingle(t)))], i.Count, i.ExpertIds, i.Weights, i.ScatterIndices))];
        ReferenceStep<TRun> expected = ReferenceAllToAll.Dispatch(config, inputs);
        TRun[][] expertOutputs = [.. expected.PerRank.Select((d, r) =>
            DeterministicExperts.ApplyToBlocks<TRun>(d.Output, s.Hidden, r * config.ExpertsPerRank, d.ExpertRowStarts, d.RowsPerLocalExpert))];
        TRun[][] combined = ReferenceAllToAll.Combine(config, inputs, expected, expertOutputs, s.Weighted);

        SafetensorsFile dispatch = SafetensorsReader.Read(Path.Combine(directory, "out", StepCommand.DispatchFileName));
        SafetensorsFile combine = SafetensorsReader.Read(Path.Combine(directory, "out", StepCommand.CombineFileName));
        Assert.Equal($"{s.Experts}", dispatch.Metadata[StepTraceNames.NumExpertsKey]);
        for (int r = 0; r < s.World; r++)
        {
            ReferenceDispatch<TRun> e = expected.PerRank[r];
            SafetensorsTensor output = Get(dispatch, r, StepTraceNames.Output);
            Assert.Equal([e.Rows, (long)s.Hidden], output.Shape.ToArray());
            Assert.Equal(SafetensorsDTypes.Of<TRun>(), output.DType);
            AssertBitwiseEqual(e.Output, output.ToArray<TRun>(), $"rank {r} dispatch output");
            Assert.True(e.Rows == 0 || e.Output.Any(v => TokenConvert.ToSingle(v) != 0f), $"rank {r}: a test on zeros proves nothing");
            if (s.Weights)
            {
                Assert.Equal(e.Weights!, Get(dispatch, r, StepTraceNames.Weights).ToArray<float>());
            }
            else
            {
                Assert.False(dispatch.TryGet(StepTraceNames.Of(r, StepTraceNames.Weights), out _), $"rank {r} has weights without any in the input");
            }

            Assert.Equal(e.RowsPerLocalExpert, Get(dispatch, r, StepTraceNames.RowsPerLocalExpert).ToArray<int>());
            Assert.Equal(e.PaddedRowsPerLocalExpert, Get(dispatch, r, StepTraceNames.PaddedRowsPerLocalExpert).ToArray<int>());
            Assert.Equal(e.ExpertRowStarts, Get(dispatch, r, StepTraceNames.ExpertRowStarts).ToArray<int>());
            Assert.Equal(expected.GlobalScatterIndices[r], Get(dispatch, r, StepTraceNames.ScatterIndices).ToArray<int>());
            Assert.Equal(expected.TokensPerSourceRank, Get(dispatch, r, StepTraceNames.TokensPerSourceRank).ToArray<int>());

            AssertBitwiseEqual(expertOutputs[r], Get(combine, r, StepTraceNames.ExpertOutput).ToArray<TRun>(), $"rank {r} expert output");
            SafetensorsTensor got = Get(combine, r, StepTraceNames.Combined);
            Assert.Equal([counts[r], (long)s.Hidden], got.Shape.ToArray());
            AssertWithinRounding(combined[r], got.ToArray<TRun>(), config, $"rank {r} combined");
        }

        Assert.Contains(combined, c => c.Any(v => TokenConvert.ToSingle(v) != 0f));
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

    /// <summary>A small valid trace: 2 ranks, 8 experts, 3 tokens each, hidden 4, top-2.</summary>
    private static byte[] ValidTraceBytes() => SafetensorsWriter.Serialize(Trace());

    private static void WriteTrace(
        string path,
        Func<int, int, int>? ids = null,
        int skipRank = -1,
        bool weightsOnRank0Only = false,
        bool intTokens = false,
        string? extra = null,
        bool metadata = true,
        Func<int, int, int>? scatter = null) =>
        SafetensorsWriter.Write(path, Trace(ids, skipRank, weightsOnRank0Only, intTokens, extra, metadata, scatter));

    private static SafetensorsFile Trace(
        Func<int, int, int>? ids = null,
        int skipRank = -1,
        bool weightsOnRank0Only = false,
        bool intTokens = false,
        string? extra = null,
        bool metadata = true,
        Func<int, int, int>? scatter = null)
    {
        const int Tokens = 3, Hidden = 4, TopK = 2, Ranks = 3;
        List<SafetensorsTensor> tensors = [];
        for (int r = 0; r < (skipRank >= 0 ? Ranks : 2); r++)
        {
            if (r == skipRank)
            {
                continue;
            }

            float[] values = [.. Enumerable.Range(1, Tokens * Hidden).Select(i => (i * 0.25f) + r)];
            tensors.Add(intTokens
                ? SafetensorsTensor.FromValues<int>(StepTraceNames.Of(r, StepTraceNames.Tokens), [Tokens, Hidden], [.. values.Select(v => (int)v)])
                : SafetensorsTensor.FromValues<BFloat16>(StepTraceNames.Of(r, StepTraceNames.Tokens), [Tokens, Hidden], [.. values.Select(BFloat16.FromSingle)]));
            int rank = r;
            tensors.Add(SafetensorsTensor.FromValues<int>(
                StepTraceNames.Of(r, StepTraceNames.ExpertIds), [Tokens, TopK], [.. Enumerable.Range(0, Tokens * TopK).Select(i => ids?.Invoke(rank, i) ?? ((i + rank) % 8))]));
            if (weightsOnRank0Only && r == 0)
            {
                tensors.Add(SafetensorsTensor.FromValues<float>(StepTraceNames.Of(r, StepTraceNames.Weights), [Tokens, TopK], [.. Enumerable.Repeat(0.5f, Tokens * TopK)]));
            }

            if (scatter is not null)
            {
                tensors.Add(SafetensorsTensor.FromValues<int>(
                    StepTraceNames.Of(r, StepTraceNames.ScatterIndices), [Tokens, TopK], [.. Enumerable.Range(0, Tokens * TopK).Select(i => scatter(rank, i))]));
            }
        }

        if (extra is not null)
        {
            tensors.Add(SafetensorsTensor.FromValues<float>(extra, [1], [1f]));
        }

        return new SafetensorsFile(tensors, metadata ? new Dictionary<string, string> { [StepTraceNames.NumExpertsKey] = "8" } : null);
    }

    private static SafetensorsTensor Indices(string name, int count, int topK, int[] values, bool wide) => wide
        ? SafetensorsTensor.FromValues<long>(name, [count, topK], [.. values.Select(v => (long)v)])
        : SafetensorsTensor.FromValues<int>(name, [count, topK], values);

    /// <summary>Scatter indices that place every row somewhere new: the packed placement, permuted inside each destination rank.</summary>
    private static RankInput<T>[] WithShuffledScatter<T>(EpConfig config, RankInput<T>[] inputs, Random rng)
        where T : unmanaged
    {
        ReferenceStep<T> packed = ReferenceAllToAll.Dispatch(config, inputs);
        int[] bases = new int[config.WorldSize + 1];
        for (int d = 0; d < config.WorldSize; d++)
        {
            bases[d + 1] = bases[d] + packed.PerRank[d].Rows;
        }

        int[] permutation = new int[bases[^1]];
        for (int d = 0; d < config.WorldSize; d++)
        {
            int[] range = [.. Enumerable.Range(bases[d], bases[d + 1] - bases[d])];
            rng.Shuffle(range);
            range.CopyTo(permutation, bases[d]);
        }

        return [.. inputs.Select((input, r) => input with
        {
            ScatterIndices = [.. packed.GlobalScatterIndices[r].Select(g => g < 0 ? -1 : permutation[g])],
        })];
    }

    private static SafetensorsTensor Get(SafetensorsFile file, int rank, string field)
    {
        string name = StepTraceNames.Of(rank, field);
        Assert.True(file.TryGet(name, out SafetensorsTensor? tensor), $"{name} is missing");
        return tensor;
    }

    private static void AssertBitwiseEqual<T>(T[] expected, T[] actual, string what)
        where T : unmanaged
    {
        Assert.True(expected.Length == actual.Length, $"{what}: {actual.Length} elements, expected {expected.Length}");
        for (int i = 0; i < expected.Length; i++)
        {
            if (!EqualityComparer<T>.Default.Equals(expected[i], actual[i]))
            {
                Assert.Fail($"{what}: element {i} is {actual[i]}, expected {expected[i]}");
            }
        }
    }

    private static void AssertWithinRounding<T>(T[] expected, T[] actual, EpConfig config, string what)
        where T : unmanaged
    {
        Assert.True(expected.Length == actual.Length, $"{what}: {actual.Length} elements, expected {expected.Length}");
        float relative = config.TokenType switch { TokenType.BFloat16 => 1f / 128f, TokenType.Float16 => 1f / 1024f, _ => 2.4e-7f };
        for (int i = 0; i < expected.Length; i++)
        {
            float want = TokenConvert.ToSingle(expected[i]);
            float got = TokenConvert.ToSingle(actual[i]);
            float tolerance = (Math.Max(Math.Abs(want), 1e-3f) * relative) + (config.TopK * 16e-7f * Math.Max(1f, Math.Abs(want)));
            if (!(Math.Abs(want - got) <= tolerance))
            {
                Assert.Fail(string.Create(CultureInfo.InvariantCulture, $"{what}: element {i} is {got}, expected {want} (tolerance {tolerance})"));
            }
        }
    }

    /// <summary>Experts that are not the ones the reference assumes: each output is the deterministic one plus 1.</summary>
    private sealed class ShiftedExperts : IExpertCompute
    {
        public async ValueTask<Tensor<T>> ComputeAsync<T>(string layer, EpConfig config, DispatchResult<T> dispatched, CancellationToken cancellationToken)
            where T : unmanaged
        {
            Tensor<T> right = await new DeterministicExpertCompute().ComputeAsync(layer, config, dispatched, cancellationToken);
            T[] values = new T[(int)right.FlattenedLength];
            right.FlattenTo(values);
            return Tensor.Create([.. values.Select(v => TokenConvert.FromSingle<T>(TokenConvert.ToSingle(v) + 1f))], right.Lengths);
        }
    }
}

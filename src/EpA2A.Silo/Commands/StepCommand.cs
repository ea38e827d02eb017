using System.CommandLine;
using System.Globalization;
using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Errors;
using EpA2A.Experts;
using EpA2A.Grains;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Reference;
using EpA2A.Safetensors;
using EpA2A.Silo.StepFiles;

namespace EpA2A.Silo.Commands;

/// <summary>What `epa2a step` was asked to do; null options take their defaults from the file.</summary>
/// <param name="Input">The safetensors file of per-rank inputs.</param>
/// <param name="OutputDirectory">Where dispatch.safetensors and combine.safetensors go (created if missing).</param>
/// <param name="NumExperts">Experts in the group; null: the file's "num_experts" metadata.</param>
/// <param name="LocalWorldSize">Ranks per node; null: all ranks on one node.</param>
/// <param name="MaxTokens">Tokens per rank, at most; null: the largest rank's count.</param>
/// <param name="TokenType">Element type of the step; null: the file's token dtype.</param>
/// <param name="LocalCombine">A token crosses to a rank once (single node).</param>
/// <param name="Alignment">Rows per local expert are padded to a multiple of this.</param>
/// <param name="Weighted">Combine multiplies each row by its routing weight.</param>
/// <param name="Timeout">The deadline of each collective operation.</param>
internal sealed record StepRequest(
    string? Input,
    string? OutputDirectory,
    int? NumExperts = null,
    int? LocalWorldSize = null,
    int? MaxTokens = null,
    TokenType? TokenType = null,
    bool LocalCombine = false,
    int Alignment = 1,
    bool Weighted = false,
    TimeSpan? Timeout = null);

/// <summary>
/// `epa2a step`: replays one step from a safetensors file of per-rank tokens and routing (dumped from a real
/// model, say). All ranks run in this process on the CPU backend: dispatch, the built-in deterministic experts,
/// combine. Every output goes to DIR/dispatch.safetensors and DIR/combine.safetensors, and the result is checked
/// against the independent reference. Exit codes: 0 equal to the reference, 1 different, 2 bad file or options,
/// 3 the step itself failed (deadline).
/// </summary>
internal static class StepCommand
{
    public const int ExitSuccess = 0;
    public const int ExitMismatch = 1;
    public const int ExitBadInput = 2;
    public const int ExitStepFailed = 3;
    public const int ExitIoFailed = 4;

    public const string DispatchFileName = "dispatch.safetensors";
    public const string CombineFileName = "combine.safetensors";

    /// <summary>What an output file is called until both are complete.</summary>
    public const string PartialSuffix = ".partial";

    private const string LayerName = "step";
    private const int MaxReportedMismatches = 5;

    public static Command Create()
    {
        Option<string?> input = new("--input") { HelpName = "FILE.safetensors", Description = "Safetensors file: rank{r}.tokens [n, hidden], rank{r}.expert_ids [n, topk], optional rank{r}.weights and rank{r}.scatter_indices" };
        Option<string?> output = new("--out") { HelpName = "DIR", Description = "Directory for dispatch.safetensors and combine.safetensors (created if missing)" };
        Option<int?> experts = new("--experts") { HelpName = "E", Description = "Experts in the group, a multiple of the ranks (default: the file's num_experts metadata)" };
        Option<int?> local = new("--local-world-size") { HelpName = "L", Description = "Ranks per node (default: all; smaller runs the inter-node algorithm)" };
        Option<int?> maxTokens = new("--max-tokens") { HelpName = "M", Description = "Tokens per rank, at most (default: the largest rank's count)" };
        Option<string?> tokenType = new("--token-type") { Description = "Run the step in bf16, fp16 or fp32 (default: the file's token dtype)" };
        tokenType.AcceptOnlyFromAmong("bf16", "fp16", "fp32");
        Option<bool> localCombine = new("--local-combine") { Description = "A token crosses to a rank once; the rank expands and pre-sums it (single node)" };
        Option<int> alignment = new("--alignment") { HelpName = "A", Description = "Pad rows per local expert to a multiple of this (a power of two)", DefaultValueFactory = _ => 1 };
        Option<bool> weighted = new("--weighted") { Description = "Combine multiplies each expert output row by its routing weight (needs weights)" };
        Option<double> timeout = new("--timeout-seconds") { HelpName = "S", Description = "Deadline of each collective operation", DefaultValueFactory = _ => 30 };

        Command command = new("step", "Run one step (dispatch, deterministic experts, combine) from a safetensors file, write every output as safetensors, and check it against the reference.")
        {
            input, output, experts, local, maxTokens, tokenType, localCombine, alignment, weighted, timeout,
        };
        command.SetAction((p, ct) =>
        {
            double seconds = p.GetValue(timeout);
            StepRequest request = new(
                p.GetValue(input),
                p.GetValue(output),
                p.GetValue(experts),
                p.GetValue(local),
                p.GetValue(maxTokens),
                p.GetValue(tokenType) is { } t ? ParseTokenType(t) : null,
                p.GetValue(localCombine),
                p.GetValue(alignment),
                p.GetValue(weighted),
                double.IsFinite(seconds) && seconds > 0 && seconds <= 3600 ? TimeSpan.FromSeconds(seconds) : TimeSpan.Zero);
            return RunAsync(request, p.InvocationConfiguration.Output, p.InvocationConfiguration.Error, new DeterministicExpertCompute(), ct);
        });
        return command;
    }

    /// <summary>Runs the step; every expected failure is one line on <paramref name="error"/> and an exit code, never a stack trace.</summary>
    /// <param name="request">What to run.</param>
    /// <param name="output">The summary.</param>
    /// <param name="error">Error lines.</param>
    /// <param name="experts">The experts between dispatch and combine; the check assumes <see cref="DeterministicExperts"/>.</param>
    /// <param name="cancellationToken">Stops the step.</param>
    internal static async Task<int> RunAsync(StepRequest request, TextWriter output, TextWriter error, IExpertCompute experts, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(request);
        ArgumentNullException.ThrowIfNull(output);
        ArgumentNullException.ThrowIfNull(error);
        ArgumentNullException.ThrowIfNull(experts);
        try
        {
            (StepTrace trace, EpConfig config) = PrepareOrRefuse(request);
            StepRun run = new(request, trace, config, output, error, experts);
            return config.TokenType switch
            {
                TokenType.BFloat16 => await run.ExecuteAsync<BFloat16>(cancellationToken).ConfigureAwait(false),
                TokenType.Float16 => await run.ExecuteAsync<Half>(cancellationToken).ConfigureAwait(false),
                _ => await run.ExecuteAsync<float>(cancellationToken).ConfigureAwait(false),
            };
        }
        catch (StepUsageException e)
        {
            await error.WriteLineAsync($"epa2a step: {e.Message}").ConfigureAwait(false);
            return ExitBadInput;
        }
        catch (InvalidDataException e)
        {
            await error.WriteLineAsync($"epa2a step: bad input file: {e.Message}").ConfigureAwait(false);
            return ExitBadInput;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            await error.WriteLineAsync($"epa2a step: {e.Message}; nothing written").ConfigureAwait(false);
            return ExitIoFailed;
        }
        catch (UsageException e)
        {
            await error.WriteLineAsync($"epa2a step: {e.Message}").ConfigureAwait(false);
            return ExitBadInput;
        }
        catch (OutOfMemoryException)
        {
            await error.WriteLineAsync("epa2a step: out of memory: the file asks for more than this machine holds; nothing written").ConfigureAwait(false);
            return ExitBadInput;
        }
        catch (EpStepFailedException e)
        {
            await error.WriteLineAsync($"epa2a step: the step failed: {RemoteFailure.Clean(e.Message)}").ConfigureAwait(false);
            return ExitStepFailed;
        }
        catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested)
        {
            await error.WriteLineAsync("epa2a step: cancelled").ConfigureAwait(false);
            return ExitStepFailed;
        }
    }

    private static TokenType ParseTokenType(string text) => TokenTypeInfo.TryParse(text, out TokenType type)
        ? type
        : throw new StepUsageException($"--token-type {text} is not bf16, fp16 or fp32");

    private static string TokenTypeName(TokenType type) => TokenTypeInfo.Name(type);

    /// <summary>Ranks a replay runs in this process, at most: each is a layer with its own buffers and mailboxes.</summary>
    internal const int MaxWorldSize = 256;

    /// <summary>What a replay may allocate: half of what the GC says this process can have.</summary>
    private static long AllocationBudget() => Math.Max(1L << 30, GC.GetGCMemoryInfo().TotalAvailableMemoryBytes / 2);

    /// <summary>Outputs must never land on the input: DIR/dispatch.safetensors or DIR/combine.safetensors may not be it.</summary>
    private static void RefuseOutputOverInput(string input, string outputDirectory)
    {
        string inputPath = Path.GetFullPath(input);
        string resolved = File.ResolveLinkTarget(inputPath, returnFinalTarget: true)?.FullName ?? inputPath;
        foreach (string name in (string[])[DispatchFileName, CombineFileName])
        {
            string target = Path.GetFullPath(Path.Combine(outputDirectory, name));
            if (string.Equals(target, inputPath, StringComparison.Ordinal) || string.Equals(target, resolved, StringComparison.Ordinal))
            {
                throw new StepUsageException($"--out {outputDirectory} would overwrite --input {input} with {name}: choose another --out");
            }
        }
    }

    /// <summary>Whatever the file or the options make the preparation throw is bad input: one line, exit code 2.</summary>
    private static (StepTrace Trace, EpConfig Config) PrepareOrRefuse(StepRequest request)
    {
        try
        {
            return Prepare(request);
        }
        catch (Exception e) when (e is ArgumentException or OverflowException or FormatException or System.Text.Json.JsonException)
        {
            throw new StepUsageException($"bad input: {e.Message.ReplaceLineEndings(" ")}", e);
        }
    }

    /// <summary>Reads and checks the file, and settles the configuration; every failure names the option or the tensor.</summary>
    private static (StepTrace Trace, EpConfig Config) Prepare(StepRequest request)
    {
        if (string.IsNullOrEmpty(request.Input))
        {
            throw new StepUsageException("--input FILE.safetensors is required");
        }

        if (string.IsNullOrEmpty(request.OutputDirectory))
        {
            throw new StepUsageException("--out DIR is required");
        }

        if (request.Timeout is { } timeout && (timeout <= TimeSpan.Zero || timeout > TimeSpan.FromHours(1)))
        {
            throw new StepUsageException("--timeout-seconds must be in (0, 3600]");
        }

        if (!File.Exists(request.Input))
        {
            throw new StepUsageException($"--input {request.Input}: no such file");
        }

        // A FIFO, a pipe (--input <(...)) or a device would block in open or cannot be read twice: refused before
        // opening. Their reported length is 0, which no safetensors file has.
        FileInfo file = new(request.Input);
        if (file.Length < 8)
        {
            throw new StepUsageException($"--input {request.Input} is {(file.Length == 0 ? "empty or not a regular file (a pipe, FIFO or device?)" : $"{file.Length} bytes")}: a safetensors file is a regular file of at least 8 bytes");
        }

        long budget = AllocationBudget();
        if (file.Length > budget / 4)
        {
            throw new StepUsageException($"--input {request.Input} is {file.Length} bytes; a replay holds the file and about three times its size in outputs, so at most {budget / 4} bytes fit the {budget} bytes this process may allocate");
        }

        RefuseOutputOverInput(request.Input, request.OutputDirectory);
        StepTrace trace = StepTrace.From(SafetensorsReader.Read(request.Input), request.Input);
        int world = trace.WorldSize;
        if (world > MaxWorldSize)
        {
            throw new StepUsageException($"{request.Input} has {world} ranks; a replay runs every rank in this process, at most {MaxWorldSize}");
        }

        int experts = request.NumExperts ?? trace.NumExperts
            ?? throw new StepUsageException($"the number of experts is unknown: pass --experts, or give {request.Input} the metadata \"{StepTraceNames.NumExpertsKey}\"");
        string expertsFrom = request.NumExperts is null ? $"metadata {StepTraceNames.NumExpertsKey}" : "--experts";
        if (experts < world || experts % world != 0)
        {
            throw new StepUsageException($"{expertsFrom} = {experts} must be a positive multiple of the {world} ranks in {request.Input}");
        }

        if (trace.TopK > experts)
        {
            throw new StepUsageException($"top-k {trace.TopK} (from {StepTraceNames.Of(0, StepTraceNames.ExpertIds)}) exceeds the {experts} experts");
        }

        int local = request.LocalWorldSize ?? world;
        if (local < 1 || world % local != 0)
        {
            throw new StepUsageException($"--local-world-size {local} must divide the {world} ranks in {request.Input}");
        }

        if (request.LocalCombine && local != world)
        {
            throw new StepUsageException($"--local-combine needs a single node, but --local-world-size {local} splits the {world} ranks into {world / local} nodes");
        }

        if (request.Alignment < 1 || (request.Alignment & (request.Alignment - 1)) != 0)
        {
            throw new StepUsageException($"--alignment {request.Alignment} must be a power of two");
        }

        if (request.Weighted && !trace.HasWeights)
        {
            throw new StepUsageException($"--weighted needs routing weights, but {request.Input} has no {StepTraceNames.Of(0, StepTraceNames.Weights)}");
        }

        int largest = trace.Ranks.Max(r => r.Count);
        int maxTokens = request.MaxTokens ?? Math.Max(1, largest);
        if (maxTokens < Math.Max(1, largest))
        {
            throw new StepUsageException($"--max-tokens {maxTokens} is less than the {largest} tokens of the largest rank");
        }

        EpConfig config;
        try
        {
            config = new EpConfig(
                maxTokens,
                trace.Hidden,
                trace.TopK,
                experts,
                rank: 0,
                world,
                local,
                request.TokenType ?? trace.TokenType,
                enableLocalCombine: request.LocalCombine,
                expertAlignment: request.Alignment);
        }
        catch (ArgumentException e)
        {
            throw new StepUsageException($"the step's configuration is invalid: {e.Message}", e);
        }

        trace.Validate(config);

        // Outputs: every slot's row (dispatch, expert output) plus each token's combined row, and the rows' padding.
        long tokens = trace.Ranks.Sum(r => (long)r.Count);
        long rows = (tokens * config.TopK) + ((long)world * config.ExpertsPerRank * (config.ExpertAlignment - 1));
        long need = ((2 * rows) + tokens) * config.Hidden * config.TokenBytes * 2;
        if (need > budget)
        {
            throw new StepUsageException($"the step needs about {need} bytes ({tokens} tokens x top-{config.TopK} x Hidden {config.Hidden} over {world} ranks); this process may allocate {budget}");
        }

        return (trace, config);
    }

    /// <summary>One run of the command once the inputs are known to be good.</summary>
    private sealed class StepRun(StepRequest request, StepTrace trace, EpConfig config, TextWriter output, TextWriter error, IExpertCompute experts)
    {
        private int World => config.WorldSize;

        public async Task<int> ExecuteAsync<T>(CancellationToken cancellationToken)
            where T : unmanaged
        {
            RankInput<T>[] inputs = trace.ToInputs<T>();
            Outcome<T> outcome = await RunLayerAsync(inputs, cancellationToken).ConfigureAwait(false);

            string directory = request.OutputDirectory!;
            string dispatchPath = Path.Combine(directory, DispatchFileName);
            string combinePath = Path.Combine(directory, CombineFileName);
            WriteBoth((dispatchPath, DispatchFile(outcome)), (combinePath, CombineFile(outcome)));

            List<string> problems = [];
            float worst = Check(inputs, outcome, problems);
            await WriteSummaryAsync(outcome, dispatchPath, combinePath).ConfigureAwait(false);
            if (problems.Count == 0)
            {
                await output.WriteLineAsync(
                    $"reference: dispatch output, weights and layout equal bit for bit; combine within {TokenTypeName(config.TokenType)} rounding (largest difference {worst.ToString("G3", CultureInfo.InvariantCulture)})")
                    .ConfigureAwait(false);
                return ExitSuccess;
            }

            await output.WriteLineAsync($"reference: MISMATCH ({problems.Count}{(problems.Count >= MaxReportedMismatches ? " or more" : string.Empty)} differences)").ConfigureAwait(false);
            foreach (string problem in problems)
            {
                await error.WriteLineAsync($"epa2a step: differs from the reference: {problem}").ConfigureAwait(false);
            }

            return ExitMismatch;
        }

        /// <summary>
        /// Both files appear whole or not at all: each is written as NAME.partial, and only when both are complete are
        /// they renamed over the old ones. A failure (a full disk) removes the partial files and leaves the directory as
        /// it was; it is an <see cref="IOException"/> (exit code 4).
        /// </summary>
        private static void WriteBoth(params (string Path, SafetensorsFile File)[] files)
        {
            Directory.CreateDirectory(Path.GetDirectoryName(Path.GetFullPath(files[0].Path))!);
            try
            {
                foreach ((string path, SafetensorsFile file) in files)
                {
                    SafetensorsWriter.Write(path + PartialSuffix, file);
                }

                foreach ((string path, _) in files)
                {
                    File.Move(path + PartialSuffix, path, overwrite: true);
                }
            }
            finally
            {
                foreach ((string path, _) in files)
                {
                    File.Delete(path + PartialSuffix);
                }
            }
        }

        private async Task<Outcome<T>> RunLayerAsync<T>(RankInput<T>[] inputs, CancellationToken cancellationToken)
            where T : unmanaged
        {
            EpLayerOptions options = new() { StepTimeout = request.Timeout ?? EpLayerOptions.Default.StepTimeout };
            using InProcessGroup group = new(config, options);
            int hidden = config.Hidden;
            int topK = config.TopK;
            DispatchResult<T>[] dispatched = await group.RunAsync((layer, r) => layer.DispatchAsync(
                Tensor.Create(inputs[r].Tokens, [inputs[r].Count, hidden]),
                Tensor.Create(inputs[r].ExpertIds, [inputs[r].Count, topK]),
                inputs[r].Weights is { } w ? Tensor.Create(w, [inputs[r].Count, topK]) : null,
                inputs[r].ScatterIndices is { } s ? Tensor.Create(s, [inputs[r].Count, topK]) : null,
                cancellationToken)).ConfigureAwait(false);

            // Dispatch outputs are views of the layers' buffers: copy them before anything else runs.
            RankDispatch<T>[] perRank = [.. dispatched.Select(d => new RankDispatch<T>(
                Flat(d.Output),
                d.Weights is null ? null : Flat(d.Weights),
                d.Layout.RecvRows,
                d.Layout.RowsPerLocalExpert.ToArray(),
                d.Layout.PaddedRowsPerLocalExpert.ToArray(),
                d.Layout.ExpertRowStarts.ToArray(),
                d.Layout.ScatterIndices.ToArray(),
                d.Layout.TokensPerSourceRank.ToArray()))];

            Tensor<T>[] expertOutputs = await group.RunAsync((layer, r) =>
                experts.ComputeAsync(LayerName, layer.Config, dispatched[r], cancellationToken)).ConfigureAwait(false);
            CombineOptions combine = new(request.Weighted);
            Tensor<T>[] combined = await group.RunAsync((layer, r) =>
                layer.CombineAsync(expertOutputs[r], dispatched[r].Layout, combine, cancellationToken)).ConfigureAwait(false);
            return new Outcome<T>(perRank, [.. expertOutputs.Select(Flat)], [.. combined.Select(Flat)]);
        }

        private SafetensorsFile DispatchFile<T>(Outcome<T> outcome)
            where T : unmanaged
        {
            List<SafetensorsTensor> tensors = [];
            for (int r = 0; r < World; r++)
            {
                RankDispatch<T> d = outcome.Dispatch[r];
                int n = trace.Ranks[r].Count;
                tensors.Add(SafetensorsTensor.FromValues<T>(StepTraceNames.Of(r, StepTraceNames.Output), [d.Rows, config.Hidden], d.Output));
                if (d.Weights is not null)
                {
                    tensors.Add(SafetensorsTensor.FromValues<float>(StepTraceNames.Of(r, StepTraceNames.Weights), [d.Rows], d.Weights));
                }

                tensors.Add(Vector(r, StepTraceNames.RowsPerLocalExpert, d.RowsPerLocalExpert));
                tensors.Add(Vector(r, StepTraceNames.PaddedRowsPerLocalExpert, d.PaddedRowsPerLocalExpert));
                tensors.Add(Vector(r, StepTraceNames.ExpertRowStarts, d.ExpertRowStarts));
                tensors.Add(SafetensorsTensor.FromValues<int>(StepTraceNames.Of(r, StepTraceNames.ScatterIndices), [n, config.TopK], d.ScatterIndices));
                tensors.Add(Vector(r, StepTraceNames.TokensPerSourceRank, d.TokensPerSourceRank));
            }

            return new SafetensorsFile(tensors, Metadata());
        }

        private SafetensorsFile CombineFile<T>(Outcome<T> outcome)
            where T : unmanaged
        {
            List<SafetensorsTensor> tensors = [];
            for (int r = 0; r < World; r++)
            {
                tensors.Add(SafetensorsTensor.FromValues<T>(StepTraceNames.Of(r, StepTraceNames.Combined), [trace.Ranks[r].Count, config.Hidden], outcome.Combined[r]));
                tensors.Add(SafetensorsTensor.FromValues<T>(StepTraceNames.Of(r, StepTraceNames.ExpertOutput), [outcome.Dispatch[r].Rows, config.Hidden], outcome.ExpertOutputs[r]));
            }

            Dictionary<string, string> metadata = Metadata();
            metadata["weighted"] = Bool(request.Weighted);
            return new SafetensorsFile(tensors, metadata);
        }

        private Dictionary<string, string> Metadata() => new(StringComparer.Ordinal)
        {
            ["producer"] = "epa2a step",
            ["input"] = Path.GetFileName(trace.Source),
            [StepTraceNames.NumExpertsKey] = Number(config.NumExperts),
            ["world_size"] = Number(config.WorldSize),
            ["local_world_size"] = Number(config.LocalWorldSize),
            ["hidden"] = Number(config.Hidden),
            ["topk"] = Number(config.TopK),
            ["max_tokens"] = Number(config.MaxTokens),
            ["token_type"] = TokenTypeName(config.TokenType),
            ["expert_alignment"] = Number(config.ExpertAlignment),
            ["local_combine"] = Bool(config.EnableLocalCombine),
        };

        /// <summary>Compares with the reference; returns the largest combine difference and fills the problems found (a few at most).</summary>
        private float Check<T>(RankInput<T>[] inputs, Outcome<T> outcome, List<string> problems)
            where T : unmanaged
        {
            ReferenceStep<T> expected = ReferenceAllToAll.Dispatch(config, inputs);
            T[][] expectedExpertOutputs = new T[World][];
            for (int r = 0; r < World; r++)
            {
                ReferenceDispatch<T> e = expected.PerRank[r];
                RankDispatch<T> got = outcome.Dispatch[r];
                string rank = $"rank {r}";
                if (got.Rows != e.Rows)
                {
                    problems.Add($"{rank} received {got.Rows} rows, the reference {e.Rows}");
                }
                else
                {
                    CompareExact(problems, $"{rank} dispatch output", e.Output, got.Output);
                }

                if ((e.Weights is null) != (got.Weights is null))
                {
                    problems.Add($"{rank} dispatch weights are {(got.Weights is null ? "missing" : "present")}, the reference's {(e.Weights is null ? "missing" : "present")}");
                }
                else if (e.Weights is not null)
                {
                    CompareExact(problems, $"{rank} dispatch weights", e.Weights, got.Weights!);
                }

                CompareExact(problems, $"{rank} {StepTraceNames.RowsPerLocalExpert}", e.RowsPerLocalExpert, got.RowsPerLocalExpert);
                CompareExact(problems, $"{rank} {StepTraceNames.PaddedRowsPerLocalExpert}", e.PaddedRowsPerLocalExpert, got.PaddedRowsPerLocalExpert);
                CompareExact(problems, $"{rank} {StepTraceNames.ExpertRowStarts}", e.ExpertRowStarts, got.ExpertRowStarts);
                CompareExact(problems, $"{rank} {StepTraceNames.ScatterIndices}", expected.GlobalScatterIndices[r], got.ScatterIndices);
                CompareExact(problems, $"{rank} {StepTraceNames.TokensPerSourceRank}", expected.TokensPerSourceRank, got.TokensPerSourceRank);
                expectedExpertOutputs[r] = DeterministicExperts.ApplyToBlocks<T>(
                    e.Output, config.Hidden, r * config.ExpertsPerRank, e.ExpertRowStarts, e.RowsPerLocalExpert);
            }

            if (problems.Count > 0)
            {
                return float.NaN;
            }

            T[][] want = ReferenceAllToAll.Combine(config, inputs, expected, expectedExpertOutputs, request.Weighted);
            float worst = 0;
            for (int r = 0; r < World && problems.Count < MaxReportedMismatches; r++)
            {
                for (int i = 0; i < want[r].Length && problems.Count < MaxReportedMismatches; i++)
                {
                    float w = TokenConvert.ToSingle(want[r][i]);
                    float g = TokenConvert.ToSingle(outcome.Combined[r][i]);

                    // NaN and infinities compare by identity: a NaN where the reference has a NaN, or the same
                    // infinity, is equal; anything else against a non-finite value differs.
                    if (!float.IsFinite(w) || !float.IsFinite(g))
                    {
                        if (!(float.IsNaN(w) && float.IsNaN(g)) && w != g)
                        {
                            problems.Add(string.Create(CultureInfo.InvariantCulture, $"rank {r} combined[{i / config.Hidden}, {i % config.Hidden}] = {g}, the reference {w}"));
                        }

                        continue;
                    }

                    float difference = Math.Abs(w - g);
                    if (!(difference <= CombineTolerance(w)))
                    {
                        problems.Add(string.Create(
                            CultureInfo.InvariantCulture,
                            $"rank {r} combined[{i / config.Hidden}, {i % config.Hidden}] = {g}, the reference {w} (tolerance {CombineTolerance(w):G3})"));
                    }

                    worst = Math.Max(worst, difference);
                }
            }

            return worst;
        }

        /// <summary>
        /// fp32 sums taken in another order differ by a few fp32 ulps of the terms; one final rounding to the token
        /// type may then land on the neighbouring value.
        /// </summary>
        private float CombineTolerance(float want)
        {
            float magnitude = Math.Max(Math.Abs(want), 1e-3f);
            float ulp = config.TokenType switch
            {
                TokenType.BFloat16 => magnitude / 128f,
                TokenType.Float16 => magnitude / 1024f,
                _ => magnitude * 2.4e-7f,
            };
            return ulp + (config.TopK * 4 * 4e-7f * Math.Max(1f, Math.Abs(want)));
        }

        private async Task WriteSummaryAsync<T>(Outcome<T> outcome, string dispatchPath, string combinePath)
            where T : unmanaged
        {
            string routing = string.Create(
                CultureInfo.InvariantCulture,
                $"{World} ranks on {config.NumNodes} node{(config.NumNodes == 1 ? string.Empty : "s")}, {config.NumExperts} experts ({config.ExpertsPerRank} per rank), hidden {config.Hidden}, top-k {config.TopK}, {TokenTypeName(config.TokenType)}");
            string options = string.Create(
                CultureInfo.InvariantCulture,
                $"max tokens {config.MaxTokens}, alignment {config.ExpertAlignment}, local combine {(config.EnableLocalCombine ? "on" : "off")}, {(request.Weighted ? "weighted" : "unweighted")} combine{(trace.HasScatterIndices ? ", scatter indices" : string.Empty)}");
            await output.WriteLineAsync($"epa2a step {trace.Source}: {routing}; {options}").ConfigureAwait(false);
            await output.WriteLineAsync("rank  tokens  rows  rows per local expert").ConfigureAwait(false);
            for (int r = 0; r < World; r++)
            {
                RankDispatch<T> d = outcome.Dispatch[r];
                IEnumerable<string> counts = d.RowsPerLocalExpert.Take(8).Select(Number);
                string more = d.RowsPerLocalExpert.Length > 8 ? $" ... ({d.RowsPerLocalExpert.Length} experts)" : string.Empty;
                await output.WriteLineAsync(string.Create(
                    CultureInfo.InvariantCulture,
                    $"{r,4}  {trace.Ranks[r].Count,6}  {d.Rows,4}  {string.Join(' ', counts)}{more}")).ConfigureAwait(false);
            }

            await output.WriteLineAsync($"wrote {dispatchPath} and {combinePath}").ConfigureAwait(false);
        }

        private static SafetensorsTensor Vector(int rank, string field, int[] values) =>
            SafetensorsTensor.FromValues<int>(StepTraceNames.Of(rank, field), [values.Length], values);

        private static void CompareExact<TElement>(List<string> problems, string what, TElement[] expected, TElement[] actual)
            where TElement : unmanaged
        {
            if (problems.Count >= MaxReportedMismatches)
            {
                return;
            }

            if (expected.Length != actual.Length)
            {
                problems.Add($"{what} has {actual.Length} elements, the reference {expected.Length}");
                return;
            }

            // Bitwise: dispatch only moves data, so even NaN payloads must survive.
            ReadOnlySpan<byte> e = System.Runtime.InteropServices.MemoryMarshal.AsBytes(expected.AsSpan());
            ReadOnlySpan<byte> a = System.Runtime.InteropServices.MemoryMarshal.AsBytes(actual.AsSpan());
            int index = e.CommonPrefixLength(a);
            if (index < e.Length)
            {
                int element = index / System.Runtime.CompilerServices.Unsafe.SizeOf<TElement>();
                problems.Add($"{what}[{element}] = {actual[element]}, the reference {expected[element]}");
            }
        }

        private static TElement[] Flat<TElement>(Tensor<TElement> tensor)
        {
            TElement[] flat = new TElement[(int)tensor.FlattenedLength];
            tensor.FlattenTo(flat);
            return flat;
        }

        private static string Number(int value) => value.ToString(CultureInfo.InvariantCulture);

        private static string Bool(bool value) => value ? "true" : "false";
    }

    /// <summary>What one rank's dispatch produced, copied out of the layer.</summary>
    private sealed record RankDispatch<T>(
        T[] Output,
        float[]? Weights,
        int Rows,
        int[] RowsPerLocalExpert,
        int[] PaddedRowsPerLocalExpert,
        int[] ExpertRowStarts,
        int[] ScatterIndices,
        int[] TokensPerSourceRank)
        where T : unmanaged;

    /// <summary>Everything the step produced, per rank.</summary>
    private sealed record Outcome<T>(RankDispatch<T>[] Dispatch, T[][] ExpertOutputs, T[][] Combined)
        where T : unmanaged;

    /// <summary>A bad option or combination of options: one line, exit code 2.</summary>
    private sealed class StepUsageException : Exception
    {
        public StepUsageException(string message)
            : base(message)
        {
        }

        public StepUsageException(string message, Exception inner)
            : base(message, inner)
        {
        }

        public StepUsageException()
        {
        }
    }
}

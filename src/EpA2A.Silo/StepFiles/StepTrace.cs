using System.Globalization;
using EpA2A.Config;
using EpA2A.Numerics;
using EpA2A.Reference;
using EpA2A.Safetensors;

namespace EpA2A.Silo.StepFiles;

/// <summary>One rank's inputs as read from a step trace; tokens stay in the file's dtype until <see cref="StepTrace.ToInputs{T}"/>.</summary>
internal sealed record StepTraceRank(int Count, SafetensorsTensor Tokens, int[] ExpertIds, float[]? Weights, int[]? ScatterIndices);

/// <summary>
/// The inputs of one step for every rank, read from a safetensors file laid out as <see cref="StepTraceNames"/>
/// describes: per rank r, "rank{r}.tokens" [n_r, hidden] (BF16, F16 or F32), "rank{r}.expert_ids" [n_r, topk]
/// (I32 or I64), and optionally "rank{r}.weights" [n_r, topk] (F32) and "rank{r}.scatter_indices" [n_r, topk]
/// (I32 or I64). The ranks present are the group (0..W-1, no gaps). A file that breaks a rule is an
/// <see cref="InvalidDataException"/> naming the file, the tensor and the rule.
/// </summary>
internal sealed class StepTrace
{
    private static readonly string[] InputFields = [StepTraceNames.Tokens, StepTraceNames.ExpertIds, StepTraceNames.Weights, StepTraceNames.ScatterIndices];

    private StepTrace(string source, SafetensorsDType tokenDType, int hidden, int topK, int? numExperts, StepTraceRank[] ranks)
    {
        Source = source;
        TokenDType = tokenDType;
        Hidden = hidden;
        TopK = topK;
        NumExperts = numExperts;
        Ranks = ranks;
    }

    /// <summary>The file, as error messages name it.</summary>
    public string Source { get; }

    /// <summary>The dtype of every rank's tokens.</summary>
    public SafetensorsDType TokenDType { get; }

    /// <summary>The token type that <see cref="TokenDType"/> stands for.</summary>
    public TokenType TokenType => TokenDType switch
    {
        SafetensorsDType.BFloat16 => TokenType.BFloat16,
        SafetensorsDType.Float16 => TokenType.Float16,
        _ => TokenType.Float32,
    };

    /// <summary>Elements per token.</summary>
    public int Hidden { get; }

    /// <summary>Experts per token.</summary>
    public int TopK { get; }

    /// <summary>The "num_experts" metadata entry, when the file has one.</summary>
    public int? NumExperts { get; }

    /// <summary>Every rank's inputs, in rank order.</summary>
    public IReadOnlyList<StepTraceRank> Ranks { get; }

    /// <summary>Ranks in the group.</summary>
    public int WorldSize => Ranks.Count;

    /// <summary>True when every rank gave weights (the trace allows all or none).</summary>
    public bool HasWeights => Ranks[0].Weights is not null;

    /// <summary>True when every rank gave scatter indices (the trace allows all or none).</summary>
    public bool HasScatterIndices => Ranks[0].ScatterIndices is not null;

    /// <summary>Reads the inputs from a file's tensors, checking names, dtypes and shapes.</summary>
    /// <exception cref="InvalidDataException">The file is not a well-formed step trace.</exception>
    public static StepTrace From(SafetensorsFile file, string source)
    {
        ArgumentNullException.ThrowIfNull(file);
        ArgumentNullException.ThrowIfNull(source);
        SortedDictionary<int, Dictionary<string, SafetensorsTensor>> byRank = [];
        foreach (SafetensorsTensor tensor in file.Tensors)
        {
            if (!StepTraceNames.TryParse(tensor.Name, out int rank, out string field) || !InputFields.Contains(field))
            {
                throw new InvalidDataException(
                    $"{source}: tensor '{tensor.Name}' is not a step input; expected rank{{r}}.tokens, rank{{r}}.expert_ids and optionally rank{{r}}.weights, rank{{r}}.scatter_indices");
            }

            if (!byRank.TryGetValue(rank, out Dictionary<string, SafetensorsTensor>? fields))
            {
                byRank[rank] = fields = new Dictionary<string, SafetensorsTensor>(StringComparer.Ordinal);
            }

            fields[field] = tensor;
        }

        if (byRank.Count == 0)
        {
            throw new InvalidDataException($"{source}: the file holds no tensors; a step needs rank{{r}}.tokens and rank{{r}}.expert_ids for ranks 0..W-1");
        }

        int expected = 0;
        foreach (int rank in byRank.Keys)
        {
            if (rank != expected)
            {
                throw new InvalidDataException(
                    $"{source}: there are tensors for ranks {string.Join(", ", byRank.Keys)} but none for rank {expected}; ranks must be numbered 0..W-1 without gaps");
            }

            expected++;
        }

        StepTraceRank[] ranks = new StepTraceRank[byRank.Count];
        SafetensorsTensor firstTokens = Required(source, byRank[0], 0, StepTraceNames.Tokens);
        SafetensorsTensor firstIds = Required(source, byRank[0], 0, StepTraceNames.ExpertIds);
        SafetensorsDType tokenDType = firstTokens.DType;
        int hidden = firstTokens.Rank == 2 ? Dimension(source, firstTokens, 1) : 0;
        int topK = firstIds.Rank == 2 ? Dimension(source, firstIds, 1) : 0;
        bool weights = byRank[0].ContainsKey(StepTraceNames.Weights);
        bool scatter = byRank[0].ContainsKey(StepTraceNames.ScatterIndices);
        foreach ((int rank, Dictionary<string, SafetensorsTensor> fields) in byRank)
        {
            ranks[rank] = ReadRank(source, rank, fields, tokenDType, hidden, topK, weights, scatter);
        }

        return new StepTrace(source, tokenDType, hidden, topK, ReadNumExperts(source, file.Metadata), ranks);
    }

    /// <summary>
    /// Checks the values against the group's configuration: expert ids in [0, NumExperts], finite weights,
    /// token counts within MaxTokens, and scatter indices that put every non-dropped slot on its expert's rank,
    /// each row once (dropped slots' indices are ignored).
    /// </summary>
    /// <exception cref="InvalidDataException">A value breaks its rule.</exception>
    public void Validate(EpConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        int[] rowsOnRank = new int[config.WorldSize];
        for (int r = 0; r < Ranks.Count; r++)
        {
            StepTraceRank rank = Ranks[r];
            if (rank.Count > config.MaxTokens)
            {
                throw new InvalidDataException($"{Source}: {Name(r, StepTraceNames.Tokens)} has {rank.Count} tokens, more than the maximum of {config.MaxTokens} per rank (--max-tokens)");
            }

            for (int i = 0; i < rank.ExpertIds.Length; i++)
            {
                int id = rank.ExpertIds[i];
                if ((uint)id > (uint)config.NumExperts)
                {
                    throw new InvalidDataException(
                        $"{Source}: {Name(r, StepTraceNames.ExpertIds)}{Index(i)} = {id} is outside [0, {config.NumExperts}] (there are {config.NumExperts} experts; {config.NumExperts} marks a dropped slot)");
                }

                if (id != config.NumExperts)
                {
                    rowsOnRank[config.RankOfExpert(id)]++;
                }
            }

            if (rank.Weights is { } w)
            {
                for (int i = 0; i < w.Length; i++)
                {
                    if (!float.IsFinite(w[i]))
                    {
                        throw new InvalidDataException($"{Source}: {Name(r, StepTraceNames.Weights)}{Index(i)} = {w[i].ToString(CultureInfo.InvariantCulture)} is not finite");
                    }
                }
            }
        }

        if (HasScatterIndices)
        {
            ValidateScatter(config, rowsOnRank);
        }
    }

    /// <summary>Every rank's inputs with tokens as <typeparamref name="T"/> (converted through fp32, rounding to nearest even, when the file's dtype differs).</summary>
    public RankInput<T>[] ToInputs<T>()
        where T : unmanaged
    {
        return [.. Ranks.Select(r => new RankInput<T>(Convert<T>(r.Tokens), r.Count, r.ExpertIds, r.Weights, r.ScatterIndices))];
    }

    private static T[] Convert<T>(SafetensorsTensor tokens)
        where T : unmanaged
    {
        if (SafetensorsDTypes.Matches<T>(tokens.DType))
        {
            return tokens.ToArray<T>();
        }

        float[] wide = tokens.DType switch
        {
            SafetensorsDType.BFloat16 => [.. tokens.ToArray<BFloat16>().Select(v => v.ToSingle())],
            SafetensorsDType.Float16 => [.. tokens.ToArray<Half>().Select(v => (float)v)],
            _ => tokens.ToArray<float>(),
        };
        return [.. wide.Select(TokenConvert.FromSingle<T>)];
    }

    private void ValidateScatter(EpConfig config, int[] rowsOnRank)
    {
        // With scatter indices there is no padding: rank d's rows are [base_d, base_d + rows_d) of the concatenation.
        int[] bases = new int[config.WorldSize + 1];
        for (int d = 0; d < config.WorldSize; d++)
        {
            bases[d + 1] = bases[d] + rowsOnRank[d];
        }

        if (config.ExpertAlignment != 1)
        {
            throw new InvalidDataException($"{Source}: the file has scatter indices, which fix every row's position, so the alignment must be 1 (it is {config.ExpertAlignment})");
        }

        (int Rank, int Slot)?[] owner = new (int, int)?[bases[^1]];
        for (int r = 0; r < Ranks.Count; r++)
        {
            StepTraceRank rank = Ranks[r];
            for (int i = 0; i < rank.ExpertIds.Length; i++)
            {
                int id = rank.ExpertIds[i];
                if (id == config.NumExperts)
                {
                    continue;
                }

                int d = config.RankOfExpert(id);
                int row = rank.ScatterIndices![i];
                if (row < bases[d] || row >= bases[d + 1])
                {
                    throw new InvalidDataException(
                        $"{Source}: {Name(r, StepTraceNames.ScatterIndices)}{Index(i)} = {row}, but expert {id} lives on rank {d}, whose rows are [{bases[d]}, {bases[d + 1]})");
                }

                if (owner[row] is { } first)
                {
                    throw new InvalidDataException(
                        $"{Source}: {Name(r, StepTraceNames.ScatterIndices)}{Index(i)} = {row} is also {Name(first.Rank, StepTraceNames.ScatterIndices)}{Index(first.Slot)}; each row takes one slot");
                }

                owner[row] = (r, i);
            }
        }
    }

    private static StepTraceRank ReadRank(
        string source, int rank, Dictionary<string, SafetensorsTensor> fields, SafetensorsDType tokenDType, int hidden, int topK, bool weights, bool scatter)
    {
        SafetensorsTensor tokens = Required(source, fields, rank, StepTraceNames.Tokens);
        if (tokens.DType is not (SafetensorsDType.BFloat16 or SafetensorsDType.Float16 or SafetensorsDType.Float32))
        {
            throw new InvalidDataException($"{source}: {tokens.Name} is {SafetensorsDTypes.NameOf(tokens.DType)}; tokens must be BF16, F16 or F32");
        }

        if (tokens.DType != tokenDType)
        {
            throw new InvalidDataException(
                $"{source}: {tokens.Name} is {SafetensorsDTypes.NameOf(tokens.DType)} but {Name(0, StepTraceNames.Tokens)} is {SafetensorsDTypes.NameOf(tokenDType)}; every rank's tokens must have one dtype");
        }

        if (tokens.Rank != 2 || hidden < 1 || tokens.Shape[1] != hidden)
        {
            throw new InvalidDataException(
                $"{source}: {tokens.Name} has shape {tokens.ShapeText}; expected [n, hidden] with hidden >= 1 and the same on every rank{(hidden >= 1 ? $" (rank 0 has hidden {hidden})" : string.Empty)}");
        }

        int count = Dimension(source, tokens, 0);
        int[] ids = Indices(source, Required(source, fields, rank, StepTraceNames.ExpertIds), count, topK, rank);
        float[]? w = null;
        if (Optional(source, fields, rank, StepTraceNames.Weights, weights) is { } weightTensor)
        {
            CheckShape(source, weightTensor, count, topK, rank);
            if (weightTensor.DType != SafetensorsDType.Float32)
            {
                throw new InvalidDataException($"{source}: {weightTensor.Name} is {SafetensorsDTypes.NameOf(weightTensor.DType)}; weights must be F32");
            }

            w = weightTensor.ToArray<float>();
        }

        int[]? si = Optional(source, fields, rank, StepTraceNames.ScatterIndices, scatter) is { } scatterTensor
            ? Indices(source, scatterTensor, count, topK, rank)
            : null;
        return new StepTraceRank(count, tokens, ids, w, si);
    }

    private static int[] Indices(string source, SafetensorsTensor tensor, int count, int topK, int rank)
    {
        CheckShape(source, tensor, count, topK, rank);
        switch (tensor.DType)
        {
            case SafetensorsDType.Int32:
                return tensor.ToArray<int>();
            case SafetensorsDType.Int64:
                long[] wide = tensor.ToArray<long>();
                int[] narrow = new int[wide.Length];
                for (int i = 0; i < wide.Length; i++)
                {
                    if (wide[i] is < int.MinValue or > int.MaxValue)
                    {
                        throw new InvalidDataException($"{source}: {tensor.Name}[{i / topK}, {i % topK}] = {wide[i]} does not fit in 32 bits");
                    }

                    narrow[i] = (int)wide[i];
                }

                return narrow;
            default:
                throw new InvalidDataException($"{source}: {tensor.Name} is {SafetensorsDTypes.NameOf(tensor.DType)}; it must be I32 or I64");
        }
    }

    private static void CheckShape(string source, SafetensorsTensor tensor, int count, int topK, int rank)
    {
        if (tensor.Rank != 2 || tensor.Shape[0] != count || tensor.Shape[1] != topK || topK < 1)
        {
            throw new InvalidDataException(
                $"{source}: {tensor.Name} has shape {tensor.ShapeText}; expected [n, topk] = [{count}, {(topK >= 1 ? topK.ToString(CultureInfo.InvariantCulture) : "topk >= 1")}] (n from {Name(rank, StepTraceNames.Tokens)}, topk from {Name(0, StepTraceNames.ExpertIds)})");
        }
    }

    private static SafetensorsTensor Required(string source, Dictionary<string, SafetensorsTensor> fields, int rank, string field) =>
        fields.TryGetValue(field, out SafetensorsTensor? tensor)
            ? tensor
            : throw new InvalidDataException($"{source}: rank {rank} has no {Name(rank, field)}; every rank needs tokens and expert_ids");

    private static SafetensorsTensor? Optional(string source, Dictionary<string, SafetensorsTensor> fields, int rank, string field, bool onRankZero)
    {
        bool present = fields.TryGetValue(field, out SafetensorsTensor? tensor);
        if (present != onRankZero)
        {
            throw new InvalidDataException(
                $"{source}: {Name(rank, field)} is {(present ? "present" : "missing")} but {Name(0, field)} is {(onRankZero ? "present" : "missing")}; every rank gives {field} or none does");
        }

        return tensor;
    }

    private static int Dimension(string source, SafetensorsTensor tensor, int axis)
    {
        long value = tensor.Shape[axis];
        return value <= int.MaxValue
            ? (int)value
            : throw new InvalidDataException($"{source}: {tensor.Name} has shape {tensor.ShapeText}; dimension {axis} exceeds {int.MaxValue}");
    }

    private static int? ReadNumExperts(string source, IReadOnlyDictionary<string, string> metadata)
    {
        if (!metadata.TryGetValue(StepTraceNames.NumExpertsKey, out string? text))
        {
            return null;
        }

        return int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out int value) && value >= 1
            ? value
            : throw new InvalidDataException($"{source}: metadata {StepTraceNames.NumExpertsKey} = \"{text}\" is not a positive integer");
    }

    private static string Name(int rank, string field) => StepTraceNames.Of(rank, field);

    private string Index(int slot) => string.Create(CultureInfo.InvariantCulture, $"[{slot / TopK}, {slot % TopK}]");
}

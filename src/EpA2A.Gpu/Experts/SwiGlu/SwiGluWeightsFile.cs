using System.Globalization;
using EpA2A.Numerics;
using EpA2A.Safetensors;

namespace EpA2A.Experts.SwiGlu;

/// <summary>
/// The safetensors layout of one rank's SwiGLU experts (`epa2a weights` writes a directory of them, one file per
/// rank, named <see cref="FileName"/>). Tensors, bf16, per global expert e of the rank's range:
/// <c>experts.{e}.gate_proj.weight</c> [ffn, hidden], <c>experts.{e}.up_proj.weight</c> [ffn, hidden],
/// <c>experts.{e}.down_proj.weight</c> [hidden, ffn] (the Hugging Face names of a Mixtral/DeepSeek expert). Metadata:
/// <c>epa2a.format</c> = <see cref="Format"/>, <c>hidden</c>, <c>ffn</c>, <c>num_experts</c>, <c>world_size</c>,
/// <c>rank</c>, <c>first_expert</c>, <c>local_experts</c>, and the <c>seed</c> of random weights.
/// </summary>
public static class SwiGluWeightsFile
{
    /// <summary>The value of the <c>epa2a.format</c> metadata key.</summary>
    public const string Format = "swiglu-experts/1";

    /// <summary>The most bytes of weights one rank's file may hold (what a loader allocates is bounded by it).</summary>
    public const long MaxBytesPerRank = 2L * 1024 * 1024 * 1024;

    /// <summary>The file of rank <paramref name="rank"/> in a weights directory.</summary>
    public static string FileName(int rank) => string.Create(CultureInfo.InvariantCulture, $"experts-rank{rank}.safetensors");

    /// <summary>The name of a projection's tensor: <c>experts.{expert}.{projection}.weight</c>.</summary>
    public static string TensorName(int expert, string projection) => string.Create(CultureInfo.InvariantCulture, $"experts.{expert}.{projection}.weight");

    /// <summary>The three projections, in the order a file lists them per expert.</summary>
    public static IReadOnlyList<string> Projections { get; } = ["gate_proj", "up_proj", "down_proj"];

    /// <summary>Bytes of weights a rank with <paramref name="localExperts"/> experts holds.</summary>
    public static long BytesPerRank(int hidden, int ffn, int localExperts) => 3L * hidden * ffn * localExperts * 2;

    /// <summary>
    /// Writes random weights (<see cref="SwiGluWeights.Random"/>) for <paramref name="experts"/> experts split evenly
    /// over <paramref name="ranks"/> ranks, one file per rank in <paramref name="directory"/>; returns the paths.
    /// </summary>
    /// <exception cref="ArgumentException">A size is not positive, the experts do not split evenly, or a rank's file would exceed <see cref="MaxBytesPerRank"/>.</exception>
    public static IReadOnlyList<string> WriteRandom(string directory, int hidden, int ffn, int experts, int ranks, int seed)
    {
        ArgumentNullException.ThrowIfNull(directory);
        RequireShape(hidden, ffn, experts, ranks);
        Directory.CreateDirectory(directory);
        int local = experts / ranks;
        List<string> paths = [];
        for (int r = 0; r < ranks; r++)
        {
            SwiGluWeights weights = SwiGluWeights.Random(hidden, ffn, r * local, local, seed);
            string path = Path.Combine(directory, FileName(r));
            SafetensorsWriter.Write(path, ToSafetensors(weights, r, ranks, experts, seed));
            paths.Add(path);
        }

        return paths;
    }

    /// <summary>Checks the sizes of a weights set before anything is allocated.</summary>
    /// <exception cref="ArgumentException">A size is not positive, the experts do not split evenly, or a rank's file would exceed <see cref="MaxBytesPerRank"/>.</exception>
    public static void RequireShape(int hidden, int ffn, int experts, int ranks)
    {
        if (hidden <= 0 || ffn <= 0 || experts <= 0 || ranks <= 0)
        {
            throw new ArgumentException($"hidden {hidden}, ffn {ffn}, experts {experts} and ranks {ranks} must all be positive", nameof(hidden));
        }

        if (experts % ranks != 0)
        {
            throw new ArgumentException($"experts {experts} do not split evenly over {ranks} ranks", nameof(experts));
        }

        long bytes = BytesPerRank(hidden, ffn, experts / ranks);
        if (bytes > MaxBytesPerRank || (long)hidden * ffn > Array.MaxLength)
        {
            throw new ArgumentException($"hidden {hidden} x ffn {ffn} x {experts / ranks} experts a rank is {bytes} bytes of bf16 weights a rank; at most {MaxBytesPerRank} are written or loaded", nameof(hidden));
        }
    }

    /// <summary>The safetensors file of one rank's weights.</summary>
    public static SafetensorsFile ToSafetensors(SwiGluWeights weights, int rank, int worldSize, int numExperts, int? seed = null)
    {
        ArgumentNullException.ThrowIfNull(weights);
        long[] wide = [weights.Ffn, weights.Hidden];
        long[] narrow = [weights.Hidden, weights.Ffn];
        List<SafetensorsTensor> tensors = [];
        for (int j = 0; j < weights.ExpertCount; j++)
        {
            int e = weights.FirstExpert + j;
            tensors.Add(SafetensorsTensor.FromValues(TensorName(e, "gate_proj"), wide, weights.Gate(j)));
            tensors.Add(SafetensorsTensor.FromValues(TensorName(e, "up_proj"), wide, weights.Up(j)));
            tensors.Add(SafetensorsTensor.FromValues(TensorName(e, "down_proj"), narrow, weights.Down(j)));
        }

        Dictionary<string, string> metadata = new(StringComparer.Ordinal)
        {
            ["epa2a.format"] = Format,
            ["hidden"] = Text(weights.Hidden),
            ["ffn"] = Text(weights.Ffn),
            ["num_experts"] = Text(numExperts),
            ["world_size"] = Text(worldSize),
            ["rank"] = Text(rank),
            ["first_expert"] = Text(weights.FirstExpert),
            ["local_experts"] = Text(weights.ExpertCount),
        };
        if (seed is { } s)
        {
            metadata["seed"] = Text(s);
        }

        return new SafetensorsFile(tensors, metadata);
    }

    /// <summary>Reads rank <paramref name="rank"/>'s file of a weights directory, checking that it is that rank's of a <paramref name="worldSize"/>-rank set.</summary>
    /// <exception cref="InvalidDataException">The file is missing a tensor or a metadata key, a shape or dtype is wrong, or it belongs to another rank or set.</exception>
    /// <exception cref="FileNotFoundException">The directory has no file for the rank.</exception>
    public static SwiGluWeights ReadRank(string directory, int rank, int worldSize)
    {
        ArgumentNullException.ThrowIfNull(directory);
        string path = Path.Combine(directory, FileName(rank));
        if (!File.Exists(path))
        {
            throw new FileNotFoundException($"{path}: no SwiGLU weights for rank {rank} (write a set with `epa2a weights --ranks {worldSize} --out {directory}`)", path);
        }

        SafetensorsFile file = SafetensorsReader.Read(path);
        SwiGluWeights weights = FromSafetensors(file, path, out int fileRank, out int fileWorld, out _);
        if (fileRank != rank || fileWorld != worldSize)
        {
            throw new InvalidDataException($"{path}: holds rank {fileRank} of {fileWorld} ranks; this is rank {rank} of {worldSize}");
        }

        return weights;
    }

    /// <summary>Every rank's weights of a directory written for <paramref name="worldSize"/> ranks.</summary>
    public static SwiGluWeights[] ReadAll(string directory, int worldSize) =>
        [.. Enumerable.Range(0, worldSize).Select(r => ReadRank(directory, r, worldSize))];

    /// <summary>Weights from a file's tensors, every name, dtype and shape checked against its metadata.</summary>
    /// <exception cref="InvalidDataException">A metadata key is missing or bad, a tensor is missing, extra, of another dtype or shape; the message names <paramref name="source"/> and the tensor.</exception>
    public static SwiGluWeights FromSafetensors(SafetensorsFile file, string source, out int rank, out int worldSize, out int numExperts)
    {
        ArgumentNullException.ThrowIfNull(file);
        ArgumentNullException.ThrowIfNull(source);
        if (!file.Metadata.TryGetValue("epa2a.format", out string? format) || format != Format)
        {
            throw new InvalidDataException($"{source}: metadata 'epa2a.format' is {(format is null ? "missing" : $"'{format}'")}, expected '{Format}' (not a SwiGLU weights file of `epa2a weights`?)");
        }

        int hidden = Positive(file, source, "hidden");
        int ffn = Positive(file, source, "ffn");
        numExperts = Positive(file, source, "num_experts");
        worldSize = Positive(file, source, "world_size");
        rank = NonNegative(file, source, "rank");
        int first = NonNegative(file, source, "first_expert");
        int local = Positive(file, source, "local_experts");
        if (numExperts % worldSize != 0 || local != numExperts / worldSize || first != rank * local || rank >= worldSize)
        {
            throw new InvalidDataException($"{source}: metadata says rank {rank} of {worldSize} with experts {first}..{first + local - 1} of {numExperts}; rank r of an even split holds experts r x {numExperts / Math.Max(1, worldSize)} onwards");
        }

        if (BytesPerRank(hidden, ffn, local) > MaxBytesPerRank || (long)hidden * ffn > Array.MaxLength)
        {
            throw new InvalidDataException($"{source}: hidden {hidden} x ffn {ffn} x {local} experts is more than the {MaxBytesPerRank} bytes a rank's weights may hold");
        }

        BFloat16[][] gate = new BFloat16[local][];
        BFloat16[][] up = new BFloat16[local][];
        BFloat16[][] down = new BFloat16[local][];
        for (int j = 0; j < local; j++)
        {
            int e = first + j;
            gate[j] = Projection(file, source, TensorName(e, "gate_proj"), ffn, hidden);
            up[j] = Projection(file, source, TensorName(e, "up_proj"), ffn, hidden);
            down[j] = Projection(file, source, TensorName(e, "down_proj"), hidden, ffn);
        }

        // Every expected tensor is there: any more is one of another range or model.
        int expected = 3 * local;
        if (file.Tensors.Count != expected)
        {
            string extra = string.Join(", ", file.Tensors.Select(t => t.Name).Where(n => !IsExpected(n, first, local)).Take(3));
            throw new InvalidDataException($"{source}: {file.Tensors.Count} tensors, expected {expected} (gate, up and down of experts {first}..{first + local - 1}){(extra.Length > 0 ? $"; unexpected: {extra}" : string.Empty)}");
        }

        return new SwiGluWeights(hidden, ffn, first, gate, up, down);
    }

    private static bool IsExpected(string name, int first, int local)
    {
        for (int e = first; e < first + local; e++)
        {
            foreach (string p in Projections)
            {
                if (name == TensorName(e, p))
                {
                    return true;
                }
            }
        }

        return false;
    }

    private static BFloat16[] Projection(SafetensorsFile file, string source, string name, int rows, int columns)
    {
        if (!file.TryGet(name, out SafetensorsTensor? tensor))
        {
            throw new InvalidDataException($"{source}: no tensor '{name}'");
        }

        if (tensor.DType != SafetensorsDType.BFloat16)
        {
            throw new InvalidDataException($"{source}: tensor '{name}' is {SafetensorsDTypes.NameOf(tensor.DType)}, expected BF16");
        }

        if (tensor.Rank != 2 || tensor.Shape[0] != rows || tensor.Shape[1] != columns)
        {
            throw new InvalidDataException($"{source}: tensor '{name}' has shape {tensor.ShapeText}, expected [{rows}, {columns}]");
        }

        return tensor.ToArray<BFloat16>();
    }

    private static int Positive(SafetensorsFile file, string source, string key)
    {
        int value = NonNegative(file, source, key);
        return value > 0 ? value : throw new InvalidDataException($"{source}: metadata '{key}' is {value}; it must be positive");
    }

    private static int NonNegative(SafetensorsFile file, string source, string key)
    {
        if (!file.Metadata.TryGetValue(key, out string? text))
        {
            throw new InvalidDataException($"{source}: metadata '{key}' is missing");
        }

        return int.TryParse(text, NumberStyles.None, CultureInfo.InvariantCulture, out int value)
            ? value
            : throw new InvalidDataException($"{source}: metadata '{key}' is '{text}', not a non-negative integer");
    }

    private static string Text(int value) => value.ToString(CultureInfo.InvariantCulture);
}

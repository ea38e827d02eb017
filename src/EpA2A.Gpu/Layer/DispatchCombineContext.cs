using EpA2A.Config;
using EpA2A.Numerics;

namespace EpA2A.Layer;

/// <summary>
/// The buffers one rank's layer owns (on the CUDA backend: symmetric NVSHMEM buffers). The dispatch output
/// grows when a step receives more rows than it holds; growth is collective: every rank derives the same
/// maximum from the same count table, so all grow together to the same size.
/// </summary>
public sealed class DispatchCombineContext
{
    /// <summary>Growth rounds the row count up to a multiple of this before applying the capacity factor.</summary>
    public const int GrowthGranularity = OutputGrowthPolicy.Granularity;

    private byte[] hostStaging = [];
    private float[] combineSums = [];

    private DispatchCombineContext(EpConfig config, int capacity)
    {
        Config = config;
        Growth = new OutputGrowthPolicy(capacity, config.MaxOutputRows);
        Allocate(config.MaxTokens * capacity);
    }

    /// <summary>The configuration the buffers are shaped for.</summary>
    public EpConfig Config { get; }

    /// <summary>Multiplier applied when growing (the original's `capacity`).</summary>
    public int CapacityFactor => Growth.CapacityFactor;

    /// <summary>The growth rule of this layer's outputs, host and device alike.</summary>
    internal OutputGrowthPolicy Growth { get; }

    /// <summary>Rows the dispatch output can hold.</summary>
    public int OutputRows { get; private set; }

    /// <summary>Times the output buffers grew.</summary>
    public int Reallocations { get; private set; }

    /// <summary>The dispatch output, [OutputRows, Hidden] of the token type (BFloat16[], Half[] or float[]).</summary>
    internal Array OutputBuffer { get; private set; } = Array.Empty<byte>();

    /// <summary>One weight per output row.</summary>
    internal float[] WeightBuffer { get; private set; } = [];

    /// <summary>Creates the buffers for <paramref name="config"/>; the output starts at MaxTokens*capacity rows.</summary>
    public static DispatchCombineContext Create(EpConfig config, int capacity = 2)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, 1);
        return new DispatchCombineContext(config, capacity);
    }

    /// <summary>
    /// Grows the output buffers to hold <paramref name="rows"/> rows (as <see cref="OutputGrowthPolicy"/> sizes them:
    /// rounded up to 1024, times the capacity factor). Call it with the same value on every rank. Returns true when it grew.
    /// </summary>
    public bool ReallocateDispatchOutput(int rows)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(rows);
        if (!OutputGrowthPolicy.MustGrow(OutputRows, rows))
        {
            return false;
        }

        Allocate(Growth.RowsFor(rows));
        Reallocations++;
        return true;
    }

    internal T[] Output<T>() => (T[])OutputBuffer;

    /// <summary>
    /// The host path's copy of a Tensor argument (a dispatch's tokens, a combine's expert outputs), at least
    /// <paramref name="bytes"/> long: reused by every operation of this layer, since a layer runs one operation at a time
    /// and no backend reads it once the operation has returned. Not zeroed: the layer writes the bytes it uses.
    /// </summary>
    internal byte[] HostStaging(int bytes)
    {
        if (hostStaging.Length < bytes)
        {
            // Pinned: it lives as long as the layer, and there the collector never copies it (a gen0 array of a few MiB was
            // copied into gen1 and then gen2 by the collections of the first steps).
            hostStaging = GC.AllocateUninitializedArray<byte>(bytes, pinned: true);
        }

        return hostStaging;
    }

    /// <summary>The host combine's fp32 sums, at least <paramref name="elements"/> long, reused as <see cref="HostStaging"/> is; not zeroed.</summary>
    internal float[] CombineSums(int elements)
    {
        if (combineSums.Length < elements)
        {
            combineSums = GC.AllocateUninitializedArray<float>(elements, pinned: true); // as the staging buffer
        }

        return combineSums;
    }

    private void Allocate(int rows)
    {
        long elements = (long)rows * Config.Hidden;
        if (rows > Config.MaxOutputRows || elements > Array.MaxLength)
        {
            throw new InvalidOperationException($"dispatch output of {rows} rows x Hidden = {Config.Hidden} {Config.TokenType} exceeds the {EpConfig.MaxOutputBytes} bytes a rank's output may hold");
        }

        OutputBuffer = Config.TokenType switch
        {
            TokenType.BFloat16 => new BFloat16[elements],
            TokenType.Float16 => new Half[elements],
            _ => new float[elements],
        };
        WeightBuffer = new float[rows];
        OutputRows = rows;
    }
}

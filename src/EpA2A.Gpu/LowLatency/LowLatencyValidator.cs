using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Layer;
using EpA2A.Numerics;

namespace EpA2A.LowLatency;

/// <summary>
/// The low-latency layer's checks, made before anything is sent or launched. A failure is an
/// <see cref="ArgumentException"/> naming the argument and the rule; the layer is left as it was.
/// </summary>
internal static class LowLatencyValidator
{
    public static void Create(EpConfig config, EpLowLatencyOptions options)
    {
        LowLatencyConfigRules.Check(config);
        if (options.StepTimeout <= TimeSpan.Zero || options.StepTimeout > TimeSpan.FromHours(1))
        {
            throw new ArgumentException($"EpLowLatencyOptions.StepTimeout = {options.StepTimeout} must be in (0, 1 h]", nameof(options));
        }

        if (options.NumSms is < 1)
        {
            throw new ArgumentException($"EpLowLatencyOptions.NumSms = {options.NumSms} must be at least 1 (or null for EpConfig.NumSms)", nameof(options));
        }
    }

    public static void Format(EpConfig config, LowLatencyDispatchOptions options) => LowLatencyConfigRules.CheckFormat(config, options);

    /// <summary>Checks the host inputs and returns them flat (a copy the backend may keep).</summary>
    public static HostDispatchInput Dispatch(EpConfig c, Tensor<BFloat16> x, Tensor<int> expertIds, Tensor<float>? weights, LowLatencyDispatchOptions options)
    {
        ArgumentNullException.ThrowIfNull(x);
        ArgumentNullException.ThrowIfNull(expertIds);
        ArgumentNullException.ThrowIfNull(options);
        Format(c, options);
        InputValidator.Shape(x, nameof(x), -1, c.Hidden, "[n, Hidden]");
        long n = x.Lengths[0];
        if (n > c.MaxTokens)
        {
            throw new ArgumentException($"x has {n} tokens, more than EpConfig.MaxTokens = {c.MaxTokens} (the low-latency capacity is fixed at creation)", nameof(x));
        }

        InputValidator.Shape(expertIds, nameof(expertIds), n, c.TopK, "[n, TopK]");
        int[] ids = new int[(int)expertIds.FlattenedLength];
        expertIds.FlattenTo(ids);
        InputValidator.ExpertIds(c, ids, nameof(expertIds));
        ExpertCapacity(c, ids);
        float[]? w = null;
        if (weights is not null)
        {
            InputValidator.Shape(weights, nameof(weights), n, c.TopK, "[n, TopK]");
            w = new float[(int)weights.FlattenedLength];
            weights.FlattenTo(w);
            InputValidator.FiniteWeights(c, w, nameof(weights));
        }

        BFloat16[] tokens = new BFloat16[(int)x.FlattenedLength];
        x.FlattenTo(tokens);
        return new HostDispatchInput(tokens, ids, w, (int)n);
    }

    /// <summary>
    /// An expert's block holds WorldSize*MaxTokens rows, MaxTokens per source: a rank may list one expert at most
    /// MaxTokens times (only a token that repeats an expert can exceed it).
    /// </summary>
    public static void ExpertCapacity(EpConfig c, ReadOnlySpan<int> expertIds)
    {
        Span<int> counts = c.NumExperts <= 1024 ? stackalloc int[c.NumExperts + 1] : new int[c.NumExperts + 1];
        foreach (int e in expertIds)
        {
            if (++counts[e] > c.MaxTokens && e != c.NumExperts)
            {
                throw new ArgumentException(
                    $"expertIds lists expert {e} more than MaxTokens = {c.MaxTokens} times: a rank sends an expert at most MaxTokens rows (its block holds WorldSize*MaxTokens)",
                    nameof(expertIds));
            }
        }
    }

    public static DeviceDispatchInput Dispatch(EpConfig c, DeviceTensor<BFloat16> x, DeviceTensor<int> expertIds, DeviceTensor<float>? weights, LowLatencyDispatchOptions options)
    {
        ArgumentNullException.ThrowIfNull(x);
        ArgumentNullException.ThrowIfNull(expertIds);
        ArgumentNullException.ThrowIfNull(options);
        Format(c, options);
        Shape(x.Lengths, nameof(x), -1, c.Hidden, "[n, Hidden]");
        int n = x.Lengths[0];
        if (n > c.MaxTokens)
        {
            throw new ArgumentException($"x has {n} tokens, more than EpConfig.MaxTokens = {c.MaxTokens} (the low-latency capacity is fixed at creation)", nameof(x));
        }

        Shape(expertIds.Lengths, nameof(expertIds), n, c.TopK, "[n, TopK]");
        if (weights is not null)
        {
            Shape(weights.Lengths, nameof(weights), n, c.TopK, "[n, TopK]");
        }

        if (x.Pointer % 16 != 0)
        {
            throw new ArgumentException($"x must be 16-byte aligned (rows are moved in 16-byte vectors); it is at 0x{x.Pointer:x}", nameof(x));
        }

        return new DeviceDispatchInput(x.Pointer, expertIds.Pointer, weights?.Pointer ?? 0, n);
    }

    public static void Combine(LowLatencyHandle handle, bool weighted)
    {
        ArgumentNullException.ThrowIfNull(handle);
        if (weighted && !handle.HasWeights)
        {
            throw new ArgumentException("a weighted combine needs the routing weights, but the dispatch of this handle had none (pass weighted: false, or weights at dispatch)", nameof(weighted));
        }
    }

    /// <summary>The expert outputs must have the receive layout [ExpertsPerRank, WorldSize*MaxTokens, Hidden].</summary>
    public static void ExpertOutput(EpConfig c, ReadOnlySpan<long> lengths, string argument)
    {
        long rows = (long)c.WorldSize * c.MaxTokens;
        if (lengths.Length != 3 || lengths[0] != c.ExpertsPerRank || lengths[1] != rows || lengths[2] != c.Hidden)
        {
            throw new ArgumentException(
                $"{argument} has shape [{string.Join(", ", lengths.ToArray())}], expected the receive layout [ExpertsPerRank, WorldSize*MaxTokens, Hidden] = [{c.ExpertsPerRank}, {rows}, {c.Hidden}]",
                argument);
        }
    }

    public static long[] Lengths<T>(Tensor<T> t)
    {
        long[] lengths = new long[t.Lengths.Length];
        for (int d = 0; d < lengths.Length; d++)
        {
            lengths[d] = t.Lengths[d];
        }

        return lengths;
    }

    public static long[] Lengths(ReadOnlySpan<int> l)
    {
        long[] lengths = new long[l.Length];
        for (int d = 0; d < lengths.Length; d++)
        {
            lengths[d] = l[d];
        }

        return lengths;
    }

    private static void Shape(ReadOnlySpan<int> lengths, string argument, long rows, long columns, string expected) =>
        InputValidator.Shape(Lengths(lengths), argument, rows, columns, expected);
}

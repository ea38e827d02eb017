using EpA2A.Config;

namespace EpA2A.Layer;

/// <summary>
/// The checks the layer can make on device inputs without reading them: element types and shapes. Ids, scatter
/// indices and weights are device data; the kernels bounds-check them and report the first bad one.
/// </summary>
internal static class DeviceTensorValidator
{
    public static void Dispatch<T>(EpConfig c, DeviceTensor<T> input, DeviceTensor<int> expertIds, DeviceTensor<float>? weights, DeviceTensor<int>? scatterIndices)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(input);
        ArgumentNullException.ThrowIfNull(expertIds);
        InputValidator.ElementType<T>(c, nameof(input));
        Shape(input, nameof(input), -1, c.Hidden, "[n, Hidden]");
        int n = input.Lengths[0];
        if (n > c.MaxTokens)
        {
            throw new ArgumentException($"input has {n} tokens, more than EpConfig.MaxTokens = {c.MaxTokens}", nameof(input));
        }

        Shape(expertIds, nameof(expertIds), n, c.TopK, "[n, TopK]");
        if (weights is not null)
        {
            Shape(weights, nameof(weights), n, c.TopK, "[n, TopK]");
        }

        if (scatterIndices is not null)
        {
            if (c.ExpertAlignment != 1)
            {
                throw new ArgumentException($"scatter indices fix every row's position, so EpConfig.ExpertAlignment must be 1 (it is {c.ExpertAlignment})", nameof(scatterIndices));
            }

            Shape(scatterIndices, nameof(scatterIndices), n, c.TopK, "[n, TopK]");
        }
    }

    public static void Combine<T>(EpConfig c, DeviceTensor<T> expertOutput, EpAllToAllLayout layout, CombineOptions options)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(expertOutput);
        ArgumentNullException.ThrowIfNull(layout);
        ArgumentNullException.ThrowIfNull(options);
        InputValidator.ElementType<T>(c, nameof(expertOutput));
        Shape(expertOutput, nameof(expertOutput), layout.RecvRows, c.Hidden, "[layout.RecvRows, Hidden]");
        InputValidator.WeightsForWeightedCombine(layout, options);
    }

    private static void Shape<TElement>(DeviceTensor<TElement> t, string argument, long rows, long columns, string expected)
        where TElement : unmanaged
    {
        ReadOnlySpan<int> l = t.Lengths;
        long[] lengths = new long[l.Length];
        for (int d = 0; d < l.Length; d++)
        {
            lengths[d] = l[d];
        }

        InputValidator.Shape(lengths, argument, rows, columns, expected);
    }
}

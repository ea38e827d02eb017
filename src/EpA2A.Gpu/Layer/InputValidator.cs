using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Numerics;

namespace EpA2A.Layer;

/// <summary>
/// Every check on caller input, made before anything is copied, launched or sent. A failure is an
/// <see cref="ArgumentException"/> that names the argument, the position and the rule.
/// </summary>
internal static class InputValidator
{
    public static void Dispatch<T>(EpConfig c, Tensor<T> input, Tensor<int> expertIds, Tensor<float>? weights, Tensor<int>? scatterIndices)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(input);
        ArgumentNullException.ThrowIfNull(expertIds);
        ElementType<T>(c, nameof(input));
        Shape(input, nameof(input), -1, c.Hidden, "[n, Hidden]");
        long n = input.Lengths[0];
        if (n > c.MaxTokens)
        {
            throw new ArgumentException($"input has {n} tokens, more than EpConfig.MaxTokens = {c.MaxTokens}", nameof(input));
        }

        Routing(c, n, expertIds, weights, scatterIndices);
    }

    /// <summary>
    /// <see cref="Dispatch{T}"/> for token rows given as flat row-major memory (<paramref name="argument"/>) of <paramref name="elements"/> elements:
    /// whole rows of Hidden, at most MaxTokens of them, and the routing of as many tokens.
    /// </summary>
    public static void DispatchRows<T>(EpConfig c, int elements, string argument, Tensor<int> expertIds, Tensor<float>? weights, Tensor<int>? scatterIndices)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(expertIds);
        ElementType<T>(c, argument);
        if (elements % c.Hidden != 0)
        {
            throw new ArgumentException($"{argument} has {elements} elements, not whole rows of Hidden = {c.Hidden}", argument);
        }

        long n = elements / c.Hidden;
        if (n > c.MaxTokens)
        {
            throw new ArgumentException($"{argument} has {n} tokens, more than EpConfig.MaxTokens = {c.MaxTokens}", argument);
        }

        Routing(c, n, expertIds, weights, scatterIndices);
    }

    /// <summary>The routing of <paramref name="n"/> tokens: ids, weights and scatter indices, each [n, TopK].</summary>
    private static void Routing(EpConfig c, long n, Tensor<int> expertIds, Tensor<float>? weights, Tensor<int>? scatterIndices)
    {
        Shape(expertIds, nameof(expertIds), n, c.TopK, "[n, TopK]");
        int[] ids = DenseTensor.ToArray(expertIds);
        ExpertIds(c, ids, nameof(expertIds));

        if (weights is not null)
        {
            Shape(weights, nameof(weights), n, c.TopK, "[n, TopK]");
            float[] w = DenseTensor.ToArray(weights);
            FiniteWeights(c, w, nameof(weights));
        }

        if (scatterIndices is not null)
        {
            if (c.ExpertAlignment != 1)
            {
                throw new ArgumentException($"scatter indices fix every row's position, so EpConfig.ExpertAlignment must be 1 (it is {c.ExpertAlignment})", nameof(scatterIndices));
            }

            Shape(scatterIndices, nameof(scatterIndices), n, c.TopK, "[n, TopK]");
            int[] rows = DenseTensor.ToArray(scatterIndices);
            HashSet<int> seen = [];
            for (int i = 0; i < rows.Length; i++)
            {
                if (ids[i] == c.NumExperts)
                {
                    continue; // dropped slots have no row; their index is ignored
                }

                if (rows[i] < 0)
                {
                    throw new ArgumentException($"scatterIndices[{i / c.TopK}, {i % c.TopK}] = {rows[i]} is negative", nameof(scatterIndices));
                }

                if (!seen.Add(rows[i]))
                {
                    throw new ArgumentException($"scatterIndices[{i / c.TopK}, {i % c.TopK}] = {rows[i]} repeats an earlier index: every row takes one token", nameof(scatterIndices));
                }
            }
        }
    }

    public static void Combine<T>(EpConfig c, Tensor<T> expertOutput, EpAllToAllLayout layout, CombineOptions options)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(expertOutput);
        ArgumentNullException.ThrowIfNull(layout);
        ArgumentNullException.ThrowIfNull(options);
        ElementType<T>(c, nameof(expertOutput));
        Shape(expertOutput, nameof(expertOutput), layout.RecvRows, c.Hidden, "[layout.RecvRows, Hidden]");
        WeightsForWeightedCombine(layout, options);
    }

    /// <summary>Every id of a flat [n, TopK] array is an expert or NumExperts (a dropped slot).</summary>
    internal static void ExpertIds(EpConfig c, ReadOnlySpan<int> ids, string argument)
    {
        for (int i = 0; i < ids.Length; i++)
        {
            if ((uint)ids[i] > (uint)c.NumExperts)
            {
                throw new ArgumentException(
                    $"{argument}[{i / c.TopK}, {i % c.TopK}] = {ids[i]} is outside [0, NumExperts = {c.NumExperts}] (NumExperts marks a dropped slot)",
                    argument);
            }
        }
    }

    /// <summary>Every weight of a flat [n, TopK] array is finite.</summary>
    internal static void FiniteWeights(EpConfig c, ReadOnlySpan<float> weights, string argument)
    {
        for (int i = 0; i < weights.Length; i++)
        {
            if (!float.IsFinite(weights[i]))
            {
                throw new ArgumentException($"{argument}[{i / c.TopK}, {i % c.TopK}] = {weights[i]} is not finite", argument);
            }
        }
    }

    /// <summary>A weighted combine needs the weights its dispatch carried (host and device paths alike).</summary>
    internal static void WeightsForWeightedCombine(EpAllToAllLayout layout, CombineOptions options)
    {
        if (options.Weighted && !layout.HasWeights)
        {
            throw new ArgumentException("weighted combine needs the routing weights, but the dispatch that made this layout had none", nameof(options));
        }
    }

    /// <summary>The element type must be the configured token type (host and device paths alike).</summary>
    internal static void ElementType<T>(EpConfig c, string argument)
        where T : unmanaged
    {
        TokenType given;
        try
        {
            given = TokenTypeInfo.Of<T>();
        }
        catch (NotSupportedException e)
        {
            throw new ArgumentException($"{argument} has elements of {typeof(T).Name}; EpConfig.TokenType is {c.TokenType}", argument, e);
        }

        if (given != c.TokenType)
        {
            throw new ArgumentException($"{argument} has elements of {given}; EpConfig.TokenType is {c.TokenType}", argument);
        }
    }

    internal static void Shape<TElement>(Tensor<TElement> t, string argument, long rows, long columns, string expected)
    {
        long[] lengths = new long[t.Lengths.Length];
        for (int d = 0; d < lengths.Length; d++)
        {
            lengths[d] = t.Lengths[d];
        }

        Shape(lengths, argument, rows, columns, expected);
    }

    /// <summary>A 2-D shape [rows (any when negative), columns]; the message names the argument and the expected shape.</summary>
    internal static void Shape(ReadOnlySpan<long> lengths, string argument, long rows, long columns, string expected)
    {
        if (lengths.Length != 2 || (rows >= 0 && lengths[0] != rows) || lengths[1] != columns)
        {
            throw new ArgumentException($"{argument} has shape [{string.Join(", ", lengths.ToArray())}], expected {expected} = [{(rows >= 0 ? rows : "n")}, {columns}]", argument);
        }
    }
}

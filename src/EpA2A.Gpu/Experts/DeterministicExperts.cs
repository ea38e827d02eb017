using EpA2A.Numerics;

namespace EpA2A.Experts;

/// <summary>
/// A deterministic stand-in for real experts, used by tests, demos and `epa2a local`: expert e maps each
/// element x to x * (1 + (e mod 7) / 8) - (e mod 5) / 16, in fp32, rounded once to the token type. Every
/// expert differs, so a combine that sums the wrong rows (or copies one row for several experts) is caught.
/// </summary>
public static class DeterministicExperts
{
    /// <summary>Below this many elements the experts run on the calling thread without tables.</summary>
    private const long ParallelElements = 1L << 22;

    /// <summary>Rows of one work item when the experts run in parallel.</summary>
    private const int RowsPerItem = 64;

    /// <summary>Expert <paramref name="expert"/> applied to one value.</summary>
    public static float Apply(int expert, float x) => (x * (1f + ((expert % 7) / 8f))) - ((expert % 5) / 16f);

    /// <summary>
    /// Applies each local expert to its block of rows of a dispatch output ([rows, hidden], blocks given by
    /// starts and unpadded row counts). Padding rows are left zero. Large outputs run in parallel, 16-bit types
    /// through a <see cref="TokenTable{T}"/> per expert (the same bits as the direct computation).
    /// </summary>
    public static T[] ApplyToBlocks<T>(ReadOnlyMemory<T> rows, int hidden, int firstExpert, ReadOnlySpan<int> starts, ReadOnlySpan<int> counts)
        where T : unmanaged
    {
        T[] output = new T[rows.Length];
        long elements = 0;
        foreach (int c in counts)
        {
            elements += (long)c * hidden;
        }

        if (elements < ParallelElements)
        {
            ReadOnlySpan<T> src = rows.Span;
            for (int j = 0; j < starts.Length; j++)
            {
                int expert = firstExpert + j;
                int begin = starts[j] * hidden;
                int end = (starts[j] + counts[j]) * hidden;
                for (int i = begin; i < end; i++)
                {
                    output[i] = TokenConvert.FromSingle<T>(Apply(expert, TokenConvert.ToSingle(src[i])));
                }
            }

            return output;
        }

        TokenTable<T>?[] tables = new TokenTable<T>?[starts.Length];
        List<(int Expert, int Row, int Rows)> items = [];
        for (int j = 0; j < starts.Length; j++)
        {
            int expert = firstExpert + j;
            if (TokenTable.Supports<T>() && counts[j] > 0)
            {
                tables[j] = new TokenTable<T>(x => Apply(expert, x));
            }

            for (int r = 0; r < counts[j]; r += RowsPerItem)
            {
                items.Add((j, starts[j] + r, Math.Min(RowsPerItem, counts[j] - r)));
            }
        }

        Parallel.For(0, items.Count, i =>
        {
            (int j, int row, int n) = items[i];
            ReadOnlySpan<T> src = rows.Span.Slice(row * hidden, n * hidden);
            Span<T> dst = output.AsSpan(row * hidden, n * hidden);
            if (tables[j] is { } table)
            {
                table.Apply(src, dst);
                return;
            }

            int expert = firstExpert + j;
            for (int x = 0; x < src.Length; x++)
            {
                dst[x] = TokenConvert.FromSingle<T>(Apply(expert, TokenConvert.ToSingle(src[x])));
            }
        });
        return output;
    }
}

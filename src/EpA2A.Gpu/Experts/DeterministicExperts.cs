using EpA2A.Numerics;

namespace EpA2A.Experts;

/// <summary>
/// A deterministic stand-in for real experts, used by tests, demos and `epa2a local`: expert e maps each
/// element x to x * (1 + (e mod 7) / 8) - (e mod 5) / 16, in fp32, rounded once to the token type. Every
/// expert differs, so a combine that sums the wrong rows (or copies one row for several experts) is caught.
/// </summary>
public static class DeterministicExperts
{
    /// <summary>Expert <paramref name="expert"/> applied to one value.</summary>
    public static float Apply(int expert, float x) => (x * (1f + ((expert % 7) / 8f))) - ((expert % 5) / 16f);

    /// <summary>
    /// Applies each local expert to its block of rows of a dispatch output ([rows, hidden], blocks given by
    /// starts and unpadded row counts). Padding rows are left zero.
    /// </summary>
    public static T[] ApplyToBlocks<T>(ReadOnlySpan<T> rows, int hidden, int firstExpert, ReadOnlySpan<int> starts, ReadOnlySpan<int> counts)
        where T : unmanaged
    {
        T[] output = new T[rows.Length];
        float[] wide = new float[Math.Min(rows.Length, 16 * hidden)];
        for (int j = 0; j < starts.Length; j++)
        {
            int expert = firstExpert + j;
            float scale = 1f + ((expert % 7) / 8f);
            float shift = (expert % 5) / 16f;

            // Apply's two roundings (the product, then the difference), a block of rows at a time.
            int begin = starts[j] * hidden;
            int end = (starts[j] + counts[j]) * hidden;
            for (int at = begin; at < end; at += wide.Length)
            {
                Span<float> chunk = wide.AsSpan(0, Math.Min(wide.Length, end - at));
                TokenRows.Widen(rows.Slice(at, chunk.Length), chunk);
                TokenRows.Affine(chunk, scale, shift);
                TokenRows.Narrow<T>(chunk, output.AsSpan(at, chunk.Length));
            }
        }

        return output;
    }
}

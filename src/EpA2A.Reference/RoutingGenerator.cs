using EpA2A.Config;
using EpA2A.Numerics;

namespace EpA2A.Reference;

/// <summary>Draws seeded random rank inputs for tests and <c>epa2a local</c>: same seed, same inputs.</summary>
public static class RoutingGenerator
{
    /// <summary>How steeply expert popularity falls in a skewed draw: expert e is picked with weight 1 / (e + 1)^s.</summary>
    public const double SkewExponent = 1.2;

    /// <summary>Token elements per generator stream (one parallel work item).</summary>
    private const int TokenChunk = 1 << 16;

    /// <summary>
    /// Draws one step's inputs for every rank. Token elements are uniform in [-2, 2), never zero after rounding
    /// to <typeparamref name="T"/>. Each token picks TopK distinct experts, uniformly or, when
    /// <paramref name="skewed"/>, by a power law over expert ids (so the first experts, and rank 0, get most
    /// rows). Each slot is then dropped (its id set to NumExperts) with probability <paramref name="dropRatio"/>.
    /// Weights, when asked for, are uniform in (0, 1]. No scatter indices: feed back a dispatch's
    /// <see cref="ReferenceStep{T}.GlobalScatterIndices"/> for that.
    /// </summary>
    /// <exception cref="ArgumentException">A token count is negative or above MaxTokens, there is not one per rank, or the drop ratio is outside [0, 1].</exception>
    public static RankInput<T>[] Draw<T>(EpConfig config, int[] tokensPerRank, double dropRatio, bool skewed, bool withWeights, Random rng)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(tokensPerRank);
        ArgumentNullException.ThrowIfNull(rng);
        if (tokensPerRank.Length != config.WorldSize)
        {
            throw new ArgumentException($"{tokensPerRank.Length} token counts given; WorldSize is {config.WorldSize}", nameof(tokensPerRank));
        }

        if (tokensPerRank.Any(n => n < 0 || n > config.MaxTokens))
        {
            throw new ArgumentException($"every token count must be in [0, MaxTokens={config.MaxTokens}]", nameof(tokensPerRank));
        }

        if (!(dropRatio >= 0 && dropRatio <= 1))
        {
            throw new ArgumentException($"dropRatio = {dropRatio} must be in [0, 1]", nameof(dropRatio));
        }

        double[]? popularity = skewed ? [.. Enumerable.Range(0, config.NumExperts).Select(e => Math.Pow(e + 1, -SkewExponent))] : null;
        RankInput<T>[] inputs = new RankInput<T>[config.WorldSize];
        for (int r = 0; r < config.WorldSize; r++)
        {
            int count = tokensPerRank[r];
            T[] tokens = DrawTokens<T>(count * config.Hidden, rng.NextInt64());
            int[] ids = new int[count * config.TopK];
            for (int t = 0; t < count; t++)
            {
                Span<int> picked = ids.AsSpan(t * config.TopK, config.TopK);
                if (popularity is null)
                {
                    PickUniform(config.NumExperts, picked, rng);
                }
                else
                {
                    PickWeighted(popularity, picked, rng);
                }
            }

            for (int slot = 0; slot < ids.Length; slot++)
            {
                if (rng.NextDouble() < dropRatio)
                {
                    ids[slot] = config.NumExperts;
                }
            }

            float[]? weights = withWeights ? [.. Enumerable.Range(0, ids.Length).Select(_ => (float)(1.0 - rng.NextDouble()))] : null;
            inputs[r] = new RankInput<T>(tokens, count, ids, weights, ScatterIndices: null);
        }

        return inputs;
    }

    /// <summary>
    /// Elements uniform in [-2, 2) from a counter-based generator (SplitMix64 of the seed and the element's chunk),
    /// so that large steps (billions of elements over all ranks, drawn in every rank process) fill in parallel
    /// and the values do not depend on the number of threads.
    /// </summary>
    private static T[] DrawTokens<T>(int length, long seed)
        where T : unmanaged
    {
        T[] tokens = new T[length];
        int chunks = (length + TokenChunk - 1) / TokenChunk;
        void Fill(int chunk)
        {
            ulong state = Mix((ulong)seed ^ Mix((ulong)chunk + 0x632BE59BD9B4E019ul));
            int end = Math.Min(length, (chunk + 1) * TokenChunk);
            for (int i = chunk * TokenChunk; i < end; i++)
            {
                // Redraw the rare value that rounds to zero: a zero element cannot tell a moved row from a missing one.
                T value;
                do
                {
                    state += 0x9E3779B97F4A7C15ul;
                    uint u = (uint)(Mix(state) >> 40); // 24 bits: exact in a float
                    value = TokenConvert.FromSingle<T>((u * (1f / (1 << 22))) - 2f);
                }
                while (TokenConvert.ToSingle(value) == 0f);

                tokens[i] = value;
            }
        }

        if (chunks <= 1)
        {
            Fill(0);
        }
        else
        {
            Parallel.For(0, chunks, Fill);
        }

        return tokens;
    }

    /// <summary>The SplitMix64 finalizer.</summary>
    private static ulong Mix(ulong z)
    {
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ul;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBul;
        return z ^ (z >> 31);
    }

    /// <summary>Distinct experts, uniformly: the first picked.Length steps of a Fisher-Yates shuffle.</summary>
    private static void PickUniform(int numExperts, Span<int> picked, Random rng)
    {
        // Sparse shuffle: only the positions already swapped are remembered, so a token costs O(TopK).
        Dictionary<int, int> swapped = [];
        for (int i = 0; i < picked.Length; i++)
        {
            int j = rng.Next(i, numExperts);
            int atJ = swapped.GetValueOrDefault(j, j);
            swapped[j] = swapped.GetValueOrDefault(i, i);
            picked[i] = atJ;
        }
    }

    /// <summary>
    /// Distinct experts drawn without replacement in proportion to <paramref name="popularity"/>
    /// (Efraimidis-Spirakis: each expert gets the key -ln(u) / w and the smallest keys win).
    /// </summary>
    private static void PickWeighted(double[] popularity, Span<int> picked, Random rng)
    {
        int k = picked.Length;
        Span<double> keys = k <= 64 ? stackalloc double[k] : new double[k];
        int filled = 0;
        for (int e = 0; e < popularity.Length; e++)
        {
            double key = -Math.Log(1.0 - rng.NextDouble()) / popularity[e];
            if (filled == k && key >= keys[k - 1])
            {
                continue;
            }

            // Insert into the kept keys, ascending, dropping the largest when full.
            int i = filled < k ? filled++ : k - 1;
            while (i > 0 && keys[i - 1] > key)
            {
                keys[i] = keys[i - 1];
                picked[i] = picked[i - 1];
                i--;
            }

            keys[i] = key;
            picked[i] = e;
        }
    }
}

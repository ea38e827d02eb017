using System.Runtime.InteropServices;

namespace EpA2A.Tools.Bench;

/// <summary>
/// Random routing for the sweep: each token picks TopK distinct experts, uniformly or skewed. Skewed: expert
/// popularity falls as 1 / (position + 1) over a seeded random permutation of the experts (a Zipf law with exponent 1),
/// so hot experts are spread over the ranks as a trained router's would be, and the ranks' loads differ.
/// </summary>
internal static class BenchRouting
{
    public const double SkewExponent = 1.0;

    /// <summary>Draws one rank's ids [tokens, topK]: uniform when <paramref name="popularity"/> is null, else by it.</summary>
    /// <param name="popularity">Cumulative expert weights from <see cref="SkewedPopularity"/>, shared by every rank of a routing set.</param>
    public static int[] Draw(int tokens, int topK, int experts, double[]? popularity, Random rng)
    {
        int[] ids = new int[tokens * topK];
        if (popularity is not { } cumulative)
        {
            int[] pool = [.. Enumerable.Range(0, experts)];
            for (int t = 0; t < tokens; t++)
            {
                // Partial Fisher-Yates: the first topK of a fresh shuffle.
                for (int k = 0; k < topK; k++)
                {
                    int j = k + rng.Next(experts - k);
                    (pool[k], pool[j]) = (pool[j], pool[k]);
                    ids[(t * topK) + k] = pool[k];
                }
            }

            return ids;
        }

        Span<int> picked = stackalloc int[topK];
        for (int t = 0; t < tokens; t++)
        {
            int count = 0;
            while (count < topK)
            {
                double u = rng.NextDouble() * cumulative[^1];
                int e = Array.BinarySearch(cumulative, u);
                e = e < 0 ? ~e : e;
                e = Math.Min(e, experts - 1);
                if (!picked[..count].Contains(e))
                {
                    picked[count++] = e;
                }
            }

            picked.CopyTo(ids.AsSpan(t * topK, topK));
        }

        return ids;
    }

    /// <summary>Rows each rank receives when every rank dispatches <paramref name="ids"/> (one row per entry).</summary>
    public static int[] ReceivedRows(IReadOnlyList<int[]> ids, int world, int experts)
    {
        int epr = experts / world;
        int[] rows = new int[world];
        foreach (int[] rank in ids)
        {
            foreach (int e in rank)
            {
                rows[e / epr]++;
            }
        }

        return rows;
    }

    public static void Write(string path, int[] ids) => File.WriteAllBytes(path, MemoryMarshal.AsBytes(ids.AsSpan()).ToArray());

    public static int[] Read(string path)
    {
        byte[] bytes = File.ReadAllBytes(path);
        return MemoryMarshal.Cast<byte, int>(bytes).ToArray();
    }

    /// <summary>Cumulative popularity of the experts for one skewed routing set.</summary>
    public static double[] SkewedPopularity(int experts, Random rng)
    {
        int[] order = [.. Enumerable.Range(0, experts)];
        rng.Shuffle(order);
        double[] weight = new double[experts];
        for (int i = 0; i < experts; i++)
        {
            weight[order[i]] = Math.Pow(i + 1, -SkewExponent);
        }

        double[] cumulative = new double[experts];
        double run = 0;
        for (int e = 0; e < experts; e++)
        {
            run += weight[e];
            cumulative[e] = run;
        }

        return cumulative;
    }
}

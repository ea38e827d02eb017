using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Experts;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Reference;

namespace EpA2A.Tests;

/// <summary>
/// Runs one step of a <see cref="StepCase"/> through an in-process group of CPU-backend layers and through
/// the independent reference, and asserts they agree: dispatch output, weights and layout exactly (every
/// output element poisoned first), combine within the token type's rounding.
/// </summary>
public static class StepHarness
{
    /// <summary>Runs the case; a failure names the case and its data seed, so it can be replayed.</summary>
    public static async Task RunAsync(StepCase c, int steps = 1)
    {
        try
        {
            await (c.TokenType switch
            {
                TokenType.BFloat16 => RunAsync<BFloat16>(c, steps),
                TokenType.Float16 => RunAsync<Half>(c, steps),
                _ => RunAsync<float>(c, steps),
            });
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            throw new InvalidOperationException($"case failed: {c}\n{e.Message}", e);
        }
    }

    public static async Task RunAsync<T>(StepCase c, int steps)
        where T : unmanaged
    {
        Random rng = new(c.DataSeed);
        EpConfig config = c.Config();
        using InProcessGroup group = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(20) });
        for (int s = 0; s < steps; s++)
        {
            int[] counts = [.. Enumerable.Range(0, c.WorldSize).Select(_ => rng.Next(0, c.MaxTokens + 1))];
            RankInput<T>[] inputs = RoutingGenerator.Draw<T>(config, counts, c.DropRatio, c.Skewed, c.Weights, rng);
            if (c.Scatter)
            {
                inputs = WithShuffledScatter(config, inputs, rng);
            }

            ReferenceStep<T> expected = ReferenceAllToAll.Dispatch(config, inputs);
            foreach (EpAll2AllLayer layer in group.Layers)
            {
                Poison<T>(layer);
            }

            DispatchResult<T>[] got = await group.RunAsync((layer, r) => layer.DispatchAsync(
                Tensor.Create(inputs[r].Tokens, [inputs[r].Count, c.Hidden]),
                Tensor.Create(inputs[r].ExpertIds, [inputs[r].Count, c.TopK]),
                inputs[r].Weights is { } w ? Tensor.Create(w, [inputs[r].Count, c.TopK]) : null,
                inputs[r].ScatterIndices is { } si ? Tensor.Create(si, [inputs[r].Count, c.TopK]) : null));

            T[][] expertOut = new T[c.WorldSize][];
            T[][] expectedExpertOut = new T[c.WorldSize][];
            for (int r = 0; r < c.WorldSize; r++)
            {
                ReferenceDispatch<T> e = expected.PerRank[r];
                DispatchResult<T> g = got[r];
                string where = $"rank {r}, step {s}";
                Assert.Equal([e.Rows, c.Hidden], g.Output.Lengths.ToArray().Select(x => (int)x).ToArray());
                AssertBitwiseEqual(e.Output, Flat(g.Output), $"dispatch output, {where}");
                if (c.Weights)
                {
                    Assert.NotNull(g.Weights);
                    Assert.Equal(e.Weights!, Flat(g.Weights!));
                }
                else
                {
                    Assert.Null(g.Weights);
                }

                Assert.Equal(e.RowsPerLocalExpert, g.Layout.RowsPerLocalExpert.ToArray());
                Assert.Equal(e.PaddedRowsPerLocalExpert, g.Layout.PaddedRowsPerLocalExpert.ToArray());
                Assert.Equal(e.ExpertRowStarts, g.Layout.ExpertRowStarts.ToArray());
                Assert.Equal(expected.GlobalScatterIndices[r], g.Layout.ScatterIndices.ToArray());
                Assert.Equal(expected.TokensPerSourceRank, g.Layout.TokensPerSourceRank.ToArray());
                Assert.Equal(inputs[r].Count, g.Layout.NumDispatchTokens);

                int first = r * config.ExpertsPerRank;
                expertOut[r] = DeterministicExperts.ApplyToBlocks<T>(Flat(g.Output), c.Hidden, first, g.Layout.ExpertRowStarts, g.Layout.RowsPerLocalExpert);
                expectedExpertOut[r] = DeterministicExperts.ApplyToBlocks<T>(e.Output, c.Hidden, first, e.ExpertRowStarts, e.RowsPerLocalExpert);
            }

            foreach (bool weighted in c.Weights ? new[] { false, true } : [false])
            {
                T[][] want = ReferenceAllToAll.Combine(config, inputs, expected, expectedExpertOut, weighted);
                Tensor<T>[] combined = await group.RunAsync((layer, r) => layer.CombineAsync(
                    Tensor.Create(expertOut[r], [got[r].Layout.RecvRows, c.Hidden]),
                    got[r].Layout,
                    new CombineOptions(weighted)));
                for (int r = 0; r < c.WorldSize; r++)
                {
                    bool exact = config.IsIntraNode && !config.EnableLocalCombine;
                    AssertClose(want[r], Flat(combined[r]), c.TopK, exact, $"combine (weighted {weighted}), rank {r}, step {s}");
                }
            }
        }

        Assert.Equal(0, group.Fabric.PendingMessages);
    }

    /// <summary>
    /// Scatter indices that place every row somewhere new: a reference dispatch's global rows, permuted at
    /// random inside each destination rank's range.
    /// </summary>
    public static RankInput<T>[] WithShuffledScatter<T>(EpConfig config, RankInput<T>[] inputs, Random rng)
        where T : unmanaged
    {
        ReferenceStep<T> packed = ReferenceAllToAll.Dispatch(config, inputs);
        int[] bases = new int[config.WorldSize + 1];
        for (int d = 0; d < config.WorldSize; d++)
        {
            bases[d + 1] = bases[d] + packed.PerRank[d].RowsPerLocalExpert.Sum();
        }

        int[] permutation = new int[bases[^1]];
        for (int d = 0; d < config.WorldSize; d++)
        {
            int[] range = [.. Enumerable.Range(bases[d], bases[d + 1] - bases[d])];
            rng.Shuffle(range);
            range.CopyTo(permutation, bases[d]);
        }

        return [.. inputs.Select((input, r) => input with
        {
            ScatterIndices = [.. packed.GlobalScatterIndices[r].Select(g => g < 0 ? 0 : permutation[g])],
        })];
    }

    public static TElement[] Flat<TElement>(Tensor<TElement> tensor)
    {
        TElement[] flat = new TElement[(int)tensor.FlattenedLength];
        tensor.FlattenTo(flat);
        return flat;
    }

    private static void Poison<T>(EpAll2AllLayer layer)
        where T : unmanaged
    {
        T nan = TokenConvert.FromSingle<T>(float.NaN);
        Array.Fill(layer.Context.Output<T>(), nan);
        Array.Fill(layer.Context.WeightBuffer, float.NaN);
    }

    private static void AssertBitwiseEqual<T>(T[] expected, T[] actual, string what)
        where T : unmanaged
    {
        Assert.Equal(expected.Length, actual.Length);
        for (int i = 0; i < expected.Length; i++)
        {
            if (!EqualityComparer<T>.Default.Equals(expected[i], actual[i]))
            {
                Assert.Fail($"{what}: element {i} is {actual[i]}, expected {expected[i]}");
            }
        }
    }

    private static void AssertClose<T>(T[] expected, T[] actual, int topK, bool exact, string what)
        where T : unmanaged
    {
        Assert.Equal(expected.Length, actual.Length);
        for (int i = 0; i < expected.Length; i++)
        {
            float want = TokenConvert.ToSingle(expected[i]);
            float got = TokenConvert.ToSingle(actual[i]);
            if (float.IsNaN(got))
            {
                Assert.Fail($"{what}: element {i} is NaN");
            }

            // fp32 sums in another order differ by a few fp32 ulps of the terms; one rounding of the token type
            // may then land on the neighbouring value.
            float tolerance = exact ? 0f : Ulp<T>(want) + (topK * 4 * 4e-7f * Math.Max(1f, Math.Abs(want)));
            if (Math.Abs(want - got) > tolerance)
            {
                Assert.Fail($"{what}: element {i} is {got}, expected {want} (tolerance {tolerance})");
            }
        }
    }

    private static float Ulp<T>(float value)
        where T : unmanaged
    {
        float magnitude = Math.Max(Math.Abs(value), 1e-3f);
        if (typeof(T) == typeof(BFloat16))
        {
            return magnitude * (1f / 128f);
        }

        if (typeof(T) == typeof(Half))
        {
            return magnitude * (1f / 1024f);
        }

        return magnitude * 2.4e-7f;
    }
}

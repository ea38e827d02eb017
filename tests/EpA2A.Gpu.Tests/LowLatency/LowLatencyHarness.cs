using System.Numerics.Tensors;
using System.Runtime.InteropServices;
using EpA2A.Config;
using EpA2A.Experts;
using EpA2A.LowLatency;
using EpA2A.Numerics;
using EpA2A.Reference;

namespace EpA2A.Tests.LowLatency;

/// <summary>
/// Runs steps of a <see cref="LowLatencyCase"/> through an in-process group of CPU low-latency layers and through the
/// independent reference: rows per expert exact; every row below them bit for bit (bf16, or e4m3 codes and fp32 scales),
/// with the receive buffers poisoned first (<see cref="EpLowLatencyOptions.PoisonReceiveBuffers"/>); expert outputs poisoned (NaN) past the received rows, so a combine that
/// reads a row it should not is caught; combine within one bf16 rounding of the reference.
/// </summary>
public static class LowLatencyHarness
{
    private static readonly BFloat16 Poison = BFloat16.FromSingle(float.NaN);

    public static async Task RunAsync(LowLatencyCase c, int steps = 2)
    {
        try
        {
            await RunCoreAsync(c, steps);
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            throw new InvalidOperationException($"case failed: {c}\n{e.Message}", e);
        }
    }

    /// <summary>Seeded inputs for every rank: tokens at varied magnitudes (some 128-channel groups zero), duplicates, drops, capped at MaxTokens rows per (rank, expert).</summary>
    public static RankInput<BFloat16>[] Draw(LowLatencyCase c, EpConfig config, Random rng)
    {
        int[] counts = [.. Enumerable.Range(0, c.WorldSize).Select(_ => rng.Next(0, c.MaxTokens + 1))];
        RankInput<BFloat16>[] inputs = RoutingGenerator.Draw<BFloat16>(config, counts, c.DropRatio, c.Skewed, c.Weights, rng);
        int k = c.TopK;
        foreach (RankInput<BFloat16> input in inputs)
        {
            for (int t = 0; t < input.Count; t++)
            {
                for (int kk = 1; kk < k; kk++)
                {
                    if (rng.NextDouble() < c.DuplicateRatio)
                    {
                        input.ExpertIds[(t * k) + kk] = input.ExpertIds[(t * k) + rng.Next(kk)];
                    }
                }

                Span<BFloat16> row = input.Tokens.AsSpan(t * c.Hidden, c.Hidden);
                if (rng.NextDouble() < 0.3)
                {
                    float factor = MathF.ScaleB(1f, rng.Next(-20, 21));
                    for (int x = 0; x < row.Length; x++)
                    {
                        row[x] = BFloat16.FromSingle(row[x].ToSingle() * factor);
                    }
                }

                if (c.Hidden % 128 == 0 && rng.NextDouble() < 0.1)
                {
                    row.Slice(128 * rng.Next(c.Hidden / 128), 128).Clear();
                }
            }

            int[] perExpert = new int[c.NumExperts];
            for (int i = 0; i < input.ExpertIds.Length; i++)
            {
                int e = input.ExpertIds[i];
                if (e != c.NumExperts && ++perExpert[e] > c.MaxTokens)
                {
                    input.ExpertIds[i] = c.NumExperts;
                }
            }
        }

        return inputs;
    }

    /// <summary>The deterministic experts on a reference output, in the receive layout; rows past the received ones are NaN.</summary>
    public static BFloat16[] ExpertOutputs(EpConfig config, ReferenceLowLatencyRank rank, int destination)
    {
        int h = config.Hidden;
        int block = config.WorldSize * config.MaxTokens;
        int groups = h / 128;
        BFloat16[] output = new BFloat16[config.ExpertsPerRank * block * h];
        Array.Fill(output, Poison);
        for (int j = 0; j < config.ExpertsPerRank; j++)
        {
            int expert = (destination * config.ExpertsPerRank) + j;
            for (int row = j * block; row < (j * block) + rank.RowsPerExpert[j]; row++)
            {
                for (int x = 0; x < h; x++)
                {
                    int i = (row * h) + x;
                    float v = rank.Tokens is { } bf16 ? bf16[i].ToSingle() : Fp8E4M3.ToSingle(rank.Fp8Tokens![i]) * rank.Scales![(row * groups) + (x / 128)];
                    output[i] = BFloat16.FromSingle(DeterministicExperts.Apply(expert, v));
                }
            }
        }

        return output;
    }

    public static T[] Flat<T>(Tensor<T> tensor)
    {
        T[] flat = new T[(int)tensor.FlattenedLength];
        tensor.FlattenTo(flat);
        return flat;
    }

    /// <summary>Dispatch bit for bit against the reference, on the rows below rowsPerExpert.</summary>
    public static void AssertDispatch(EpConfig config, ReferenceLowLatencyRank want, LowLatencyDispatchResult got, string where)
    {
        int h = config.Hidden;
        int block = config.WorldSize * config.MaxTokens;
        int groups = h / 128;
        Assert.Equal(want.RowsPerExpert, Flat(got.RowsPerExpert));
        Assert.Equal(want.Tokens is null, got.Tokens is null);
        Assert.Equal(want.Fp8Tokens is null, got.Fp8Tokens is null);
        BFloat16[]? tokens = got.Tokens is { } t ? Flat(t) : null;
        byte[]? codes = got.Fp8Tokens is { } f ? Flat(f) : null;
        float[]? scales = got.Scales is { } s ? Flat(s) : null;
        for (int j = 0; j < config.ExpertsPerRank; j++)
        {
            for (int row = j * block; row < (j * block) + want.RowsPerExpert[j]; row++)
            {
                for (int x = 0; x < h; x++)
                {
                    int i = (row * h) + x;
                    bool same = tokens is not null ? tokens[i].RawBits == want.Tokens![i].RawBits : codes![i] == want.Fp8Tokens![i];
                    if (!same)
                    {
                        Assert.Fail($"{where}: expert {j} row {row - (j * block)} element {x} is {(tokens is not null ? tokens[i].ToString() : $"0x{codes![i]:X2}")}, expected {(tokens is not null ? want.Tokens![i].ToString() : $"0x{want.Fp8Tokens![i]:X2}")}");
                    }
                }

                for (int g = 0; scales is not null && g < groups; g++)
                {
                    int i = (row * groups) + g;
                    if (BitConverter.SingleToUInt32Bits(scales[i]) != BitConverter.SingleToUInt32Bits(want.Scales![i]))
                    {
                        Assert.Fail($"{where}: expert {j} row {row - (j * block)} scale {g} is {scales[i]:R}, expected {want.Scales[i]:R}");
                    }
                }
            }
        }
    }

    /// <summary>Within one bf16 rounding: the same value or its neighbour; never NaN.</summary>
    public static void AssertCombine(BFloat16[] want, BFloat16[] got, string where)
    {
        Assert.Equal(want.Length, got.Length);
        for (int i = 0; i < want.Length; i++)
        {
            float w = want[i].ToSingle();
            float g = got[i].ToSingle();
            if (float.IsNaN(g) || (w != g && Math.Abs(Ordered(want[i]) - Ordered(got[i])) > 1))
            {
                Assert.Fail($"{where}: element {i} is {g:R}, expected {w:R}");
            }
        }
    }

    private static int Ordered(BFloat16 v) => (v.RawBits & 0x8000) != 0 ? -(v.RawBits & 0x7FFF) : v.RawBits;

    private static async Task RunCoreAsync(LowLatencyCase c, int steps)
    {
        Random rng = new(c.DataSeed);
        EpConfig config = c.Config();
        LowLatencyDispatchOptions format = new(c.Fp8 ? LowLatencyFormat.Fp8 : LowLatencyFormat.Bf16, c.PowerOfTwoScales);
        bool weighted = c.Weights && c.Weighted;
        using InProcessLowLatencyGroup group = new(config, new EpLowLatencyOptions { StepTimeout = TimeSpan.FromSeconds(20), PoisonReceiveBuffers = true });
        for (int s = 0; s < steps; s++)
        {
            RankInput<BFloat16>[] inputs = Draw(c, config, rng);
            ReferenceLowLatencyStep expected = ReferenceLowLatency.Dispatch(config, inputs, c.Fp8, c.PowerOfTwoScales);

            Tensor<BFloat16> X(int r) => Tensor.Create(inputs[r].Tokens, [inputs[r].Count, c.Hidden]);
            Tensor<int> Ids(int r) => Tensor.Create(inputs[r].ExpertIds, [inputs[r].Count, c.TopK]);
            Tensor<float>? W(int r) => inputs[r].Weights is { } w ? Tensor.Create(w, [inputs[r].Count, c.TopK]) : null;
            LowLatencyDispatchResult[] got;
            if (c.Split)
            {
                await group.RunAsync((l, r) => l.DispatchSendAsync(X(r), Ids(r), W(r), format));
                got = await group.RunAsync((l, r) => l.DispatchReceiveAsync());
            }
            else
            {
                got = await group.RunAsync((l, r) => l.DispatchAsync(X(r), Ids(r), W(r), format));
            }

            BFloat16[][] expertOut = new BFloat16[c.WorldSize][];
            for (int r = 0; r < c.WorldSize; r++)
            {
                AssertDispatch(config, expected.PerRank[r], got[r], $"dispatch, rank {r}, step {s}");
                Assert.Equal(inputs[r].Count, got[r].Handle.TokenCount);
                expertOut[r] = ExpertOutputs(config, expected.PerRank[r], r);
                if (c.ZeroCopy)
                {
                    Tensor<BFloat16> buffer = group.Layers[r].CombineBuffer;
                    expertOut[r].CopyTo(MemoryMarshal.CreateSpan(ref buffer.GetPinnableReference(), (int)buffer.FlattenedLength));
                }
            }

            Tensor<BFloat16>? Out(int r) => c.ZeroCopy ? null : Tensor.Create(expertOut[r], [config.ExpertsPerRank, config.WorldSize * config.MaxTokens, c.Hidden]);
            Tensor<BFloat16>[] combined;
            if (c.Split)
            {
                await group.RunAsync((l, r) => l.CombineSendAsync(Out(r), got[r].Handle, weighted));
                combined = await group.RunAsync((l, r) => l.CombineReceiveAsync());
            }
            else
            {
                combined = await group.RunAsync((l, r) => l.CombineAsync(Out(r), got[r].Handle, weighted));
            }

            BFloat16[][] want = ReferenceLowLatency.Combine(config, inputs, expected, expertOut, weighted);
            for (int r = 0; r < c.WorldSize; r++)
            {
                Assert.Equal([inputs[r].Count, c.Hidden], combined[r].Lengths.ToArray().Select(x => (int)x).ToArray());
                AssertCombine(want[r], Flat(combined[r]), $"combine (weighted {weighted}), rank {r}, step {s}");
            }
        }

        Assert.Equal(0, group.Fabric.PendingMessages);
    }
}

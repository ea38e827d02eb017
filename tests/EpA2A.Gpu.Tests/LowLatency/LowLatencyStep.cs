using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.LowLatency;
using EpA2A.Numerics;
using EpA2A.Reference;

namespace EpA2A.Tests.LowLatency;

/// <summary>One seeded step of a small group, with its reference, for the bad-input, call-order and deadline tests.</summary>
public sealed class LowLatencyStep
{
    private LowLatencyStep(LowLatencyCase c, int seed)
    {
        Case = c;
        Seed = seed;
        Config = c.Config();
        Format = new LowLatencyDispatchOptions(c.Fp8 ? LowLatencyFormat.Fp8 : LowLatencyFormat.Bf16, c.PowerOfTwoScales);
        Inputs = LowLatencyHarness.Draw(c, Config, new Random(seed));
        Expected = ReferenceLowLatency.Dispatch(Config, Inputs, c.Fp8, c.PowerOfTwoScales);
        ExpertOutputs = [.. Enumerable.Range(0, c.WorldSize).Select(r => LowLatencyHarness.ExpertOutputs(Config, Expected.PerRank[r], r))];
        Combined = ReferenceLowLatency.Combine(Config, Inputs, Expected, ExpertOutputs, c.Weighted && c.Weights);
    }

    public LowLatencyCase Case { get; }

    public int Seed { get; }

    public EpConfig Config { get; }

    public LowLatencyDispatchOptions Format { get; }

    public RankInput<BFloat16>[] Inputs { get; }

    public ReferenceLowLatencyStep Expected { get; }

    public BFloat16[][] ExpertOutputs { get; }

    public BFloat16[][] Combined { get; }

    /// <summary>World 3, top-2 of 6 experts, hidden 128, 8 tokens at most, bf16 or FP8, weighted.</summary>
    public static LowLatencyStep Draw(int seed, bool fp8 = false, int hidden = 128, int world = 3) =>
        new(new LowLatencyCase(world, 2, 2 * world, hidden, 8, 0.1, 0.1, false, fp8, false, true, true, false, false, seed), seed);

    public Tensor<BFloat16> X(int r) => Tensor.Create(Inputs[r].Tokens, [Inputs[r].Count, Config.Hidden]);

    public Tensor<int> Ids(int r) => Tensor.Create(Inputs[r].ExpertIds, [Inputs[r].Count, Config.TopK]);

    public Tensor<float>? Weights(int r) => Inputs[r].Weights is { } w ? Tensor.Create(w, [Inputs[r].Count, Config.TopK]) : null;

    public Tensor<BFloat16> ExpertOutput(int r) =>
        Tensor.Create(ExpertOutputs[r], [Config.ExpertsPerRank, Config.WorldSize * Config.MaxTokens, Config.Hidden]);

    public ValueTask<LowLatencyDispatchResult> DispatchAsync(EpLowLatencyLayer layer, int r, CancellationToken ct = default) =>
        layer.DispatchAsync(X(r), Ids(r), Weights(r), Format, ct);

    public ValueTask<Tensor<BFloat16>> CombineAsync(EpLowLatencyLayer layer, int r, LowLatencyDispatchResult dispatched, CancellationToken ct = default) =>
        layer.CombineAsync(ExpertOutput(r), dispatched.Handle, Case.Weighted && Case.Weights, ct);

    public void AssertDispatch(int r, LowLatencyDispatchResult got) =>
        LowLatencyHarness.AssertDispatch(Config, Expected.PerRank[r], got, $"seed {Seed}: dispatch, rank {r}");

    public void AssertCombine(int r, Tensor<BFloat16> got) =>
        LowLatencyHarness.AssertCombine(Combined[r], LowLatencyHarness.Flat(got), $"seed {Seed}: combine, rank {r}");

    /// <summary>The whole step on every rank, checked against the reference.</summary>
    public async Task RunAsync(InProcessLowLatencyGroup group)
    {
        LowLatencyDispatchResult[] got = await group.RunAsync((l, r) => DispatchAsync(l, r));
        for (int r = 0; r < got.Length; r++)
        {
            AssertDispatch(r, got[r]);
        }

        Tensor<BFloat16>[] combined = await group.RunAsync((l, r) => CombineAsync(l, r, got[r]));
        for (int r = 0; r < combined.Length; r++)
        {
            AssertCombine(r, combined[r]);
        }
    }
}

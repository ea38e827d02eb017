using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Experts.SwiGlu;
using EpA2A.LowLatency;
using EpA2A.Numerics;
using EpA2A.Reference;
using EpA2A.Tests.LowLatency;

namespace EpA2A.Tests.Experts;

/// <summary>
/// <see cref="SwiGluExpertCompute.ComputeLowLatencyAsync"/> on what a real low-latency dispatch delivered, bf16 or FP8
/// (three CPU ranks in process, receive buffers poisoned with NaN first, routing with drops and duplicates, rows at
/// magnitudes 2^-20..2^20, two 128-channel scale groups a row): every row below RowsPerExpert[j] of block j against the
/// independent double-precision <see cref="ReferenceSwiGlu"/> (FP8 rows decoded by <see cref="ReferenceFp8"/>) within
/// <see cref="ReferenceSwiGlu.Tolerance"/> (the normal-path test's bound); the rows past them, poisoned on input, are
/// never read (they come out zero, not NaN).
/// </summary>
public sealed class SwiGluLowLatencyTests
{
    private const int Hidden = 256;
    private const int Ffn = 160;
    private const int World = 3;

    [Theory]
    [InlineData(false, 31)]
    [InlineData(false, 32)]
    [InlineData(true, 34)]
    public async Task The_low_latency_expert_matches_the_reference_on_every_received_row(bool fp8, int seed)
    {
        (double worst, double rms, int rows) = await WorstRatioAsync(fp8, seed, weightsUnderTest: seed);

        Assert.True(rows > 0, $"seed {seed}: no row was received");
        Assert.True(worst <= 1.0, $"seed {seed}: an output is {worst:0.00}x its tolerance away from the reference");
        Assert.True(rms > 0, $"seed {seed}: every output is zero over {rows} rows");
    }

    [Fact]
    public async Task The_check_catches_low_latency_experts_with_other_weights()
    {
        const int seed = 33;
        (double worst, _, _) = await WorstRatioAsync(fp8: false, seed, weightsUnderTest: seed + 1);

        Assert.True(worst > 10, $"seed {seed}: experts with other weights came within {worst:0.00}x the tolerance: the check cannot tell them apart");
    }

    /// <summary>One dispatched step, every rank's experts applied; the worst |got - reference| / tolerance, the outputs' rms over the received rows, and the rows received.</summary>
    private static async Task<(double Worst, double Rms, int Rows)> WorstRatioAsync(bool fp8, int seed, int weightsUnderTest)
    {
        LowLatencyCase c = new(World, 2, 2 * World, Hidden, 8, 0.1, 0.2, false, fp8, false, true, true, false, false, seed);
        EpConfig config = c.Config();
        RankInput<BFloat16>[] inputs = LowLatencyHarness.Draw(c, config, new Random(seed));
        ReferenceLowLatencyStep expected = ReferenceLowLatency.Dispatch(config, inputs, fp8, powerOfTwoScales: false);
        using InProcessLowLatencyGroup group = new(config, new EpLowLatencyOptions { StepTimeout = TimeSpan.FromSeconds(20), PoisonReceiveBuffers = true });

        LowLatencyDispatchResult[] got = await group.RunAsync((l, r) => l.DispatchAsync(
            Tensor.Create(inputs[r].Tokens, [inputs[r].Count, Hidden]),
            Tensor.Create(inputs[r].ExpertIds, [inputs[r].Count, c.TopK]),
            Tensor.Create(inputs[r].Weights!, [inputs[r].Count, c.TopK]),
            new LowLatencyDispatchOptions(fp8 ? LowLatencyFormat.Fp8 : LowLatencyFormat.Bf16)));

        int block = World * c.MaxTokens;
        int groups = Hidden / 128;
        double worst = 0, squares = 0;
        int rows = 0;
        double[] input = new double[Hidden];
        double[] want = new double[Hidden];
        double[] tolerance = new double[Hidden];
        for (int r = 0; r < World; r++)
        {
            LowLatencyHarness.AssertDispatch(config, expected.PerRank[r], got[r], $"seed {seed}: dispatch, rank {r}");
            int first = r * config.ExpertsPerRank;
            SwiGluWeights truth = SwiGluWeights.Random(Hidden, Ffn, first, config.ExpertsPerRank, seed);
            SwiGluExpertCompute experts = new(SwiGluWeights.Random(Hidden, Ffn, first, config.ExpertsPerRank, weightsUnderTest));
            Tensor<BFloat16> computed = await experts.ComputeLowLatencyAsync("l", config.ForRank(r), got[r], TestContext.Current.CancellationToken);

            Assert.Equal([config.ExpertsPerRank, block, Hidden], computed.Lengths.ToArray().Select(x => (int)x).ToArray());
            BFloat16[] output = LowLatencyHarness.Flat(computed);
            int[] counts = LowLatencyHarness.Flat(got[r].RowsPerExpert);
            BFloat16[]? tokens = got[r].Tokens is { } t ? LowLatencyHarness.Flat(t) : null;
            byte[]? codes = got[r].Fp8Tokens is { } f ? LowLatencyHarness.Flat(f) : null;
            float[]? scales = got[r].Scales is { } sc ? LowLatencyHarness.Flat(sc) : null;
            Assert.Equal(fp8, codes is not null);
            for (int j = 0; j < config.ExpertsPerRank; j++)
            {
                for (int row = j * block; row < (j + 1) * block; row++)
                {
                    bool received = row < (j * block) + counts[j];
                    rows += received ? 1 : 0;
                    if (received)
                    {
                        // The reference's input: the bf16 row, or the e4m3 codes times their scales (decoded by the reference, in double).
                        for (int k = 0; k < Hidden; k++)
                        {
                            int e = (row * Hidden) + k;
                            input[k] = tokens is not null ? tokens[e].ToSingle() : ReferenceFp8.Decode(codes![e]) * scales![(row * groups) + (k / 128)];
                        }

                        ReferenceSwiGlu.Apply(truth, j, input, want, tolerance, ReferenceSwiGlu.UnitRoundoff<BFloat16>());
                    }

                    for (int x = 0; x < Hidden; x++)
                    {
                        int i = (row * Hidden) + x;
                        double v = output[i].ToSingle();
                        if (!received)
                        {
                            Assert.True(v == 0, $"seed {seed}: rank {r} expert {j} row {row - (j * block)} (past the {counts[j]} received) element {x} is {v}: a row it was not sent was computed");
                            continue;
                        }

                        double ratio = Math.Abs(v - want[x]) / tolerance[x];
                        Assert.False(double.IsNaN(ratio), $"seed {seed}: rank {r} expert {j} row {row - (j * block)} element {x}: got {v}, reference {want[x]}, tolerance {tolerance[x]}");
                        worst = Math.Max(worst, ratio);
                        squares += v * v;
                    }
                }
            }
        }

        return (worst, rows == 0 ? 0 : Math.Sqrt(squares / (rows * (double)Hidden)), rows);
    }
}

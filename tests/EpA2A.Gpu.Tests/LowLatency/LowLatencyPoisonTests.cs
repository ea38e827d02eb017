using EpA2A.LowLatency;
using EpA2A.Numerics;

namespace EpA2A.Tests.LowLatency;

/// <summary>
/// <see cref="EpLowLatencyOptions.PoisonReceiveBuffers"/> on the CPU backend: at every dispatch send, not only the first,
/// the receive blocks are filled with NaN, so after a second step every row past RowsPerExpert[j] is NaN (FP8: code 0x7F
/// and NaN scales); without the option those rows keep what was there. The rows received equal the reference either way.
/// </summary>
public sealed class LowLatencyPoisonTests
{
    [Theory]
    [InlineData(false, true)]
    [InlineData(true, true)]
    [InlineData(false, false)]
    [InlineData(true, false)]
    public async Task Rows_past_the_received_ones_are_NaN_after_every_dispatch_send_only_with_the_option(bool fp8, bool poison)
    {
        int seed = Random.Shared.Next();
        CancellationToken ct = TestContext.Current.CancellationToken;
        LowLatencyStep first = LowLatencyStep.Draw(seed, fp8);
        LowLatencyStep second = SecondStepWithFewerRows(first, fp8);
        using InProcessLowLatencyGroup group = new(first.Config, new EpLowLatencyOptions { StepTimeout = TimeSpan.FromSeconds(20), PoisonReceiveBuffers = poison });

        await first.RunAsync(group);
        LowLatencyDispatchResult[] got = await group.RunAsync((l, r) => second.DispatchAsync(l, r, ct));

        int block = first.Config.WorldSize * first.Config.MaxTokens;
        int h = first.Config.Hidden;
        int groups = h / 128;
        int rowsPast = 0, poisonedRowsPast = 0;
        for (int r = 0; r < got.Length; r++)
        {
            second.AssertDispatch(r, got[r]);
            int[] rowsPerExpert = LowLatencyHarness.Flat(got[r].RowsPerExpert);
            BFloat16[]? tokens = got[r].Tokens is { } t ? LowLatencyHarness.Flat(t) : null;
            byte[]? codes = got[r].Fp8Tokens is { } f ? LowLatencyHarness.Flat(f) : null;
            float[]? scales = got[r].Scales is { } s ? LowLatencyHarness.Flat(s) : null;
            for (int j = 0; j < rowsPerExpert.Length; j++)
            {
                for (int row = (j * block) + rowsPerExpert[j]; row < (j + 1) * block; row++)
                {
                    bool poisoned = tokens is not null
                        ? tokens.AsSpan(row * h, h).ToArray().All(v => float.IsNaN(v.ToSingle()))
                        : codes!.AsSpan(row * h, h).ToArray().All(c => c == 0x7F) && scales!.AsSpan(row * groups, groups).ToArray().All(float.IsNaN);
                    rowsPast++;
                    poisonedRowsPast += poisoned ? 1 : 0;
                    if (poison && !poisoned)
                    {
                        Assert.Fail($"seed {seed}, fp8 {fp8}: rank {r} expert {j} row {row - (j * block)} (received {rowsPerExpert[j]}) is not poisoned");
                    }
                }
            }
        }

        Assert.True(rowsPast > 0, $"seed {seed}: every receive block is full, nothing past the received rows to check");
        if (!poison)
        {
            Assert.True(poisonedRowsPast == 0, $"seed {seed}, fp8 {fp8}: {poisonedRowsPast} of {rowsPast} rows past the received ones are NaN without the option");
        }
    }

    /// <summary>
    /// The first of the steps drawn after <paramref name="first"/> (seeds first.Seed + 1, + 2, ...) that gives some rank's
    /// expert fewer rows than the first step did: rows the first step wrote then lie past the second step's, so poisoning
    /// only once (at creation or at the first send) leaves real rows there and the test fails.
    /// </summary>
    private static LowLatencyStep SecondStepWithFewerRows(LowLatencyStep first, bool fp8)
    {
        for (int i = 1; i <= 100; i++)
        {
            LowLatencyStep second = LowLatencyStep.Draw(first.Seed + i, fp8);
            for (int r = 0; r < first.Config.WorldSize; r++)
            {
                int[] before = first.Expected.PerRank[r].RowsPerExpert;
                int[] after = second.Expected.PerRank[r].RowsPerExpert;
                if (before.Where((rows, j) => rows > after[j]).Any())
                {
                    return second;
                }
            }
        }

        throw new InvalidOperationException($"seed {first.Seed}: no step of the next 100 seeds gives any expert fewer rows than the first");
    }
}

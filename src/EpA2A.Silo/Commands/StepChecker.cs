using EpA2A.Config;
using EpA2A.Experts;
using EpA2A.Experts.SwiGlu;
using EpA2A.Grains;
using EpA2A.LowLatency;
using EpA2A.Numerics;
using EpA2A.Reference;

namespace EpA2A.Silo.Commands;

/// <summary>Draws a random step, runs it through the grains, and compares the result with the reference.</summary>
internal static class StepChecker
{
    /// <summary>Runs one checked step; returns its report and the largest deviation from the reference (in units of the tolerance).</summary>
    public static async Task<(StepReport Report, double WorstRatio, TimeSpan RoundTrip)> RunAsync<T>(
        ExpertLayerClient client, LayerSpec spec, Random rng, double drop, bool skewed, bool weighted, CancellationToken cancellationToken, SwiGluWeights[]? swiglu = null)
        where T : unmanaged
    {
        EpConfig config = spec.ToConfig(0);
        int[] counts = [.. Enumerable.Range(0, spec.WorldSize).Select(_ => rng.Next(1, spec.MaxTokens + 1))];
        RankInput<T>[] inputs = RoutingGenerator.Draw<T>(config, counts, drop, skewed, weighted, rng);
        long start = System.Diagnostics.Stopwatch.GetTimestamp();
        StepOutcome<T> outcome = await client.StepAsync(
            [.. inputs.Select(i => new RankStepInput<T>(i.Tokens, i.Count, i.ExpertIds, i.Weights))], weighted, cancellationToken);
        TimeSpan roundTrip = System.Diagnostics.Stopwatch.GetElapsedTime(start);

        // A masking layer may have served without some ranks: what it must return is the reference of that.
        IReadOnlyList<int> masked = outcome.Report.MaskedRanks ?? [];
        inputs = MaskedRanks.Apply(config, inputs, [.. masked], out int maskedSlots);
        if (maskedSlots != outcome.Report.MaskedSlots)
        {
            throw new InvalidOperationException($"the step reports {outcome.Report.MaskedSlots} masked slots; masking ranks {string.Join(", ", masked)} drops {maskedSlots}");
        }

        double[][]? tolerance = null;
        T[][] expected;
        if (swiglu is not null)
        {
            if (spec.Mode == LayerMode.LowLatency)
            {
                throw new ArgumentException("the SwiGLU step check covers normal-mode layers only", nameof(spec));
            }

            (expected, tolerance) = ExpectedSwiGlu(config, inputs, weighted, swiglu);
        }
        else
        {
            expected = spec.Mode == LayerMode.LowLatency
                ? (T[][])(object)ExpectedLowLatency(spec, (RankInput<BFloat16>[])(object)inputs, weighted) // a low-latency spec is bf16 (validated)
                : Expected(config, inputs, weighted);
        }

        double worst = 0;
        float relative = spec.TokenType switch { TokenType.BFloat16 => 1f / 128f, TokenType.Float16 => 1f / 1024f, _ => 1e-6f };
        for (int r = 0; r < spec.WorldSize; r++)
        {
            if (expected[r].Length != outcome.Outputs[r].Length)
            {
                throw new InvalidOperationException($"rank {r}: combined output has {outcome.Outputs[r].Length} elements, the reference {expected[r].Length}");
            }

            for (int i = 0; i < expected[r].Length; i++)
            {
                float want = TokenConvert.ToSingle(expected[r][i]);
                float got = TokenConvert.ToSingle(outcome.Outputs[r][i]);
                double ratio = Math.Abs(want - got) / (tolerance is null ? (Math.Abs(want) * relative) + 1e-3 : tolerance[r][i]);
                worst = double.IsNaN(ratio) ? double.PositiveInfinity : Math.Max(worst, ratio);
            }
        }

        return (outcome.Report, worst, roundTrip);
    }

    private static T[][] Expected<T>(EpConfig config, RankInput<T>[] inputs, bool weighted)
        where T : unmanaged
    {
        ReferenceStep<T> dispatched = ReferenceAllToAll.Dispatch(config, inputs);
        T[][] expertOutputs = [.. dispatched.PerRank.Select((d, r) =>
            DeterministicExperts.ApplyToBlocks<T>(d.Output, config.Hidden, r * config.ExpertsPerRank, d.ExpertRowStarts, d.RowsPerLocalExpert))];
        return ReferenceAllToAll.Combine(config, inputs, dispatched, expertOutputs, weighted);
    }

    /// <summary>
    /// The reference of a step through SwiGLU experts: the reference SwiGLU (double, then rounded to the token type) on the
    /// reference dispatch's rows, combined by the reference; and per combined element its tolerance. Combine sums a token's
    /// rows (times its weights) in fp32 and rounds once, so |got - want| is at most the weighted sum of each row's bound
    /// (the expert's own, plus the reference rows' rounding u|y|), plus both sums' final roundings (2u|want|), plus fp32
    /// summation of TopK terms (TopK 2^-24 of the sum of |w y|), every sum formed by the reference's own combine.
    /// </summary>
    private static (T[][] Expected, double[][] Tolerance) ExpectedSwiGlu<T>(EpConfig config, RankInput<T>[] inputs, bool weighted, SwiGluWeights[] swiglu)
        where T : unmanaged
    {
        double u = ReferenceSwiGlu.UnitRoundoff<T>();
        ReferenceStep<T> dispatched = ReferenceAllToAll.Dispatch(config, inputs);
        T[][] rows = new T[config.WorldSize][];
        T[][] bounds = new T[config.WorldSize][];
        T[][] magnitudes = new T[config.WorldSize][];
        for (int r = 0; r < config.WorldSize; r++)
        {
            ReferenceDispatch<T> d = dispatched.PerRank[r];
            (double[] y, double[] bound) = ReferenceSwiGlu.ApplyToBlocks<T>(swiglu[r], d.Output, d.ExpertRowStarts, d.RowsPerLocalExpert);
            rows[r] = new T[y.Length];
            bounds[r] = new T[y.Length];
            magnitudes[r] = new T[y.Length];
            for (int i = 0; i < y.Length; i++)
            {
                rows[r][i] = TokenConvert.FromSingle<T>((float)y[i]);
                // Rounded up by 2u, so that the bound survives its own rounding to the token type.
                bounds[r][i] = TokenConvert.FromSingle<T>((float)((bound[i] + (u * Math.Abs(y[i]))) * (1 + (2 * u))));
                magnitudes[r][i] = TokenConvert.FromSingle<T>((float)Math.Abs(y[i]));
            }
        }

        T[][] expected = ReferenceAllToAll.Combine(config, inputs, dispatched, rows, weighted);
        T[][] rowBounds = ReferenceAllToAll.Combine(config, inputs, dispatched, bounds, weighted);
        T[][] sums = ReferenceAllToAll.Combine(config, inputs, dispatched, magnitudes, weighted);
        double[][] tolerance = new double[config.WorldSize][];
        for (int r = 0; r < config.WorldSize; r++)
        {
            tolerance[r] = new double[expected[r].Length];
            for (int i = 0; i < expected[r].Length; i++)
            {
                double want = Math.Abs(TokenConvert.ToSingle(expected[r][i]));
                tolerance[r][i] = (TokenConvert.ToSingle(rowBounds[r][i]) * (1 + (2 * u))) + (2 * u * want) + (config.TopK * Math.Pow(2, -23) * TokenConvert.ToSingle(sums[r][i])) + 1e-30;
            }
        }

        return (expected, tolerance);
    }

    /// <summary>The low-latency reference: its own placement and FP8 quantizer, the built-in experts on the expert-major rows.</summary>
    private static BFloat16[][] ExpectedLowLatency(LayerSpec spec, RankInput<BFloat16>[] inputs, bool weighted)
    {
        EpConfig config = spec.ToConfig(0);
        LowLatencyDispatchOptions format = spec.LowLatencyDispatch;
        ReferenceLowLatencyStep dispatched = ReferenceLowLatency.Dispatch(config, inputs, format.Format == LowLatencyFormat.Fp8, format.PowerOfTwoScales);
        BFloat16[][] expertOutputs = [.. dispatched.PerRank.Select((d, r) =>
            DeterministicExperts.ApplyToLowLatencyBlocks(spec.ToConfig(r), d.RowsPerExpert, d.Tokens ?? [], d.Fp8Tokens ?? [], d.Scales ?? []))];
        return ReferenceLowLatency.Combine(config, inputs, dispatched, expertOutputs, weighted);
    }
}

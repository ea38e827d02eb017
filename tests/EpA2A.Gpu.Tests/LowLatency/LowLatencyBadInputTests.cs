using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Errors;
using EpA2A.LowLatency;
using EpA2A.Numerics;
using EpA2A.Reference;
using EpA2A.Transport;

namespace EpA2A.Tests.LowLatency;

/// <summary>
/// Bad input to the low-latency layer: an exception that names the argument and the rule, before anything is sent. The
/// other ranks keep waiting in the same step; the bad rank's corrected call completes it, and the whole step matches the
/// reference.
/// </summary>
public sealed class LowLatencyBadInputTests
{
    private const int BadRank = 1;

    public static TheoryData<string> DispatchCases => new()
    {
        "x 1-D", "x 3-D", "x hidden", "too many tokens", "ids shape", "id -1", "id past NumExperts", "weights shape",
        "weights NaN", "weights infinite", "expert over capacity", "unknown format",
    };

    [Theory]
    [MemberData(nameof(DispatchCases))]
    public async Task Bad_dispatch_input_is_refused_naming_the_argument_and_the_rule_and_the_step_completes_after(string bad)
    {
        LowLatencyStep step = LowLatencyStep.Draw(Environment.TickCount);
        int n = step.Inputs[BadRank].Count;
        int k = step.Config.TopK;
        int h = step.Config.Hidden;
        int m = step.Config.MaxTokens;
        int[] ids = [.. step.Inputs[BadRank].ExpertIds];
        float[] weights = [.. step.Inputs[BadRank].Weights!];
        (Func<EpLowLatencyLayer, ValueTask> call, string argument, string rule) = bad switch
        {
            "x 1-D" => Bad(l => l.DispatchAsync(Tensor.Create(new BFloat16[h], [h]), step.Ids(BadRank)).AsTask().Discard(), "x", "[n, Hidden]"),
            "x 3-D" => Bad(l => l.DispatchAsync(Tensor.Create(new BFloat16[n * h], [n, 1, h]), step.Ids(BadRank)).AsTask().Discard(), "x", "[n, Hidden]"),
            "x hidden" => Bad(l => l.DispatchAsync(Tensor.Create(new BFloat16[n * (h - 1)], [n, h - 1]), step.Ids(BadRank)).AsTask().Discard(), "x", "[n, Hidden]"),
            "too many tokens" => Bad(l => l.DispatchAsync(Tensor.Create(new BFloat16[(m + 1) * h], [m + 1, h]), Tensor.Create(new int[(m + 1) * k], [m + 1, k])).AsTask().Discard(), "x", "MaxTokens = 8"),
            "ids shape" => Bad(l => l.DispatchAsync(step.X(BadRank), Tensor.Create(new int[(n + 1) * k], [n + 1, k])).AsTask().Discard(), "expertIds", "[n, TopK]"),
            "id -1" => Bad(l => l.DispatchAsync(step.X(BadRank), Ids(With(ids, 0, -1), n, k)).AsTask().Discard(), "expertIds", "outside [0, NumExperts = 6]"),
            "id past NumExperts" => Bad(l => l.DispatchAsync(step.X(BadRank), Ids(With(ids, (n * k) - 1, 7), n, k)).AsTask().Discard(), "expertIds", "outside [0, NumExperts = 6]"),
            "weights shape" => Bad(l => l.DispatchAsync(step.X(BadRank), step.Ids(BadRank), Tensor.Create(new float[n * (k + 1)], [n, k + 1])).AsTask().Discard(), "weights", "[n, TopK]"),
            "weights NaN" => Bad(l => l.DispatchAsync(step.X(BadRank), step.Ids(BadRank), Tensor.Create(With(weights, 0, float.NaN), [n, k])).AsTask().Discard(), "weights", "not finite"),
            "weights infinite" => Bad(l => l.DispatchAsync(step.X(BadRank), step.Ids(BadRank), Tensor.Create(With(weights, 1, float.PositiveInfinity), [n, k])).AsTask().Discard(), "weights", "not finite"),
            "expert over capacity" => Bad(l => l.DispatchAsync(Tensor.Create(new BFloat16[m * h], [m, h]), Tensor.Create(Enumerable.Repeat(3, m * k).ToArray(), [m, k])).AsTask().Discard(), "expertIds", "more than MaxTokens"),
            _ => Bad(l => l.DispatchAsync(step.X(BadRank), step.Ids(BadRank), step.Weights(BadRank), new LowLatencyDispatchOptions((LowLatencyFormat)7)).AsTask().Discard(), "options", "Format"),
        };

        if (bad is "id -1" or "id past NumExperts" or "weights NaN" or "weights infinite" && n == 0)
        {
            return; // the draw gave the bad rank no tokens to spoil; another seed will
        }

        await RejectedWhileOthersWaitAsync(step, call, argument, rule);
    }

    [Fact]
    public async Task Fp8_with_hidden_not_a_multiple_of_128_is_refused_and_bf16_then_works()
    {
        LowLatencyStep step = LowLatencyStep.Draw(Environment.TickCount, fp8: false, hidden: 96);
        await RejectedWhileOthersWaitAsync(
            step,
            l => l.DispatchAsync(step.X(BadRank), step.Ids(BadRank), step.Weights(BadRank), LowLatencyDispatchOptions.Fp8).AsTask().Discard(),
            "options",
            "multiple of 128");
    }

    public static TheoryData<string> CombineCases => new() { "expert output shape", "weighted without weights", "foreign handle", "stale handle" };

    [Theory]
    [MemberData(nameof(CombineCases))]
    public async Task Bad_combine_input_is_refused_naming_the_argument_and_the_rule_and_the_step_completes_after(string bad)
    {
        LowLatencyStep step = LowLatencyStep.Draw(Environment.TickCount);
        using InProcessLowLatencyGroup group = new(step.Config, Options());
        using InProcessLowLatencyGroup other = new(step.Config, Options());
        LowLatencyDispatchResult[] foreign = await other.RunAsync((l, r) => step.DispatchAsync(l, r));

        // A first step whose handle goes stale, then the step under test.
        LowLatencyDispatchResult[] first = await group.RunAsync((l, r) => step.DispatchAsync(l, r));
        await group.RunAsync((l, r) => step.CombineAsync(l, r, first[r]));
        bool noWeights = bad == "weighted without weights";
        LowLatencyDispatchResult[] got = await group.RunAsync((l, r) => noWeights
            ? l.DispatchAsync(step.X(r), step.Ids(r), null, step.Format)
            : step.DispatchAsync(l, r));
        int epr = step.Config.ExpertsPerRank;
        int rows = step.Config.WorldSize * step.Config.MaxTokens;
        int h = step.Config.Hidden;
        (Func<EpLowLatencyLayer, ValueTask> call, string argument, string rule) = bad switch
        {
            "expert output shape" => Bad(l => l.CombineAsync(Tensor.Create(new BFloat16[epr * (rows - 1) * h], [epr, rows - 1, h]), got[BadRank].Handle).AsTask().Discard(), "expertOutput", "[ExpertsPerRank, WorldSize*MaxTokens, Hidden]"),
            "weighted without weights" => Bad(l => l.CombineAsync(step.ExpertOutput(BadRank), got[BadRank].Handle, weighted: true).AsTask().Discard(), "weighted", "routing weights"),
            "foreign handle" => Bad(l => l.CombineAsync(step.ExpertOutput(BadRank), foreign[BadRank].Handle).AsTask().Discard(), "handle", "another layer"),
            _ => Bad(l => l.CombineAsync(step.ExpertOutput(BadRank), first[BadRank].Handle).AsTask().Discard(), "handle", "latest dispatch"),
        };

        bool weighted = !noWeights;
        Task<Tensor<BFloat16>>[] others = [.. Enumerable.Range(0, step.Config.WorldSize).Where(r => r != BadRank).Select(r =>
            Task.Run(() => group.Layers[r].CombineAsync(step.ExpertOutput(r), got[r].Handle, weighted, TestContext.Current.CancellationToken).AsTask(), TestContext.Current.CancellationToken))];
        ArgumentException e = await Assert.ThrowsAnyAsync<ArgumentException>(() => call(group.Layers[BadRank]).AsTask());
        AssertNames(e, argument, rule);
        Assert.All(others, t => Assert.False(t.IsCompleted, $"seed {step.Seed}: a peer finished the combine without the bad rank"));

        Tensor<BFloat16> mine = await group.Layers[BadRank].CombineAsync(step.ExpertOutput(BadRank), got[BadRank].Handle, weighted, TestContext.Current.CancellationToken);
        Tensor<BFloat16>[] theirs = await Task.WhenAll(others);
        BFloat16[][] want = ReferenceLowLatency.Combine(step.Config, step.Inputs, step.Expected, step.ExpertOutputs, weighted);
        for (int r = 0; r < step.Config.WorldSize; r++)
        {
            Tensor<BFloat16> combined = r == BadRank ? mine : theirs[r < BadRank ? r : r - 1];
            LowLatencyHarness.AssertCombine(want[r], LowLatencyHarness.Flat(combined), $"seed {step.Seed}: combine, rank {r}");
        }

        Assert.Equal(0, group.Fabric.PendingMessages);
    }

    public static TheoryData<string, string> RefusedConfigs => new()
    {
        { "fp16", "TokenType" },
        { "inter-node", "intra-node only" },
        { "alignment", "ExpertAlignment" },
        { "timeout", "StepTimeout" },
        { "sms", "NumSms" },
    };

    [Theory]
    [MemberData(nameof(RefusedConfigs))]
    public void A_config_the_low_latency_layer_cannot_serve_is_refused_at_creation(string bad, string rule)
    {
        EpConfig config = bad switch
        {
            "fp16" => new EpConfig(8, 128, 2, 8, 0, 2, 2, TokenType.Float16),
            "inter-node" => new EpConfig(8, 128, 2, 8, 0, 4, 2),
            "alignment" => new EpConfig(8, 128, 2, 8, 0, 2, 2, expertAlignment: 4),
            _ => new EpConfig(8, 128, 2, 8, 0, 2, 2),
        };
        EpLowLatencyOptions options = bad switch
        {
            "timeout" => new EpLowLatencyOptions { StepTimeout = TimeSpan.Zero },
            "sms" => new EpLowLatencyOptions { NumSms = 0 },
            _ => EpLowLatencyOptions.Default,
        };
        InProcessFabric fabric = new(config.WorldSize);
        ArgumentException e = Assert.Throws<ArgumentException>(() => EpLowLatencyLayer.CreateCpu(config, fabric.TransportFor(0), options));
        Assert.Contains(rule, e.Message, StringComparison.Ordinal);
        if (bad == "inter-node")
        {
            Assert.Contains("normal EpAll2AllLayer", e.Message, StringComparison.Ordinal);
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Ranks_that_disagree_on_the_format_or_the_config_fail_together_naming_the_difference(bool format)
    {
        CancellationToken ct = TestContext.Current.CancellationToken;
        EpConfig config = new(4, 128, 2, 4, 0, 2, 2);
        InProcessFabric fabric = new(2);
        using EpLowLatencyLayer rank0 = EpLowLatencyLayer.CreateCpu(config, fabric.TransportFor(0), Options());
        using EpLowLatencyLayer rank1 = EpLowLatencyLayer.CreateCpu(format ? config.ForRank(1) : new EpConfig(4, 256, 2, 4, 1, 2, 2), fabric.TransportFor(1), Options());
        int[] ids = [0, 3];
        Task<LowLatencyDispatchResult> a = Task.Run(() => rank0.DispatchAsync(Tensor.Create(new BFloat16[128], [1, 128]), Tensor.Create(ids, [1, 2]), cancellationToken: ct).AsTask(), ct);
        Task<LowLatencyDispatchResult> b = Task.Run(() => rank1.DispatchAsync(Tensor.Create(new BFloat16[format ? 128 : 256], [1, format ? 128 : 256]), Tensor.Create(ids, [1, 2]), null, format ? LowLatencyDispatchOptions.Fp8 : null, ct).AsTask(), ct);
        EpConfigMismatchException ea = await Assert.ThrowsAsync<EpConfigMismatchException>(() => a);
        EpConfigMismatchException eb = await Assert.ThrowsAsync<EpConfigMismatchException>(() => b);
        Assert.Contains(format ? "rank 1 dispatched Fp8, rank 0 Bf16" : "rank 1 has (MaxTokens, Hidden, NumExperts, WorldSize) = (4, 256, 4, 2)", ea.Message, StringComparison.Ordinal);
        Assert.Contains("rank 0", eb.Message, StringComparison.Ordinal);
    }

    internal static EpLowLatencyOptions Options() => new() { StepTimeout = TimeSpan.FromSeconds(20) };

    private static async Task RejectedWhileOthersWaitAsync(LowLatencyStep step, Func<EpLowLatencyLayer, ValueTask> call, string argument, string rule)
    {
        using InProcessLowLatencyGroup group = new(step.Config, Options());
        Task<LowLatencyDispatchResult>[] others = [.. Enumerable.Range(0, step.Config.WorldSize).Where(r => r != BadRank).Select(r =>
            Task.Run(() => step.DispatchAsync(group.Layers[r], r).AsTask(), TestContext.Current.CancellationToken))];
        ArgumentException e = await Assert.ThrowsAnyAsync<ArgumentException>(() => call(group.Layers[BadRank]).AsTask());
        AssertNames(e, argument, rule);
        Assert.All(others, t => Assert.False(t.IsCompleted, $"seed {step.Seed}: a peer finished the dispatch without the bad rank"));

        LowLatencyDispatchResult mine = await step.DispatchAsync(group.Layers[BadRank], BadRank);
        LowLatencyDispatchResult[] theirs = await Task.WhenAll(others);
        LowLatencyDispatchResult[] got = [.. Enumerable.Range(0, step.Config.WorldSize).Select(r => r == BadRank ? mine : theirs[r < BadRank ? r : r - 1])];
        for (int r = 0; r < got.Length; r++)
        {
            step.AssertDispatch(r, got[r]);
        }

        Tensor<BFloat16>[] combined = await group.RunAsync((l, r) => step.CombineAsync(l, r, got[r]));
        for (int r = 0; r < combined.Length; r++)
        {
            step.AssertCombine(r, combined[r]);
        }

        Assert.Equal(0, group.Fabric.PendingMessages);
    }

    private static void AssertNames(ArgumentException e, string argument, string rule)
    {
        Assert.Equal(argument, e.ParamName);
        Assert.Contains(rule, e.Message, StringComparison.Ordinal);
    }

    private static (Func<EpLowLatencyLayer, ValueTask> Call, string Argument, string Rule) Bad(Func<EpLowLatencyLayer, ValueTask> call, string argument, string rule) =>
        (call, argument, rule);

    private static T[] With<T>(T[] values, int index, T value)
    {
        T[] copy = [.. values];
        copy[index] = value;
        return copy;
    }

    private static Tensor<int> Ids(int[] ids, int n, int k) => Tensor.Create(ids, [n, k]);
}

internal static class TaskDiscard
{
    public static async ValueTask Discard<T>(this Task<T> task) => await task;
}

using System.Globalization;
using EpA2A.Config;

namespace EpA2A.Tools.GpuCheck;

/// <summary>
/// One case of `epa2a-tools gpu-check`: a layer configuration and the character of its random routing. The cases of a
/// group share one NVSHMEM job (one process per rank), so they share the world size.
/// </summary>
internal sealed record GpuCheckCase(
    string Group,
    string Name,
    int World,
    int Local,
    int TopK,
    int Experts,
    int Hidden,
    int MaxTokens,
    TokenType Type = TokenType.BFloat16,
    bool LocalCombine = false,
    int Alignment = 1,
    double Drop = 0,
    bool Skewed = false,
    bool Weights = false,
    bool Weighted = false,
    bool Scatter = false,
    bool UseAot = false,
    int Capacity = 2,
    bool Fault = false,
    bool Large = false,
    bool RandomTokens = false,
    bool Graph = false,
    bool LowLatency = false,
    bool Fp8 = false,
    bool PowerOfTwo = false,
    bool ZeroCopy = false,
    int BadIdRank = -1,
    int RejectRank = -1,
    bool RejectCombine = false)
{
    /// <summary>
    /// Large cases give every rank MaxTokens tokens (rank 0 only with <see cref="RandomTokens"/>; the others then draw
    /// from [MaxTokens/2, MaxTokens]) and skip the in-process CPU group (too big for every process).
    /// </summary>
    public bool CompareWithCpu => !Large && !LowLatency;

    /// <summary>A rejection case: rank <see cref="RejectRank"/> rejects its dispatch (or combine) input; the others must fail at once.</summary>
    public bool Rejects => RejectRank >= 0;

    public TimeSpan Timeout => Fault ? TimeSpan.FromMilliseconds(300) : Rejects ? TimeSpan.FromSeconds(10) : TimeSpan.FromSeconds(Large ? 60 : 20);

    public int TimedSteps => Fault || Rejects ? 0 : Large ? 5 : 20;

    /// <summary>
    /// What one rank process of this case may need, from its work: a fixed part (layer create and destroy, JIT,
    /// steps, the fault's timeouts; more for graph captures and the in-process CPU group) plus its host elements
    /// at a pessimistic 40 M a second (about a fifth of what one core did on a 2-core VM) (every rank's tokens drawn, then this rank's reference combine, received
    /// rows, expert outputs and checks, each about max tokens x top-k x hidden). Group deadlines add these up.
    /// </summary>
    public TimeSpan Budget
    {
        get
        {
            double draw = (double)World * MaxTokens * Hidden;
            double mine = 4.0 * MaxTokens * TopK * Hidden;
            double seconds = 10 + (Graph ? 15 : 0) + (CompareWithCpu ? 5 : 0) + ((draw + mine) / 40e6);
            return TimeSpan.FromSeconds(Math.Ceiling(seconds));
        }
    }

    public string TypeName => TokenTypeInfo.Name(Type);

    public string Flags => string.Join(' ', new[]
    {
        LocalCombine ? "lc" : null,
        Weights ? "weights" : null,
        Weighted ? "weighted" : null,
        Scatter ? "scatter" : null,
        Alignment > 1 ? string.Create(CultureInfo.InvariantCulture, $"align{Alignment}") : null,
        Drop > 0 ? string.Create(CultureInfo.InvariantCulture, $"drop{Drop:0.#}") : null,
        Skewed ? "skewed" : null,
        Capacity == 1 ? "capacity1" : null,
        UseAot ? "aot" : null,
        Graph ? "graph" : null,
        LowLatency ? "ll" : null,
        Fp8 ? "fp8" : null,
        PowerOfTwo ? "pow2" : null,
        ZeroCopy ? "zero-copy" : null,
        BadIdRank >= 0 ? "bad-id" : null,
        Rejects ? (RejectCombine ? "reject-combine" : "reject-dispatch") : null,
    }.Where(f => f is not null));

    public EpConfig Config(int rank) => new(
        MaxTokens, Hidden, TopK, Experts, rank, World, Local, Type, enableLocalCombine: LocalCombine, useAot: UseAot, expertAlignment: Alignment);

    /// <summary>Every case, by group: w1 (one rank), w2, w4, w8 (intra-node), inter (8 ranks, 2 and 4 per node), graph (fixed capacity, CUDA graphs, caller-thread calls), big (the four sizes), ll2, ll4, ll8 (the low-latency layer).</summary>
    public static IReadOnlyList<GpuCheckCase> All { get; } =
    [
        new("w1", "single rank bf16 align4 weighted", 1, 1, 4, 8, 256, 64, Alignment: 4, Drop: 0.2, Weights: true, Weighted: true),
        new("w1", "single rank fp16 scatter", 1, 1, 2, 4, 128, 48, TokenType.Float16, Weights: true, Scatter: true),
        new("w2", "intra bf16 drop.1 weights", 2, 2, 2, 8, 512, 128, Drop: 0.1, Weights: true),
        new("w2", "intra fp32 weighted", 2, 2, 3, 8, 256, 96, TokenType.Float32, Weights: true, Weighted: true),
        new("w4", "intra bf16 local-combine weighted", 4, 4, 4, 16, 1024, 200, LocalCombine: true, Drop: 0.2, Weights: true, Weighted: true),
        new("w4", "intra fp16 align16 weighted", 4, 4, 3, 16, 768, 150, TokenType.Float16, Alignment: 16, Weights: true, Weighted: true),
        new("w4", "intra bf16 scatter+weights", 4, 4, 4, 16, 512, 128, Drop: 0.3, Weights: true, Scatter: true),
        new("w4", "grow (skewed, capacity 1)", 4, 4, 4, 16, 256, 128, Skewed: true, Capacity: 1),
        new("w4", "fault: rank 3 never arrives", 4, 4, 2, 8, 256, 64, Fault: true),
        new("w4", "reject: rank 2's dispatch input (expert id -6)", 4, 4, 2, 8, 256, 64, Weights: true, RejectRank: 2),
        new("w4", "reject: rank 1's combine input (a row too many)", 4, 4, 2, 8, 256, 64, Weights: true, Weighted: true, RejectRank: 1, RejectCombine: true),
        new("w8", "intra bf16 E64 top-8", 8, 8, 8, 64, 2048, 256),
        new("w8", "intra bf16 local-combine weighted", 8, 8, 6, 32, 1024, 192, LocalCombine: true, Drop: 0.2, Weights: true, Weighted: true),
        new("inter", "inter L=2 bf16 weighted", 8, 2, 4, 32, 1024, 192, Drop: 0.2, Weights: true, Weighted: true),
        new("inter", "inter L=4 fp32 align8 weighted", 8, 4, 4, 32, 512, 128, TokenType.Float32, Alignment: 8, Weights: true, Weighted: true),
        new("inter", "inter reject: rank 6's dispatch input (expert id -6)", 8, 4, 4, 32, 256, 64, RejectRank: 6),
        new("inter", "inter reject: rank 5's combine input (a row too many)", 8, 4, 4, 32, 256, 64, Weights: true, Weighted: true, RejectRank: 5, RejectCombine: true),
        new("graph", "graph capture + caller-thread calls, bf16 weighted", 4, 4, 4, 16, 512, 128, Weights: true, Weighted: true, Graph: true),
        new("graph", "graph capture + caller-thread calls, inter L=2 fp16", 4, 2, 4, 16, 256, 96, TokenType.Float16, Weights: true, Graph: true),
        new("ll2", "ll bf16 weighted", 2, 2, 4, 16, 512, 48, Drop: 0.1, Weights: true, Weighted: true, LowLatency: true),
        new("ll2", "ll fp8 weighted zero-copy", 2, 2, 8, 32, 1024, 40, Weights: true, Weighted: true, LowLatency: true, Fp8: true, ZeroCopy: true),
        new("ll2", "ll fp8 pow2 plain", 2, 2, 6, 16, 768, 32, Drop: 0.2, LowLatency: true, Fp8: true, PowerOfTwo: true),
        new("ll2", "ll fault: rank 1 never sends", 2, 2, 2, 8, 256, 16, Weights: true, Weighted: true, Fault: true, LowLatency: true),
        new("ll4", "ll bf16 skewed weighted", 4, 4, 4, 32, 1024, 64, Skewed: true, Drop: 0.1, Weights: true, Weighted: true, LowLatency: true),
        new("ll4", "ll fp8 weighted", 4, 4, 8, 32, 2048, 32, Weights: true, Weighted: true, LowLatency: true, Fp8: true),
        new("ll4", "ll fp8 pow2 zero-copy bad id on rank 2", 4, 4, 4, 16, 512, 32, Weights: true, Weighted: true, LowLatency: true, Fp8: true, PowerOfTwo: true, ZeroCopy: true, BadIdRank: 2),
        new("ll4", "ll inter-node config refused", 4, 2, 4, 16, 256, 16, LowLatency: true),
        new("ll4", "ll fault: rank 3 never sends", 4, 4, 2, 8, 256, 16, Weights: true, Weighted: true, Fault: true, LowLatency: true, Fp8: true),
        new("ll8", "ll bf16 weighted top-8 E64", 8, 8, 8, 64, 2048, 32, Weights: true, Weighted: true, LowLatency: true),
        new("ll8", "ll fp8 weighted zero-copy top-8 E64", 8, 8, 8, 64, 2048, 32, Weights: true, Weighted: true, LowLatency: true, Fp8: true, ZeroCopy: true),
        new("ll8", "ll fp8 pow2 skewed", 8, 8, 8, 64, 1024, 32, Skewed: true, Drop: 0.1, Weights: true, LowLatency: true, Fp8: true, PowerOfTwo: true),
        new("ll8", "ll fault: rank 7 never sends", 8, 8, 2, 16, 256, 16, Weights: true, Weighted: true, Fault: true, LowLatency: true),
        new("big", "8192x7168 top-8 E256", 8, 8, 8, 256, 7168, 8192, Large: true),
        new("big", "4096x6144 top-6 drop.3 scatter+weights", 8, 8, 6, 256, 6144, 4096, Drop: 0.3, Weights: true, Weighted: true, Scatter: true, Large: true),
        new("big", "8192x7168 top-8 E256 UseAot", 8, 8, 8, 256, 7168, 8192, UseAot: true, Large: true),
        new("big", "32768x1536 top-8 E384 drop.3 local-combine, ranks 1-7 fewer tokens", 8, 8, 8, 384, 1536, 32768, LocalCombine: true, Drop: 0.3, Capacity: 1, Large: true, RandomTokens: true),
        new("big", "32768x1536 top-8 E384 drop.3 local-combine", 8, 8, 8, 384, 1536, 32768, LocalCombine: true, Drop: 0.3, Capacity: 1, Large: true),
    ];

    /// <summary>Every group (w1, one rank, is not in the default run).</summary>
    public static IReadOnlyList<string> Groups { get; } = ["w1", "w2", "w4", "w8", "inter", "graph", "big", "ll2", "ll4", "ll8"];

    /// <summary>What `--groups all` runs, in order.</summary>
    public static IReadOnlyList<string> DefaultGroups { get; } = ["w2", "w4", "w8", "inter", "graph", "big", "ll2", "ll4", "ll8"];

    /// <summary>The cases of <paramref name="group"/>, optionally only those whose name contains one of <paramref name="filter"/>'s comma-separated parts.</summary>
    public static GpuCheckCase[] Of(string group, string? filter) =>
        [.. All.Where(c => c.Group == group && (string.IsNullOrEmpty(filter) || filter.Split(',').Any(f => c.Name.Contains(f, StringComparison.OrdinalIgnoreCase))))];

    /// <summary>The data seed of a case: the same on every rank, different per case.</summary>
    public int Seed(int runSeed) => unchecked((runSeed * 131) + All.ToList().IndexOf(this));

    /// <summary>The deadline of a group's rank processes: start-up (runtime, NVSHMEM bootstrap) plus 1.5 times its cases' budgets.</summary>
    public static TimeSpan GroupDeadline(IEnumerable<GpuCheckCase> cases) =>
        TimeSpan.FromSeconds(60 + Math.Ceiling(1.5 * cases.Sum(c => c.Budget.TotalSeconds)));
}

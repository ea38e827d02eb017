using EpA2A.Config;
using EpA2A.Numerics;

namespace EpA2A.Experts.SwiGlu;

/// <summary>
/// The bf16 weights of a contiguous range of SwiGLU experts (one rank's local experts): for each expert, gate and up
/// projections [Ffn, Hidden] and a down projection [Hidden, Ffn], row-major. Expert e computes
/// down( silu(gate x) * (up x) ). Immutable once made.
/// </summary>
public sealed class SwiGluWeights
{
    private readonly BFloat16[][] gate;
    private readonly BFloat16[][] up;
    private readonly BFloat16[][] down;

    /// <summary>Weights of experts FirstExpert..FirstExpert+count-1; the arrays are taken, not copied.</summary>
    /// <exception cref="ArgumentException">A dimension is not positive, or an array is not of its projection's size.</exception>
    public SwiGluWeights(int hidden, int ffn, int firstExpert, BFloat16[][] gate, BFloat16[][] up, BFloat16[][] down)
    {
        ArgumentNullException.ThrowIfNull(gate);
        ArgumentNullException.ThrowIfNull(up);
        ArgumentNullException.ThrowIfNull(down);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(hidden);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(ffn);
        ArgumentOutOfRangeException.ThrowIfNegative(firstExpert);
        if ((long)hidden * ffn > Array.MaxLength)
        {
            throw new ArgumentException($"hidden {hidden} x ffn {ffn} elements do not fit one projection array", nameof(ffn));
        }

        if (gate.Length == 0 || up.Length != gate.Length || down.Length != gate.Length)
        {
            throw new ArgumentException($"gate, up and down must hold the same, positive number of experts; they hold {gate.Length}, {up.Length} and {down.Length}", nameof(gate));
        }

        for (int j = 0; j < gate.Length; j++)
        {
            Require(gate[j], hidden * ffn, firstExpert + j, "gate_proj", nameof(gate));
            Require(up[j], hidden * ffn, firstExpert + j, "up_proj", nameof(up));
            Require(down[j], hidden * ffn, firstExpert + j, "down_proj", nameof(down));
        }

        Hidden = hidden;
        Ffn = ffn;
        FirstExpert = firstExpert;
        this.gate = gate;
        this.up = up;
        this.down = down;
    }

    /// <summary>Elements per token (the model dimension).</summary>
    public int Hidden { get; }

    /// <summary>The FFN's intermediate dimension.</summary>
    public int Ffn { get; }

    /// <summary>The global id of the first expert held.</summary>
    public int FirstExpert { get; }

    /// <summary>Experts held.</summary>
    public int ExpertCount => gate.Length;

    /// <summary>Gate projection of local expert <paramref name="local"/>: [Ffn, Hidden].</summary>
    public ReadOnlySpan<BFloat16> Gate(int local) => gate[local];

    /// <summary>Up projection of local expert <paramref name="local"/>: [Ffn, Hidden].</summary>
    public ReadOnlySpan<BFloat16> Up(int local) => up[local];

    /// <summary>Down projection of local expert <paramref name="local"/>: [Hidden, Ffn].</summary>
    public ReadOnlySpan<BFloat16> Down(int local) => down[local];

    /// <summary>
    /// Random weights of experts [firstExpert, firstExpert + count), uniform and scaled so that unit-variance inputs give
    /// outputs of about unit variance: gate and up in ±sqrt(3 / hidden) (so gate x and up x have about unit variance),
    /// down in ±1.7 sqrt(3 / ffn) (silu(g) u has an rms of about 0.6 for unit-variance g and u). Expert e's weights
    /// depend only on (seed, e, hidden, ffn), not on the range asked for: every split of the experts over ranks agrees.
    /// </summary>
    public static SwiGluWeights Random(int hidden, int ffn, int firstExpert, int count, int seed)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(hidden);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(ffn);
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(count);
        ArgumentOutOfRangeException.ThrowIfNegative(firstExpert);
        float inScale = MathF.Sqrt(3f / hidden);
        float outScale = 1.7f * MathF.Sqrt(3f / ffn);
        BFloat16[][] gate = new BFloat16[count][];
        BFloat16[][] up = new BFloat16[count][];
        BFloat16[][] down = new BFloat16[count][];
        for (int j = 0; j < count; j++)
        {
            // Not HashCode.Combine: that is randomized per process, and every process must draw the same experts.
            System.Random rng = new(unchecked((seed * 1_000_003) + firstExpert + j));
            gate[j] = Uniform(rng, hidden * ffn, inScale);
            up[j] = Uniform(rng, hidden * ffn, inScale);
            down[j] = Uniform(rng, hidden * ffn, outScale);
        }

        return new SwiGluWeights(hidden, ffn, firstExpert, gate, up, down);
    }

    /// <summary>
    /// Refuses a layer these weights cannot serve: its hidden size differs, or rank <see cref="EpConfig.Rank"/>'s local
    /// experts (Rank x ExpertsPerRank onwards) are not the ones held.
    /// </summary>
    /// <exception cref="ArgumentException">The layer and the weights disagree; the message names both.</exception>
    public void RequireServes(EpConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        if (config.Hidden != Hidden)
        {
            throw new ArgumentException($"the layer's Hidden is {config.Hidden}, the SwiGLU weights' hidden is {Hidden}", nameof(config));
        }

        int first = config.Rank * config.ExpertsPerRank;
        if (first != FirstExpert || config.ExpertsPerRank != ExpertCount)
        {
            throw new ArgumentException(
                $"rank {config.Rank} of the layer serves experts {first}..{first + config.ExpertsPerRank - 1} (NumExperts {config.NumExperts} over {config.WorldSize} ranks), the SwiGLU weights hold experts {FirstExpert}..{FirstExpert + ExpertCount - 1}",
                nameof(config));
        }
    }

    private static BFloat16[] Uniform(System.Random rng, int count, float scale)
    {
        BFloat16[] values = new BFloat16[count];
        for (int i = 0; i < count; i++)
        {
            values[i] = BFloat16.FromSingle(((2f * rng.NextSingle()) - 1f) * scale);
        }

        return values;
    }

    private static void Require(BFloat16[]? values, int length, int expert, string projection, string argument)
    {
        if (values is null || values.Length != length)
        {
            throw new ArgumentException($"expert {expert}: {projection} has {values?.Length ?? 0} elements, expected {length}", argument);
        }
    }
}

using EpA2A.Config;

namespace EpA2A.LowLatency;

/// <summary>
/// The rules a configuration must keep for the low-latency layer, here rather than in the layer so that a grain contract
/// (LayerSpec) checks them without referencing it. A failure is an <see cref="ArgumentException"/> naming the argument
/// and the rule.
/// </summary>
public static class LowLatencyConfigRules
{
    /// <summary>bf16 tokens, one node, the fixed layout, a receive buffer that fits an array.</summary>
    /// <exception cref="ArgumentException">The config breaks one of them.</exception>
    public static void Check(EpConfig config)
    {
        ArgumentNullException.ThrowIfNull(config);
        if (config.TokenType != TokenType.BFloat16)
        {
            throw new ArgumentException($"EpConfig.TokenType = {config.TokenType}: the low-latency layer moves bf16 tokens (bf16 or FP8 on the wire)", nameof(config));
        }

        if (!config.IsIntraNode)
        {
            throw new ArgumentException(
                $"EpConfig.LocalWorldSize = {config.LocalWorldSize} is below WorldSize = {config.WorldSize}: the low-latency layer is intra-node only (every rank a direct peer); use the normal EpAll2AllLayer, whose inter-node algorithm covers several nodes",
                nameof(config));
        }

        if (config.ExpertAlignment != 1 || config.EnableLocalCombine)
        {
            throw new ArgumentException("EpConfig.ExpertAlignment and EnableLocalCombine are normal-mode options: the low-latency layout is fixed ([ExpertsPerRank, WorldSize*MaxTokens, Hidden], compact from row 0)", nameof(config));
        }

        long rows = (long)config.ExpertsPerRank * config.WorldSize * config.MaxTokens;
        if (rows * config.Hidden > Array.MaxLength)
        {
            throw new ArgumentException($"the receive buffer [ExpertsPerRank={config.ExpertsPerRank}, WorldSize*MaxTokens={config.WorldSize * config.MaxTokens}, Hidden={config.Hidden}] exceeds the largest array", nameof(config));
        }
    }

    /// <summary>A known format; FP8 needs Hidden a multiple of the scale group.</summary>
    /// <exception cref="ArgumentException">The format is unknown, or FP8 on a Hidden it cannot scale.</exception>
    public static void CheckFormat(EpConfig config, LowLatencyDispatchOptions options)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(options);
        if (!Enum.IsDefined(options.Format))
        {
            throw new ArgumentException($"LowLatencyDispatchOptions.Format = {options.Format} is not Bf16 or Fp8", nameof(options));
        }

        if (options.Format == LowLatencyFormat.Fp8 && config.Hidden % LowLatencyDispatchOptions.ScaleGroup != 0)
        {
            throw new ArgumentException($"FP8 dispatch needs EpConfig.Hidden to be a multiple of {LowLatencyDispatchOptions.ScaleGroup} (one scale per {LowLatencyDispatchOptions.ScaleGroup} channels); it is {config.Hidden}", nameof(options));
        }
    }
}

using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Layer;
using EpA2A.LowLatency;
using EpA2A.Numerics;

namespace EpA2A.Experts;

/// <summary>
/// Runs a rank's experts between dispatch and combine: from the received rows (grouped by local expert, as
/// the layout describes) to one output row per received row, in the same order.
/// </summary>
public interface IExpertCompute
{
    /// <summary>
    /// Refuses, with an <see cref="ArgumentException"/> naming the mismatch, a layer these experts cannot serve (e.g.
    /// weights of another hidden size or expert range); called when the rank creates the layer, before any step.
    /// </summary>
    void ValidateLayer(string layer, EpConfig config)
    {
    }

    /// <summary>Computes the expert outputs, [layout.RecvRows, Hidden].</summary>
    ValueTask<Tensor<T>> ComputeAsync<T>(string layer, EpConfig config, DispatchResult<T> dispatched, CancellationToken cancellationToken)
        where T : unmanaged;

    /// <summary>
    /// Low-latency layers: from the expert-major rows [ExpertsPerRank, WorldSize*MaxTokens, Hidden] (bf16, or FP8 with
    /// scales; rows below RowsPerExpert[j] of block j) to bf16 outputs in the same layout (only those rows are read).
    /// </summary>
    ValueTask<Tensor<BFloat16>> ComputeLowLatencyAsync(string layer, EpConfig config, LowLatencyDispatchResult dispatched, CancellationToken cancellationToken) =>
        throw new NotSupportedException($"{GetType().Name} has no low-latency expert path");
}

/// <summary>The built-in <see cref="IExpertCompute"/>: <see cref="DeterministicExperts"/>, each expert a different affine map.</summary>
public sealed class DeterministicExpertCompute : IExpertCompute
{
    /// <inheritdoc />
    public ValueTask<Tensor<T>> ComputeAsync<T>(string layer, EpConfig config, DispatchResult<T> dispatched, CancellationToken cancellationToken)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(dispatched);
        // The received rows are read where they lie (the layer's output buffer), not copied first.
        ReadOnlySpan<T> rows = DenseTensor.TryGetRowMajorSpan(dispatched.Output, out ReadOnlySpan<T> dense) ? dense : DenseTensor.ToArray(dispatched.Output);
        EpAllToAllLayout layout = dispatched.Layout;
        T[] output = DeterministicExperts.ApplyToBlocks<T>(rows, config.Hidden, config.Rank * config.ExpertsPerRank, layout.ExpertRowStarts, layout.RowsPerLocalExpert);
        return ValueTask.FromResult(Tensor.Create(output, [layout.RecvRows, config.Hidden]));
    }

    /// <inheritdoc />
    public ValueTask<Tensor<BFloat16>> ComputeLowLatencyAsync(string layer, EpConfig config, LowLatencyDispatchResult dispatched, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(dispatched);
        BFloat16[] output = DeterministicExperts.ApplyToLowLatencyBlocks(config, dispatched);
        return ValueTask.FromResult(Tensor.Create(output, [config.ExpertsPerRank, config.WorldSize * config.MaxTokens, config.Hidden]));
    }
}

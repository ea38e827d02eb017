using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Layer;
using EpA2A.LowLatency;
using EpA2A.Numerics;

namespace EpA2A.Experts;

/// <summary>
/// A fault drill: another <see cref="IExpertCompute"/> that first waits <see cref="Delay"/> every step (a
/// straggler rank, e.g. `epa2a silo --expert-delay-ms`). The wait observes the step's cancellation, so an abort
/// or deadline ends it at once.
/// </summary>
public sealed class DelayedExpertCompute(IExpertCompute inner, TimeSpan delay) : IExpertCompute
{
    /// <summary>How long each step's experts wait before computing.</summary>
    public TimeSpan Delay { get; } = delay >= TimeSpan.Zero ? delay : throw new ArgumentOutOfRangeException(nameof(delay), delay, "the delay must not be negative");

    /// <inheritdoc />
    public void ValidateLayer(string layer, EpConfig config) => inner.ValidateLayer(layer, config);

    /// <inheritdoc />
    public async ValueTask<Tensor<T>> ComputeAsync<T>(string layer, EpConfig config, DispatchResult<T> dispatched, CancellationToken cancellationToken)
        where T : unmanaged
    {
        await Task.Delay(Delay, cancellationToken).ConfigureAwait(false);
        return await inner.ComputeAsync(layer, config, dispatched, cancellationToken).ConfigureAwait(false);
    }

    /// <inheritdoc />
    public async ValueTask<Tensor<BFloat16>> ComputeLowLatencyAsync(string layer, EpConfig config, LowLatencyDispatchResult dispatched, CancellationToken cancellationToken)
    {
        await Task.Delay(Delay, cancellationToken).ConfigureAwait(false);
        return await inner.ComputeLowLatencyAsync(layer, config, dispatched, cancellationToken).ConfigureAwait(false);
    }
}

using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Experts;
using EpA2A.Layer;

namespace EpA2A.Cluster.Tests;

/// <summary>
/// The built-in experts, except that on layers named "stall-*" rank 1 takes far longer than the step
/// deadline: a real straggler inside a real step, so the other ranks' combine waits must end by themselves.
/// </summary>
public sealed class StallingExpertCompute : IExpertCompute
{
    public static readonly TimeSpan Stall = TimeSpan.FromSeconds(60);
    private readonly DeterministicExpertCompute inner = new();

    public async ValueTask<Tensor<T>> ComputeAsync<T>(string layer, EpConfig config, DispatchResult<T> dispatched, CancellationToken cancellationToken)
        where T : unmanaged
    {
        if (layer.StartsWith("stall-", StringComparison.Ordinal) && config.Rank == 1)
        {
            await Task.Delay(Stall, cancellationToken);
        }

        return await inner.ComputeAsync(layer, config, dispatched, cancellationToken);
    }
}

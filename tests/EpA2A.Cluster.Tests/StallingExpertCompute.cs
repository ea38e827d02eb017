using System.Collections.Concurrent;
using System.Numerics.Tensors;
using EpA2A.Config;
using EpA2A.Experts;
using EpA2A.Layer;
using EpA2A.LowLatency;
using EpA2A.Numerics;

namespace EpA2A.Cluster.Tests;

/// <summary>
/// The built-in experts, with faults: on layers named "stall-*" rank 1 takes far longer than the step deadline
/// (a real straggler inside a real step, so the other ranks' combine waits must end by themselves); on layers
/// named "slow-*" rank 1 takes <see cref="Slow"/>, well within the deadline (a step that is surely still in
/// flight a moment after it began); on layers named "wrongrows-*" rank 2's first step returns one row too many
/// (combine input of the wrong row count, from a buggy expert plugin).
/// </summary>
public sealed class StallingExpertCompute : IExpertCompute
{
    public static readonly TimeSpan Stall = TimeSpan.FromSeconds(60);
    public static readonly TimeSpan Slow = TimeSpan.FromMilliseconds(500);
    private readonly DeterministicExpertCompute inner = new();
    private readonly ConcurrentDictionary<string, bool> wrongOnce = new();

    public async ValueTask<Tensor<T>> ComputeAsync<T>(string layer, EpConfig config, DispatchResult<T> dispatched, CancellationToken cancellationToken)
        where T : unmanaged
    {
        if (layer.StartsWith("stall-", StringComparison.Ordinal) && config.Rank == 1)
        {
            await Task.Delay(Stall, cancellationToken);
        }

        if (layer.StartsWith("slow-", StringComparison.Ordinal) && config.Rank == 1)
        {
            await Task.Delay(Slow, cancellationToken);
        }

        Tensor<T> output = await inner.ComputeAsync(layer, config, dispatched, cancellationToken);
        if (layer.StartsWith("wrongrows-", StringComparison.Ordinal) && config.Rank == 2 && wrongOnce.TryAdd(layer, true))
        {
            T[] rows = new T[(int)output.FlattenedLength + config.Hidden];
            output.FlattenTo(rows);
            return Tensor.Create(rows, [(int)output.Lengths[0] + 1, config.Hidden]);
        }

        return output;
    }

    /// <summary>Low-latency layers: the built-in experts, rank 1 stalling on "stall-*" layers.</summary>
    public async ValueTask<Tensor<BFloat16>> ComputeLowLatencyAsync(string layer, EpConfig config, LowLatencyDispatchResult dispatched, CancellationToken cancellationToken)
    {
        if (layer.StartsWith("stall-", StringComparison.Ordinal) && config.Rank == 1)
        {
            await Task.Delay(Stall, cancellationToken);
        }

        return await inner.ComputeLowLatencyAsync(layer, config, dispatched, cancellationToken);
    }
}

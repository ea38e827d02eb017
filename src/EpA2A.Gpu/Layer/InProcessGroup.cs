using EpA2A.Config;
using EpA2A.Transport;

namespace EpA2A.Layer;

/// <summary>
/// Every rank of a group in one process on the CPU backend: one layer per rank over a shared
/// <see cref="InProcessFabric"/>. Runs a collective operation on all ranks at once.
/// </summary>
public sealed class InProcessGroup : IDisposable
{
    private readonly EpAll2AllLayer[] layers;

    /// <summary>Creates a layer for every rank of <paramref name="config"/>'s group (its Rank is ignored).</summary>
    public InProcessGroup(EpConfig config, EpLayerOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        Fabric = new InProcessFabric(config.WorldSize);
        layers = new EpAll2AllLayer[config.WorldSize];
        for (int r = 0; r < config.WorldSize; r++)
        {
            layers[r] = EpAll2AllLayer.CreateCpu(config.ForRank(r), Fabric.TransportFor(r), options);
        }
    }

    /// <summary>The fabric the ranks share.</summary>
    public InProcessFabric Fabric { get; }

    /// <summary>The layer of each rank.</summary>
    public IReadOnlyList<EpAll2AllLayer> Layers => layers;

    /// <summary>Runs <paramref name="operation"/> on every rank concurrently; results in rank order.</summary>
    public async Task<TResult[]> RunAsync<TResult>(Func<EpAll2AllLayer, int, ValueTask<TResult>> operation)
    {
        ArgumentNullException.ThrowIfNull(operation);
        Task<TResult>[] tasks = new Task<TResult>[layers.Length];
        for (int r = 0; r < layers.Length; r++)
        {
            int rank = r;
            tasks[r] = Task.Run(() => operation(layers[rank], rank).AsTask());
        }

        return await Task.WhenAll(tasks).ConfigureAwait(false);
    }

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (EpAll2AllLayer layer in layers)
        {
            layer.Dispose();
        }
    }
}

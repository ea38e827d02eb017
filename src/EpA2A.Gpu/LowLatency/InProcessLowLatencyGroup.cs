using EpA2A.Config;
using EpA2A.Transport;

namespace EpA2A.LowLatency;

/// <summary>
/// Every rank of a low-latency group in one process on the CPU backend: one layer per rank over a shared
/// <see cref="InProcessFabric"/>. Runs a call on all ranks at once.
/// </summary>
public sealed class InProcessLowLatencyGroup : IDisposable
{
    private readonly EpLowLatencyLayer[] layers;

    /// <summary>Creates a layer for every rank of <paramref name="config"/>'s group (its Rank is ignored).</summary>
    public InProcessLowLatencyGroup(EpConfig config, EpLowLatencyOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(config);
        Fabric = new InProcessFabric(config.WorldSize);
        layers = new EpLowLatencyLayer[config.WorldSize];
        for (int r = 0; r < config.WorldSize; r++)
        {
            layers[r] = EpLowLatencyLayer.CreateCpu(config.ForRank(r), Fabric.TransportFor(r), options);
        }
    }

    /// <summary>The fabric the ranks share.</summary>
    public InProcessFabric Fabric { get; }

    /// <summary>The layer of each rank.</summary>
    public IReadOnlyList<EpLowLatencyLayer> Layers => layers;

    /// <summary>Runs <paramref name="call"/> on every rank concurrently; results in rank order.</summary>
    public async Task<TResult[]> RunAsync<TResult>(Func<EpLowLatencyLayer, int, ValueTask<TResult>> call)
    {
        ArgumentNullException.ThrowIfNull(call);
        Task<TResult>[] tasks = new Task<TResult>[layers.Length];
        for (int r = 0; r < layers.Length; r++)
        {
            int rank = r;
            tasks[r] = Task.Run(() => call(layers[rank], rank).AsTask());
        }

        return await Task.WhenAll(tasks).ConfigureAwait(false);
    }

    /// <summary>Runs <paramref name="call"/> on every rank concurrently.</summary>
    public Task RunAsync(Func<EpLowLatencyLayer, int, ValueTask> call)
    {
        ArgumentNullException.ThrowIfNull(call);
        return RunAsync<bool>(async (layer, r) =>
        {
            await call(layer, r).ConfigureAwait(false);
            return true;
        });
    }

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (EpLowLatencyLayer layer in layers)
        {
            layer.Dispose();
        }
    }
}

using System.Collections.Concurrent;
using EpA2A.Experts;
using EpA2A.Grains.Hosting;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Options;

namespace EpA2A.Grains.Ranks;

/// <summary>
/// The rank a silo serves: its layers and their buffers (on GPUs, its NVSHMEM runtime). One per silo; the
/// <see cref="RankGrain"/> activation on this silo is its front door. Steps run on the thread pool, never on
/// the Orleans scheduler.
/// </summary>
public sealed partial class RankRuntime(IOptions<RankSiloOptions> options, IGrainFactory grains, IExpertCompute compute, ILogger<RankRuntime> logger) : IDisposable
{
    private readonly ConcurrentDictionary<string, HostedLayer> layers = new();

    /// <summary>The silo's rank options.</summary>
    public RankSiloOptions Options { get; } = options.Value;

    /// <summary>Layers hosted now.</summary>
    public int LayerCount => layers.Count;

    internal HostedLayer? Find(string layer) => layers.GetValueOrDefault(layer);

    internal HostedLayer Get(string layer) =>
        layers.GetValueOrDefault(layer) ?? throw new InvalidOperationException($"rank {Options.Rank} of group '{Options.Group}' hosts no layer '{layer}' (not configured, or its silo restarted)");

    internal void CreateLayer(string name, LayerSpec spec, long epoch, int rank)
    {
        if (rank != Options.Rank)
        {
            throw new InvalidOperationException($"this silo serves rank {Options.Rank}, but was asked to host rank {rank}");
        }

        HostedLayer layer = new(name, spec, epoch, spec.ToConfig(rank), mailbox => new GrainRankTransport(grains, Options.Group, name, rank, Options.ChunkBytes, mailbox));
        if (layers.TryGetValue(name, out HostedLayer? old))
        {
            old.Abort();
            old.Dispose();
        }

        layers[name] = layer;
        LogCreated(logger, name, rank, epoch);
    }

    internal void DropLayer(string name)
    {
        if (layers.TryRemove(name, out HostedLayer? layer))
        {
            layer.Abort();
            layer.Dispose();
        }
    }

    internal Task<RankStepReport> RunStepAsync(string name, StepTicket ticket, bool weighted)
    {
        HostedLayer layer = Get(name);
        if (layer.Epoch != ticket.Epoch)
        {
            return Task.FromResult(new RankStepReport(Options.Rank, false, $"rank {Options.Rank} holds layer '{name}' of epoch {layer.Epoch}, the step is for epoch {ticket.Epoch}", Options.Rank, 0, 0, new Dictionary<string, double>()));
        }

        return Task.Run(() => layer.RunStepAsync(ticket, weighted, compute));
    }

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (HostedLayer layer in layers.Values)
        {
            layer.Dispose();
        }

        layers.Clear();
    }

    [LoggerMessage(Level = LogLevel.Information, Message = "layer {Layer} created on rank {Rank}, epoch {Epoch}")]
    private static partial void LogCreated(ILogger logger, string layer, int rank, long epoch);
}

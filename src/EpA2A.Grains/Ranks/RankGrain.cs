using EpA2A.Grains.Placement;
using Microsoft.Extensions.Logging;
using Orleans.Concurrency;

namespace EpA2A.Grains.Ranks;

/// <summary>
/// The front door of a silo's <see cref="RankRuntime"/>, pinned to that silo by <see cref="RankPlacementDirector"/>.
/// Step work runs on the thread pool; data for a running step interleaves with it.
/// </summary>
[RankPlacement]
internal sealed partial class RankGrain(RankRuntime runtime, ILogger<RankGrain> logger) : Grain, IRankGrain
{
    private int Rank => GrainKeys.ParseRank(this.GetPrimaryKeyString()).Rank;

    /// <summary>
    /// Says when and why this front door goes away: calls that reach it while it deactivates wait for it, so a
    /// deactivation in the middle of a step shows up as a rank that stopped answering.
    /// </summary>
    public override Task OnDeactivateAsync(DeactivationReason reason, CancellationToken cancellationToken)
    {
        LogDeactivated(logger, this.GetPrimaryKeyString(), reason.ReasonCode.ToString(), reason.Description);
        return Task.CompletedTask;
    }

    public Task<RankInfo> DescribeAsync() => Task.FromResult(new RankInfo(
        runtime.Options.Group,
        runtime.Options.Rank,
        RuntimeIdentity,
        runtime.Options.Gpu,
        runtime.Options.Backend,
        Environment.ProcessId,
        runtime.GpuInitialized,
        runtime.StepsInFlight,
        runtime.GpuJob));

    public Task<byte[]> CreateUniqueIdAsync() => Task.Run(runtime.CreateUniqueId);

    public Task InitializeGpuAsync(byte[] uniqueId, int worldSize) =>
        runtime.InitializeGpuAsync(uniqueId, worldSize, TimeSpan.FromSeconds(60));

    public Task RestartForFreshGpuJobAsync(string reason)
    {
        runtime.ExitForRestart(reason);
        return Task.CompletedTask;
    }

    public Task CreateLayerAsync(string layer, LayerSpec spec, long epoch)
    {
        ArgumentNullException.ThrowIfNull(spec);
        return runtime.CreateLayerAsync(layer, spec.Validated(), epoch, Rank);
    }

    public Task CreateMaskedLayerAsync(string layer, LayerSpec spec, long epoch, int[] masked)
    {
        ArgumentNullException.ThrowIfNull(spec);
        ArgumentNullException.ThrowIfNull(masked);
        return runtime.CreateLayerAsync(layer, spec.Validated(), epoch, Rank, masked);
    }

    public Task DropLayerAsync(string layer)
    {
        runtime.DropLayer(layer);
        return Task.CompletedTask;
    }

    public Task DeliverAsync(string layer, TransportChunk chunk)
    {
        ArgumentNullException.ThrowIfNull(chunk);
        runtime.Find(layer)?.Deliver(chunk);
        return Task.CompletedTask;
    }

    public Task BeginInputAsync(string layer, StepInputHeader header)
    {
        runtime.Get(layer).BeginInput(header);
        return Task.CompletedTask;
    }

    public Task StageStepInputAsync(string layer, StepInput input)
    {
        runtime.Get(layer).StageWhole(input);
        return Task.CompletedTask;
    }

    public Task StageInputAsync(string layer, long step, InputPart part, int offset, Immutable<byte[]> data)
    {
        runtime.Get(layer).Stage(step, part, offset, data.Value);
        return Task.CompletedTask;
    }

    public Task<RankStepReport> RunStepAsync(string layer, StepTicket ticket, bool weighted) => runtime.RunStepAsync(layer, ticket, weighted);

    public Task<Immutable<byte[]>> ReadOutputAsync(string layer, long step, int offset, int count) =>
        Task.FromResult(new Immutable<byte[]>(runtime.Get(layer).ReadOutput(step, offset, count)));

    public Task AbortAsync(string layer, long epoch, string reason)
    {
        if (runtime.Find(layer) is { } hosted && hosted.Epoch == epoch)
        {
            hosted.Abort();
        }

        return Task.CompletedTask;
    }

    [LoggerMessage(Level = LogLevel.Warning, Message = "rank grain {Key} deactivated on this silo ({Code}: {Description})")]
    private static partial void LogDeactivated(ILogger logger, string key, string code, string description);
}

using System.Collections.Concurrent;
using EpA2A.Cuda;
using EpA2A.Experts;
using EpA2A.Grains.Hosting;
using EpA2A.Layer;
using EpA2A.LowLatency;
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
    private NvshmemRuntime? gpu;
    private int stepsInFlight;
    private int exiting;

    /// <summary>The silo's rank options.</summary>
    public RankSiloOptions Options { get; } = options.Value;

    /// <summary>Layers hosted now.</summary>
    public int LayerCount => layers.Count;

    /// <summary>Steps running on this rank now (0 between steps: a failed step leaves nothing waiting).</summary>
    public int StepsInFlight => Volatile.Read(ref stepsInFlight);

    /// <summary>
    /// The exit code of a silo that leaves so that its supervisor restarts it with a fresh process (EX_TEMPFAIL): its
    /// NVSHMEM job lost a member and NVSHMEM cannot be initialized again in the same process.
    /// </summary>
    public const int RestartExitCode = 75;

    /// <summary>True once this rank has joined its group's NVSHMEM job (CUDA backend).</summary>
    public bool GpuInitialized => gpu is not null;

    /// <summary>Which NVSHMEM job this rank joined (a digest of its unique id); null before it joined.</summary>
    public string? GpuJob { get; private set; }

    private bool IsCuda => Options.Backend == EpBackendKind.Cuda;

    internal byte[] CreateUniqueId()
    {
        RequireCuda();
        if (Options.Rank != 0)
        {
            throw new InvalidOperationException($"rank {Options.Rank} asked for the NVSHMEM unique id; rank 0 makes it");
        }

        return NvshmemRuntime.CreateUniqueId();
    }

    /// <summary>Joins NVSHMEM; the blocking collective runs on the runtime's GPU thread, never on the Orleans scheduler.</summary>
    internal async Task InitializeGpuAsync(byte[] uniqueId, int worldSize, TimeSpan bound)
    {
        RequireCuda();
        if (gpu is not null)
        {
            return;
        }

        using CancellationTokenSource cts = new(bound);
        gpu = await NvshmemRuntime.InitializeAsync(uniqueId, Options.Rank, worldSize, Options.Gpu ?? 0, cts.Token).WaitAsync(bound).ConfigureAwait(false);
        GpuJob = Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(uniqueId), 0, 8);
        LogGpu(logger, Options.Rank, worldSize, Options.Gpu ?? 0);
    }

    /// <summary>
    /// Ends this process with <see cref="RestartExitCode"/> shortly after the calling grain call has answered, without
    /// disposing anything: the collective teardown of layers and NVSHMEM would wait forever for the member that is gone.
    /// Only a CUDA rank that already joined a job does this; any other rank ignores the request.
    /// </summary>
    internal void ExitForRestart(string reason)
    {
        if (!IsCuda || gpu is null || Interlocked.Exchange(ref exiting, 1) != 0)
        {
            return; // not a CUDA rank in a job, or already on its way out (the coordinator may ask every step)
        }

        LogRestart(logger, Options.Rank, GpuJob ?? "?", reason);
        _ = Task.Run(async () =>
        {
            await Task.Delay(200).ConfigureAwait(false);
            await Console.Out.FlushAsync().ConfigureAwait(false);
            await Console.Error.FlushAsync().ConfigureAwait(false);
            ProcessExit.Now(RestartExitCode);
        });
    }

    internal HostedLayer? Find(string layer) => layers.GetValueOrDefault(layer);

    internal HostedLayer Get(string layer) =>
        layers.GetValueOrDefault(layer) ?? throw new InvalidOperationException($"rank {Options.Rank} of group '{Options.Group}' hosts no layer '{layer}' (not configured, or its silo restarted)");

    /// <summary>Creates the layer: on the CUDA backend a collective (every rank at once), run off the scheduler.</summary>
    internal async Task CreateLayerAsync(string name, LayerSpec spec, long epoch, int rank, int[]? masked = null)
    {
        if (rank != Options.Rank)
        {
            throw new InvalidOperationException($"this silo serves rank {Options.Rank}, but was asked to host rank {rank}");
        }

        // The experts are the group's (a masked layer renumbers ranks, not experts): refuse a layer they cannot serve.
        compute.ValidateLayer(name, spec.ToConfig(rank));
        HostedLayer layer;
        if (masked is { Length: > 0 })
        {
            if (IsCuda)
            {
                throw new InvalidOperationException($"rank {rank} runs the cuda backend: a CUDA group is one NVSHMEM job and cannot re-form on a part of its ranks, so lost ranks cannot be masked");
            }

            MaskedWorld world = new(spec, masked);
            layer = new HostedLayer(name, spec, epoch, world.ToConfig(rank), (config, options, mailbox) =>
                EpAll2AllLayer.CreateCpu(config, new GrainRankTransport(grains, Options.Group, name, config.Rank, Options.ChunkBytes, mailbox, world.Members), options), rank, world);
        }
        else if (IsCuda)
        {
            NvshmemRuntime runtime = gpu ?? throw new InvalidOperationException($"rank {rank} has not joined NVSHMEM: the coordinator initializes the GPU before creating layers");
            layer = await Task.Run(() => new HostedLayer(
                name,
                spec,
                epoch,
                spec.ToConfig(rank),
                (config, options, _) => EpAll2AllLayer.CreateCuda(config, runtime, options),
                (config, options, _) => EpLowLatencyLayer.CreateCuda(config, runtime, options))).ConfigureAwait(false);
        }
        else
        {
            layer = new HostedLayer(
                name,
                spec,
                epoch,
                spec.ToConfig(rank),
                (config, options, mailbox) => EpAll2AllLayer.CreateCpu(config, new GrainRankTransport(grains, Options.Group, name, rank, Options.ChunkBytes, mailbox), options),
                (config, options, mailbox) => EpLowLatencyLayer.CreateCpu(config, new GrainRankTransport(grains, Options.Group, name, rank, Options.ChunkBytes, mailbox), options));
        }

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

        return CountedAsync(Task.Run(() => layer.RunStepAsync(ticket, weighted, compute)));
    }

    private async Task<RankStepReport> CountedAsync(Task<RankStepReport> step)
    {
        Interlocked.Increment(ref stepsInFlight);
        try
        {
            return await step.ConfigureAwait(false);
        }
        finally
        {
            Interlocked.Decrement(ref stepsInFlight);
        }
    }

    /// <inheritdoc />
    public void Dispose()
    {
        foreach (HostedLayer layer in layers.Values)
        {
            layer.Dispose();
        }

        layers.Clear();
        gpu?.Dispose();
    }

    private void RequireCuda()
    {
        if (!IsCuda)
        {
            throw new InvalidOperationException($"rank {Options.Rank} runs the '{Options.Backend.ToName()}' backend, not cuda");
        }
    }

    [LoggerMessage(Level = LogLevel.Warning, Message = "rank {Rank} leaves NVSHMEM job {Job} and exits for a restart: {Reason}")]
    private static partial void LogRestart(ILogger logger, int rank, string job, string reason);

    [LoggerMessage(Level = LogLevel.Information, Message = "rank {Rank} joined NVSHMEM: {World} ranks, GPU {Gpu}")]
    private static partial void LogGpu(ILogger logger, int rank, int world, int gpu);

    [LoggerMessage(Level = LogLevel.Information, Message = "layer {Layer} created on rank {Rank}, epoch {Epoch}")]
    private static partial void LogCreated(ILogger logger, string layer, int rank, long epoch);
}

/// <summary>Ends the process at once: no exit handlers, no finalizers, no disposal (see <see cref="RankRuntime.ExitForRestart"/>).</summary>
internal static partial class ProcessExit
{
    public static void Now(int code)
    {
        if (OperatingSystem.IsLinux() || OperatingSystem.IsMacOS())
        {
            Exit(code);
        }

        Environment.FailFast($"epa2a: exiting with {code} for a restart");
    }

    [System.Runtime.InteropServices.LibraryImport("libc", EntryPoint = "_exit")]
    private static partial void Exit(int status);
}

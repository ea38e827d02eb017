using System.Runtime.InteropServices;
using EpA2A.Config;
using EpA2A.Cuda;
using EpA2A.Layer;
using static EpA2A.Backends.Cuda.NativeMethods;

namespace EpA2A.Backends.Cuda;

/// <summary>
/// The CUDA + NVSHMEM backend: each phase of the layer's flow is a libepa2a call on the process's
/// <see cref="GpuWorker"/>. Copy-in uploads host inputs into device staging sized for MaxTokens (allocated once);
/// preprocess launches the counting kernels and polls the pinned receive sizes with the operation's deadline;
/// growth is libepa2a's collective grow; the dispatch kernel sends, finishes and (host path) downloads rows,
/// weights, scatter rows and row origins; combine runs on the device and rounds there. A cancelled or expired
/// operation aborts the layer's device waits. After a failed step (timeout, abort) the layer refuses new steps
/// until every rank has called <see cref="RecoverAsync"/> together (libepa2a's collective reset).
/// This file holds the device handles (creation, disposal, copies); the phases, graph capture, failure
/// translation and diagnostics have a partial file each.
/// </summary>
internal sealed partial class CudaBackend : IDispatchCombineBackend, IDeviceDispatchCombineBackend, IGraphCaptureBackend
{
    /// <summary>The host poll of receive sizes ends this long after the step deadline, so a device wait (which names the peer) reports first.</summary>
    private const long HostPollGraceNs = 100_000_000;

    private const int EvPrepareStart = 0;
    private const int EvPrepareEnd = 1;
    private const int EvSendStart = 2;
    private const int EvFinishEnd = 3;
    private const int EvCombineStart = 4;
    private const int EvCombineEnd = 5;

    private readonly EpConfig config;
    private readonly GpuWorker worker;
    private readonly IGpuPhaseObserver? gpuObserver;
    private readonly string? layerName;
    private readonly bool fixedCapacity;
    private readonly bool callerThread;
    private readonly int device;

    /// <summary>The CUDA device selected on this thread for caller-thread calls, plus one (0: none yet).</summary>
    [ThreadStatic]
    private static int threadDevice;
    private readonly CudaStreamHandle stream;
    private readonly CudaEventHandle[] events;
    private readonly DeviceMemoryHandle stagedTokens;
    private readonly DeviceMemoryHandle stagedIds;
    private readonly DeviceMemoryHandle stagedWeights;
    private readonly DeviceMemoryHandle stagedScatter;
    private readonly DeviceMemoryHandle combined;
    private readonly CudaLayerHandle layer;
    private NativeLayerBuffers buffers;
    private volatile bool needsRecovery;
    private bool combineReady;
    private bool stepTimed;
    private int abortRequested;
    private ArgumentException? pendingInputError;
    private bool disposed;

    private CudaBackend(EpConfig config, NvshmemRuntime runtime, EpLayerOptions options)
    {
        this.config = config;
        worker = runtime.Worker;
        gpuObserver = options.Observer as IGpuPhaseObserver;
        layerName = options.LayerName;
        fixedCapacity = options.FixedCapacity;
        callerThread = options.DeviceCallsOnCallerThread;
        device = runtime.Device;
        NativeLibraryVersion.EnsureCompatible();
        long rowBytes = (long)config.Hidden * config.TokenBytes;
        long slots = (long)config.MaxTokens * config.TopK;

        // Everything local first: a rank that fails here must not leave its peers holding a collective layer.
        List<GpuHandle> made = [];
        try
        {
            stream = Keep(made, CudaStreamHandle.Create(worker));
            events = [.. Enumerable.Range(0, 6).Select(_ => Keep(made, CudaEventHandle.Create(worker)))];
            stagedTokens = Keep(made, DeviceMemoryHandle.Allocate(worker, config.MaxTokens * rowBytes));
            stagedIds = Keep(made, DeviceMemoryHandle.Allocate(worker, slots * 4));
            stagedWeights = Keep(made, DeviceMemoryHandle.Allocate(worker, slots * 4));
            stagedScatter = Keep(made, DeviceMemoryHandle.Allocate(worker, slots * 4));
            combined = Keep(made, DeviceMemoryHandle.Allocate(worker, config.MaxTokens * rowBytes));
            NativeLayerConfig native = new()
            {
                Size = Marshal.SizeOf<NativeLayerConfig>(),
                Version = NativeLayerConfig.CurrentVersion,
                TimeoutNs = options.StepTimeout.Ticks * 100,
                MaxTokens = config.MaxTokens,
                Hidden = config.Hidden,
                TopK = config.TopK,
                NumExperts = config.NumExperts,
                Rank = config.Rank,
                WorldSize = config.WorldSize,
                LocalWorldSize = config.LocalWorldSize,
                TokenBytes = config.TokenBytes,
                TokenType = (int)config.TokenType,
                NumSms = config.NumSms,
                EnableLocalCombine = config.EnableLocalCombine ? 1 : 0,
                ExpertAlignment = config.ExpertAlignment,
                Capacity = options.Capacity,
                Flags = options.FixedCapacity ? (int)NativeLayerFlags.FixedCapacity : 0,
            };
            layer = CudaLayerHandle.Create(worker, native);
        }
        catch
        {
            foreach (GpuHandle h in made)
            {
                h.Dispose();
            }

            throw;
        }

        Check(epa2a_layer_get_buffers(layer.Pointer, out buffers), "epa2a_layer_get_buffers");
    }

    public string Name => "cuda";

    public nint DeviceOutput => buffers.Output;

    public nint DeviceWeights => buffers.Weights;

    public int OutputRows => buffers.OutputRows;

    /// <summary>Creates the layer's device state on the worker (collective: every rank calls it together).</summary>
    public static CudaBackend Create(EpConfig config, NvshmemRuntime runtime, EpLayerOptions options)
    {
        runtime.ThrowIfDisposed();
        return runtime.Worker.Run(() => new CudaBackend(config, runtime, options));
    }

    /// <summary>Collective: every rank disposes its layer together (libepa2a's destroy is an NVSHMEM barrier).</summary>
    public void Dispose()
    {
        if (disposed)
        {
            return;
        }

        disposed = true;
        layer.MarkCollectiveRelease();
        layer.Dispose();
        foreach (GpuHandle h in new GpuHandle[] { stagedTokens, stagedIds, stagedWeights, stagedScatter, combined })
        {
            h.Dispose();
        }

        foreach (CudaEventHandle e in events)
        {
            e.Dispose();
        }

        stream.Dispose();
    }

    private int RowBytes => config.Hidden * config.TokenBytes;

    private static T Keep<T>(List<GpuHandle> made, T handle)
        where T : GpuHandle
    {
        made.Add(handle);
        return handle;
    }

    private void ThrowIfUnusable()
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        if (needsRecovery)
        {
            throw new InvalidOperationException(
                $"rank {config.Rank}: an earlier step failed on the device; every rank must call RecoverAsync together before the next step");
        }
    }

    private unsafe void Upload(nint device, ReadOnlySpan<byte> host)
    {
        if (host.IsEmpty)
        {
            return;
        }

        fixed (byte* p = host)
        {
            Check(epa2a_memcpy_async(device, (nint)p, (nuint)host.Length, stream.Pointer), "epa2a_memcpy_async");

            // The copy reads pageable memory that stays pinned only inside this block.
            Check(epa2a_stream_sync(stream.Pointer), "epa2a_stream_sync");
        }
    }

    private unsafe void Download(Span<byte> host, nint device)
    {
        if (host.IsEmpty)
        {
            return;
        }

        fixed (byte* p = host)
        {
            Check(epa2a_memcpy_async((nint)p, device, (nuint)host.Length, stream.Pointer), "epa2a_memcpy_async");
            Check(epa2a_stream_sync(stream.Pointer), "epa2a_stream_sync");
        }
    }
}

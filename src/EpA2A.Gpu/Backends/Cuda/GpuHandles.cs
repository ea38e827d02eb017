using System.Runtime.InteropServices;

namespace EpA2A.Backends.Cuda;

/// <summary>
/// A native CUDA/NVSHMEM resource released on the <see cref="GpuWorker"/> (the thread whose device it was made
/// on), so nothing leaks when an exception flies. Release is queued, never waited for: a finalizer must not block
/// behind a step, and the worker's queue keeps frees in order with later work.
/// </summary>
internal abstract class GpuHandle : SafeHandle
{
    protected GpuHandle(GpuWorker worker, nint value)
        : base(0, ownsHandle: true)
    {
        Worker = worker;
        SetHandle(value);
    }

    public override bool IsInvalid => handle == 0;

    /// <summary>The raw pointer; valid while this handle is not disposed.</summary>
    public nint Pointer => handle;

    protected GpuWorker Worker { get; }

    protected override bool ReleaseHandle()
    {
        nint value = handle;
        Worker.Post(() => Free(value));

        // Once the worker is gone the process is shutting NVSHMEM down: the driver reclaims what is left.
        return true;
    }

    /// <summary>Frees the resource (on the worker). Returns libepa2a's status.</summary>
    protected abstract int Free(nint value);
}

/// <summary>Device memory from epa2a_device_alloc.</summary>
internal sealed class DeviceMemoryHandle : GpuHandle
{
    private DeviceMemoryHandle(GpuWorker worker, nint value, long bytes)
        : base(worker, value) => Bytes = bytes;

    public long Bytes { get; }

    /// <summary>Allocates on the calling thread, which must be the worker.</summary>
    public static DeviceMemoryHandle Allocate(GpuWorker worker, long bytes)
    {
        NativeMethods.Check(NativeMethods.epa2a_device_alloc((nuint)Math.Max(bytes, 16), out nint p), "epa2a_device_alloc");
        return new DeviceMemoryHandle(worker, p, bytes);
    }

    protected override int Free(nint value) => NativeMethods.epa2a_device_free(value);
}

/// <summary>Pinned, device-mapped host memory from epa2a_host_alloc_pinned.</summary>
internal sealed class PinnedHostMemoryHandle : GpuHandle
{
    private PinnedHostMemoryHandle(GpuWorker worker, nint value, long bytes)
        : base(worker, value) => Bytes = bytes;

    public long Bytes { get; }

    /// <summary>Allocates on the calling thread, which must be the worker.</summary>
    public static PinnedHostMemoryHandle Allocate(GpuWorker worker, long bytes)
    {
        NativeMethods.Check(NativeMethods.epa2a_host_alloc_pinned((nuint)Math.Max(bytes, 16), out nint p), "epa2a_host_alloc_pinned");
        return new PinnedHostMemoryHandle(worker, p, bytes);
    }

    protected override int Free(nint value) => NativeMethods.epa2a_host_free_pinned(value);
}

/// <summary>A non-blocking CUDA stream.</summary>
internal sealed class CudaStreamHandle : GpuHandle
{
    private CudaStreamHandle(GpuWorker worker, nint value)
        : base(worker, value)
    {
    }

    /// <summary>Creates on the calling thread, which must be the worker.</summary>
    public static CudaStreamHandle Create(GpuWorker worker)
    {
        NativeMethods.Check(NativeMethods.epa2a_stream_create(out nint s), "epa2a_stream_create");
        return new CudaStreamHandle(worker, s);
    }

    protected override int Free(nint value) => NativeMethods.epa2a_stream_destroy(value);
}

/// <summary>A CUDA event (timing).</summary>
internal sealed class CudaEventHandle : GpuHandle
{
    private CudaEventHandle(GpuWorker worker, nint value)
        : base(worker, value)
    {
    }

    /// <summary>Creates on the calling thread, which must be the worker.</summary>
    public static CudaEventHandle Create(GpuWorker worker)
    {
        NativeMethods.Check(NativeMethods.epa2a_event_create(out nint e), "epa2a_event_create");
        return new CudaEventHandle(worker, e);
    }

    protected override int Free(nint value) => NativeMethods.epa2a_event_destroy(value);
}

/// <summary>
/// A libepa2a layer. Its destroy is collective (an NVSHMEM barrier), so it only runs when every rank disposes its
/// layer (<see cref="MarkCollectiveRelease"/>); a layer that is only finalized is left to process exit rather than
/// hang the worker in a barrier no other rank enters.
/// </summary>
internal sealed class CudaLayerHandle : GpuHandle
{
    private volatile bool collective;

    private CudaLayerHandle(GpuWorker worker, nint value)
        : base(worker, value)
    {
    }

    /// <summary>Creates on the calling thread, which must be the worker (collective).</summary>
    public static CudaLayerHandle Create(GpuWorker worker, in NativeLayerConfig config)
    {
        NativeMethods.Check(NativeMethods.epa2a_layer_create(config, out nint layer), "epa2a_layer_create");
        return new CudaLayerHandle(worker, layer);
    }

    /// <summary>Every rank is disposing its layer now: the release may run the collective destroy.</summary>
    public void MarkCollectiveRelease() => collective = true;

    protected override bool ReleaseHandle() => !collective || base.ReleaseHandle();

    protected override int Free(nint value) => NativeMethods.epa2a_layer_destroy(value);
}

/// <summary>
/// A libepa2a low-latency layer. Its destroy is collective (an NVSHMEM barrier), so, as <see cref="CudaLayerHandle"/>,
/// it only runs once every rank disposes its layer (<see cref="MarkCollectiveRelease"/>).
/// </summary>
internal sealed class CudaLowLatencyLayerHandle : GpuHandle
{
    private volatile bool collective;

    private CudaLowLatencyLayerHandle(GpuWorker worker, nint value)
        : base(worker, value)
    {
    }

    /// <summary>Creates on the calling thread, which must be the worker (collective).</summary>
    public static CudaLowLatencyLayerHandle Create(GpuWorker worker, in NativeLowLatencyConfig config)
    {
        NativeMethods.Check(NativeMethods.epa2a_ll_layer_create(config, out nint layer), "epa2a_ll_layer_create");
        return new CudaLowLatencyLayerHandle(worker, layer);
    }

    /// <summary>Every rank is disposing its layer now: the release may run the collective destroy.</summary>
    public void MarkCollectiveRelease() => collective = true;

    protected override bool ReleaseHandle() => !collective || base.ReleaseHandle();

    protected override int Free(nint value) => NativeMethods.epa2a_ll_layer_destroy(value);
}

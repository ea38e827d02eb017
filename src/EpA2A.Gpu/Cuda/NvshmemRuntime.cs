using EpA2A.Backends.Cuda;

namespace EpA2A.Cuda;

/// <summary>
/// This process's NVSHMEM job membership (one per process and GPU): the unique-id bootstrap, the CUDA device,
/// and the <see cref="GpuWorker"/> thread on which every blocking native call of its layers runs. Rank 0 makes
/// the unique id (<see cref="CreateUniqueId"/>), hands it to every rank out of band, and all ranks call
/// <see cref="InitializeAsync"/> together. CUDA layers are made from it with
/// <see cref="Layer.EpAll2AllLayer.CreateCuda"/>.
/// </summary>
public sealed class NvshmemRuntime : IDisposable
{
    private static readonly Lock Gate = new();
    private static Task<NvshmemRuntime>? current;
    private static (byte[] Id, int Rank, int World, int Device) currentArgs;
    private static bool finalizedOnce;

    private readonly CudaStreamHandle copyStream;
    private int disposed;

    private NvshmemRuntime(GpuWorker worker, int rank, int worldSize, int device, CoreAffinity? affinity, int workerThreadId)
    {
        Worker = worker;
        Affinity = affinity;
        WorkerThreadId = workerThreadId;
        Rank = rank;
        WorldSize = worldSize;
        Device = device;
        copyStream = CudaStreamHandle.Create(worker);
    }

    /// <summary>This process's PE.</summary>
    public int Rank { get; }

    /// <summary>PEs in the job.</summary>
    public int WorldSize { get; }

    /// <summary>The CUDA device this process drives.</summary>
    public int Device { get; }

    /// <summary>The cores of the worker and of the process's other threads, when pinned (<see cref="CoreAffinity"/>).</summary>
    public CoreAffinity? Affinity { get; }

    /// <summary>
    /// How often the kernel has taken the CPU from the GPU worker thread while it could run (Linux; -1 elsewhere).
    /// A step during which this grows lost its launching thread for up to a scheduler tick.
    /// </summary>
    public long WorkerInvoluntarySwitches => ThreadCores.InvoluntarySwitches(WorkerThreadId);

    /// <summary>
    /// For caller-thread device calls (<see cref="Layer.EpLayerOptions.DeviceCallsOnCallerThread"/>): puts the calling
    /// thread on the worker's core, which the idle worker leaves free. No-op when the runtime is not pinned.
    /// </summary>
    public void PinCallingThreadToWorkerCore()
    {
        if (Affinity is { } a)
        {
            ThreadCores.PinCurrent([a.WorkerCore]);
        }
    }

    /// <summary>The kernel's id of the GPU worker thread (0 where unknown).</summary>
    internal int WorkerThreadId { get; }

    /// <summary>Bytes of an NVSHMEM unique id.</summary>
    public static int UniqueIdSize
    {
        get
        {
            NativeMethods.Check(NativeMethods.epa2a_uid_size(out int bytes), "epa2a_uid_size");
            return bytes;
        }
    }

    /// <summary>The thread of every blocking native call.</summary>
    internal GpuWorker Worker { get; }

    /// <summary>A stream for copies outside any layer (device buffers, bandwidth probe).</summary>
    internal nint CopyStream => copyStream.Pointer;

    internal bool IsDisposed => Volatile.Read(ref disposed) != 0;

    /// <summary>True when libepa2a loads and sees a CUDA device; otherwise <paramref name="reason"/> says why not.</summary>
    public static bool IsAvailable(out string reason) => NativeMethods.IsAvailable(out reason);

    /// <summary>Free and total memory of this process's CUDA device (cudaMemGetInfo), in bytes.</summary>
    public Task<(long Free, long Total)> DeviceMemoryAsync()
    {
        ThrowIfDisposed();
        return Worker.RunAsync(() =>
        {
            NativeMethods.Check(NativeMethods.epa2a_mem_info(out nuint free, out nuint total), "epa2a_mem_info");
            return ((long)free, (long)total);
        });
    }

    /// <summary>Rank 0 only: a fresh unique id of <see cref="UniqueIdSize"/> bytes to hand to every rank.</summary>
    public static byte[] CreateUniqueId()
    {
        byte[] id = new byte[UniqueIdSize];
        unsafe
        {
            fixed (byte* p = id)
            {
                NativeMethods.Check(NativeMethods.epa2a_uid_create(p, id.Length), "epa2a_uid_create");
            }
        }

        return id;
    }

    /// <summary>
    /// Joins the NVSHMEM job (collective: every rank calls it with the same id). One runtime per process: a second
    /// call with the same arguments returns the same runtime; different arguments throw
    /// <see cref="InvalidOperationException"/>. Cancelling stops the wait, not the bootstrap (NVSHMEM's init cannot
    /// be interrupted); a later call with the same arguments picks up the same bootstrap.
    /// </summary>
    /// <exception cref="ArgumentException">The id has the wrong size, or rank, world size or device are out of range.</exception>
    /// <exception cref="NativeCallException">CUDA or NVSHMEM refused (the message names the call and the reason).</exception>
    public static Task<NvshmemRuntime> InitializeAsync(byte[] uniqueId, int rank, int worldSize, int cudaDevice, CancellationToken ct)
    {
        ArgumentNullException.ThrowIfNull(uniqueId);
        int size = UniqueIdSize;
        if (uniqueId.Length != size)
        {
            throw new ArgumentException($"uniqueId has {uniqueId.Length} bytes; an NVSHMEM unique id has {size}", nameof(uniqueId));
        }

        if (worldSize < 1)
        {
            throw new ArgumentOutOfRangeException(nameof(worldSize), worldSize, "worldSize must be at least 1");
        }

        if (rank < 0 || rank >= worldSize)
        {
            throw new ArgumentOutOfRangeException(nameof(rank), rank, $"rank must be in [0, worldSize = {worldSize})");
        }

        ArgumentOutOfRangeException.ThrowIfNegative(cudaDevice);
        Task<NvshmemRuntime> init;
        lock (Gate)
        {
            if (current is not null)
            {
                (byte[] id, int r, int w, int d) = currentArgs;
                if (r != rank || w != worldSize || d != cudaDevice || !id.AsSpan().SequenceEqual(uniqueId))
                {
                    throw new InvalidOperationException(
                        $"this process already joined an NVSHMEM job as rank {r} of {w} on CUDA device {d}{(id.AsSpan().SequenceEqual(uniqueId) ? string.Empty : " with another unique id")}; one runtime per process (asked: rank {rank} of {worldSize} on device {cudaDevice})");
                }

                init = current;
            }
            else
            {
                if (finalizedOnce)
                {
                    throw new InvalidOperationException("NVSHMEM was finalized in this process and cannot be initialized again");
                }

                byte[] id = (byte[])uniqueId.Clone();
                currentArgs = (id, rank, worldSize, cudaDevice);
                GpuWorker worker = new($"epa2a-gpu{cudaDevice}-rank{rank}");
                CoreAffinity? affinity = CoreAffinity.FromEnvironment();
                init = worker.RunAsync(() =>
                {
                    // NVSHMEM's own threads (its proxy) start inside init and inherit the setup cores, not the worker's.
                    affinity?.EnterSetup();
                    unsafe
                    {
                        fixed (byte* p = id)
                        {
                            NativeMethods.Check(NativeMethods.epa2a_init(p, id.Length, rank, worldSize, cudaDevice), "epa2a_init");
                        }
                    }

                    affinity?.TakeWorkerCore();
                    return new NvshmemRuntime(worker, rank, worldSize, cudaDevice, affinity, ThreadCores.CurrentThreadId());
                });
                current = init;
                _ = init.ContinueWith(
                    t =>
                    {
                        // A failed bootstrap frees the slot, so a corrected call can try again.
                        lock (Gate)
                        {
                            if (ReferenceEquals(current, t))
                            {
                                current = null;
                            }
                        }

                        worker.Dispose();
                    },
                    CancellationToken.None,
                    TaskContinuationOptions.OnlyOnFaulted | TaskContinuationOptions.ExecuteSynchronously,
                    TaskScheduler.Default);
            }
        }

        return ct.CanBeCanceled ? init.WaitAsync(ct) : init;
    }

    /// <summary>
    /// Leaves the NVSHMEM job (the original's finalize; collective). Dispose every layer first, on every rank.
    /// NVSHMEM cannot be initialized again in this process afterwards.
    /// </summary>
    public void Dispose()
    {
        if (Interlocked.Exchange(ref disposed, 1) != 0)
        {
            return;
        }

        try
        {
            copyStream.Dispose();
            Worker.Run(() =>
            {
                NativeMethods.Check(NativeMethods.epa2a_device_sync(), "epa2a_device_sync");
                NativeMethods.Check(NativeMethods.epa2a_finalize(), "epa2a_finalize");
                return true;
            });
        }
        finally
        {
            Worker.Dispose();
            lock (Gate)
            {
                current = null;
                finalizedOnce = true;
            }
        }
    }

    /// <summary>Throws <see cref="ObjectDisposedException"/> once the runtime is finalized.</summary>
    internal void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(IsDisposed, this);
}

using System.Runtime.InteropServices;
using EpA2A.Config;
using EpA2A.Cuda;
using EpA2A.Errors;
using EpA2A.Layer;
using EpA2A.LowLatency;
using EpA2A.Numerics;
using static EpA2A.Backends.Cuda.NativeMethods;

namespace EpA2A.Backends.Cuda;

/// <summary>
/// The CUDA + NVSHMEM low-latency backend: each call of the seam is one libepa2a call (one kernel) on the layer's
/// stream. The device API enqueues on the caller's thread and never waits on the host: the kernels wait for the peers
/// on the device, with the layer's deadline and abort flag. A device failure (a peer that never arrived) is read from
/// the layer's host-mapped record at the next call, and at every host synchronisation (the host API's receives);
/// a bad expert id (dropped on the device, the step completes with the peers) is reported by the combine receive of
/// the step that saw it, or of the next one. The host API uploads into staging buffers allocated once, runs the
/// kernels on the GPU worker and downloads the rows that were written. After a failed step every rank must call
/// <see cref="RecoverAsync"/> together (libepa2a's collective reset).
/// </summary>
internal sealed class CudaLowLatencyBackend : ILowLatencyBackend, ILowLatencyGraphBackend
{
    private const int EvBarrier = 0;
    private const int EvDispatchSent = 1;
    private const int EvDispatched = 2;
    private const int EvCombineSent = 3;
    private const int EvCombined = 4;

    /// <summary>The argument a device-side input error is about (the dispatch's expert ids).</summary>
    private static readonly string ExpertIdsParameter = "expertIds";

    /// <summary>The CUDA device selected on this thread for caller-thread calls, plus one (0: none yet).</summary>
    [ThreadStatic]
    private static int threadDevice;

    private readonly EpConfig config;
    private readonly GpuWorker worker;
    private readonly int device;
    private readonly int epr;
    private readonly int blockRows;
    private readonly CudaStreamHandle stream;
    private readonly CudaEventHandle[] events;
    private readonly DeviceMemoryHandle stagedTokens;
    private readonly DeviceMemoryHandle stagedIds;
    private readonly DeviceMemoryHandle stagedWeights;
    private readonly DeviceMemoryHandle combined;
    private readonly CudaLowLatencyLayerHandle layer;
    private readonly NativeLowLatencyBuffers buffers;
    private BFloat16[]? hostTokens;
    private byte[]? hostFp8;
    private float[]? hostScales;
    private int[]? hostRows;
    private int tokenCount;
    private bool fp8;
    private bool weighted;
    private volatile bool needsRecovery;
    private int abortRequested;
    private ArgumentException? pendingInputError;
    private bool inputErrorReported;
    private bool disposed;

    private CudaLowLatencyBackend(EpConfig config, NvshmemRuntime runtime, EpLowLatencyOptions options)
    {
        this.config = config;
        worker = runtime.Worker;
        device = runtime.Device;
        epr = config.ExpertsPerRank;
        blockRows = config.WorldSize * config.MaxTokens;
        CheckLibrary();
        long slots = (long)config.MaxTokens * config.TopK;

        // Everything local first: a rank that fails here must not leave its peers holding a collective layer.
        List<GpuHandle> made = [];
        try
        {
            stream = Keep(made, CudaStreamHandle.Create(worker));
            events = [.. Enumerable.Range(0, 5).Select(_ => Keep(made, CudaEventHandle.Create(worker)))];
            stagedTokens = Keep(made, DeviceMemoryHandle.Allocate(worker, (long)config.MaxTokens * config.Hidden * 2));
            stagedIds = Keep(made, DeviceMemoryHandle.Allocate(worker, slots * 4));
            stagedWeights = Keep(made, DeviceMemoryHandle.Allocate(worker, slots * 4));
            combined = Keep(made, DeviceMemoryHandle.Allocate(worker, (long)config.MaxTokens * config.Hidden * 2));
            NativeLowLatencyConfig native = new()
            {
                Size = Marshal.SizeOf<NativeLowLatencyConfig>(),
                Version = NativeLowLatencyConfig.CurrentVersion,
                TimeoutNs = options.StepTimeout.Ticks * 100,
                MaxTokens = config.MaxTokens,
                Hidden = config.Hidden,
                TopK = config.TopK,
                NumExperts = config.NumExperts,
                Rank = config.Rank,
                WorldSize = config.WorldSize,
                LocalWorldSize = config.LocalWorldSize,
                NumSms = options.NumSms ?? config.NumSms,
            };
            try
            {
                layer = CudaLowLatencyLayerHandle.Create(worker, native);
            }
            catch (NativeCallException e) when ((NativeCode)e.Code == NativeCode.InvalidArgument)
            {
                throw new ArgumentException($"rank {config.Rank}: {e.Message}", nameof(config), e);
            }
        }
        catch
        {
            foreach (GpuHandle h in made)
            {
                h.Dispose();
            }

            throw;
        }

        Check(epa2a_ll_get_buffers(layer.Pointer, out buffers), "epa2a_ll_get_buffers");
    }

    public string Name => "cuda";

    public bool HasDeviceBuffers => true;

    public BFloat16[]? HostCombineBuffer => null;

    public nint DeviceCombineBuffer => buffers.CombineInput;

    /// <summary>Blocks each kernel launches with: the SM budget, capped so that every rank on this GPU fits at once.</summary>
    internal int KernelBlocks => buffers.Blocks;

    /// <summary>Where the device combine receive writes [MaxTokens, Hidden] bf16.</summary>
    public nint CombineOutputPointer => combined.Pointer;

    /// <summary>Creates the layer's device state on the worker (collective: every rank calls it together).</summary>
    public static CudaLowLatencyBackend Create(EpConfig config, NvshmemRuntime runtime, EpLowLatencyOptions options)
    {
        runtime.ThrowIfDisposed();
        return runtime.Worker.Run(() => new CudaLowLatencyBackend(config, runtime, options));
    }

    public async ValueTask<long> DispatchSendAsync(LowLatencyDispatchInput input, LowLatencyDispatchOptions options, OperationContext operation)
    {
        ThrowIfUnusable(operation);
        int n = input.TokenCount;
        int format = options.Format == LowLatencyFormat.Fp8
            ? (int)(options.PowerOfTwoScales ? NativeLowLatencyFormat.Fp8PowerOfTwo : NativeLowLatencyFormat.Fp8)
            : (int)NativeLowLatencyFormat.Bf16;
        fp8 = options.Format == LowLatencyFormat.Fp8;
        tokenCount = n;
        hostRows = null;
        long bytes = (long)n * (fp8 ? config.Hidden + (4 * (config.Hidden / LowLatencyDispatchOptions.ScaleGroup)) : 2 * config.Hidden);
        if (input is DeviceDispatchInput d)
        {
            OnCallerThread(operation, () =>
            {
                TakeInputError();
                Check(epa2a_ll_dispatch_send(layer.Pointer, d.Tokens, d.ExpertIds, d.Weights, n, format, stream.Pointer), "epa2a_ll_dispatch_send");
            });
            return bytes;
        }

        HostDispatchInput host = (HostDispatchInput)input;
        await OnWorkerAsync(operation, () =>
        {
            TakeInputError();
            int slots = n * config.TopK;
            Upload(stagedTokens.Pointer, MemoryMarshal.AsBytes(host.Tokens.AsSpan(0, n * config.Hidden)));
            Upload(stagedIds.Pointer, MemoryMarshal.AsBytes(host.ExpertIds.AsSpan(0, slots)));
            if (host.Weights is { } w)
            {
                Upload(stagedWeights.Pointer, MemoryMarshal.AsBytes(w.AsSpan(0, slots)));
            }

            Check(epa2a_ll_dispatch_send(layer.Pointer, stagedTokens.Pointer, stagedIds.Pointer, host.Weights is null ? 0 : stagedWeights.Pointer, n, format, stream.Pointer), "epa2a_ll_dispatch_send");
            return true;
        }).ConfigureAwait(false);
        return bytes;
    }

    public async ValueTask<LowLatencyReceived> DispatchReceiveAsync(LowLatencyPlace place, OperationContext operation)
    {
        ThrowIfUnusable(operation);
        if (place == LowLatencyPlace.Device)
        {
            OnCallerThread(operation, () => Check(epa2a_ll_dispatch_recv(layer.Pointer, stream.Pointer), "epa2a_ll_dispatch_recv"));
            return new DeviceReceived(fp8 ? 0 : buffers.Tokens, fp8 ? buffers.Tokens : 0, fp8 ? buffers.Scales : 0, buffers.RowsPerExpert);
        }

        return await OnWorkerAsync(operation, () =>
        {
            Check(epa2a_ll_dispatch_recv(layer.Pointer, stream.Pointer), "epa2a_ll_dispatch_recv");
            Synchronize("epa2a_ll_layer_sync");
            int[] rows = DownloadRows();
            int hidden = config.Hidden;
            int groups = hidden / LowLatencyDispatchOptions.ScaleGroup;
            if (fp8)
            {
                hostFp8 ??= new byte[(long)epr * blockRows * hidden];
                hostScales ??= new float[(long)epr * blockRows * groups];
                for (int j = 0; j < epr; j++)
                {
                    long first = (long)j * blockRows;
                    Download(hostFp8.AsSpan((int)(first * hidden), rows[j] * hidden), buffers.Tokens + (nint)(first * hidden));
                    Download(MemoryMarshal.AsBytes(hostScales.AsSpan((int)(first * groups), rows[j] * groups)), buffers.Scales + (nint)(first * groups * 4));
                }

                return (LowLatencyReceived)new HostReceived(null, hostFp8, hostScales, rows);
            }

            hostTokens ??= new BFloat16[(long)epr * blockRows * hidden];
            for (int j = 0; j < epr; j++)
            {
                long first = (long)j * blockRows * hidden;
                Download(MemoryMarshal.AsBytes(hostTokens.AsSpan((int)first, rows[j] * hidden)), buffers.Tokens + (nint)(first * 2));
            }

            return new HostReceived(hostTokens, null, null, rows);
        }).ConfigureAwait(false);
    }

    public async ValueTask<long> CombineSendAsync(LowLatencyExpertOutput output, bool weightedSum, OperationContext operation)
    {
        ThrowIfUnusable(operation);
        weighted = weightedSum;
        long rowBytes = 2L * config.Hidden;
        if (output is HostExpertOutput host)
        {
            // The host rows go straight into the combine-send buffer, expert by expert (rows below rowsPerExpert only):
            // this rank's dispatch receive has completed, so no peer still reads the previous step's rows there.
            return await OnWorkerAsync(operation, () =>
            {
                int[] rows = hostRows ?? DownloadRows();
                long total = 0;
                ReadOnlySpan<BFloat16> all = host.Rows.GetSpan(stackalloc nint[3], (int)host.Rows.FlattenedLength);
                for (int j = 0; j < epr; j++)
                {
                    long first = (long)j * blockRows * config.Hidden;
                    Upload(buffers.CombineInput + (nint)(first * 2), MemoryMarshal.AsBytes(all.Slice((int)first, rows[j] * config.Hidden)));
                    total += rows[j];
                }

                Check(epa2a_ll_combine_send(layer.Pointer, 0, stream.Pointer), "epa2a_ll_combine_send");
                return total * rowBytes;
            }).ConfigureAwait(false);
        }

        nint source = output is DeviceExpertOutput d ? d.Rows : 0;
        OnCallerThread(operation, () => Check(epa2a_ll_combine_send(layer.Pointer, source, stream.Pointer), "epa2a_ll_combine_send"));
        return (long)tokenCount * config.TopK * rowBytes;
    }

    public async ValueTask<LowLatencyCombined> CombineReceiveAsync(LowLatencyPlace place, OperationContext operation)
    {
        ThrowIfUnusable(operation);
        int n = tokenCount;
        if (place == LowLatencyPlace.Device)
        {
            OnCallerThread(operation, () =>
            {
                Check(epa2a_ll_combine_recv(layer.Pointer, combined.Pointer, weighted ? 1 : 0, stream.Pointer), "epa2a_ll_combine_recv");
                ReportInputError();
            });
            return new DeviceCombined(combined.Pointer);
        }

        return await OnWorkerAsync(operation, () =>
        {
            Check(epa2a_ll_combine_recv(layer.Pointer, combined.Pointer, weighted ? 1 : 0, stream.Pointer), "epa2a_ll_combine_recv");
            Synchronize("epa2a_ll_layer_sync");
            BFloat16[] result = new BFloat16[n * config.Hidden];
            Download(MemoryMarshal.AsBytes(result.AsSpan()), combined.Pointer);
            ReportInputError();
            return (LowLatencyCombined)new HostCombined(result);
        }).ConfigureAwait(false);
    }

    public void Reset(long epoch, long sequence)
    {
        // Nothing is buffered per step: the device buffers are reused in place, ordered by the kernels' signals.
    }

    public async ValueTask RecoverAsync()
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        await worker.RunAsync(() =>
        {
            Check(epa2a_ll_layer_reset(layer.Pointer), "epa2a_ll_layer_reset");
            return true;
        }).ConfigureAwait(false);
        needsRecovery = false;
        Volatile.Write(ref abortRequested, 0);
        pendingInputError = null;
        inputErrorReported = false;
    }

    public async ValueTask<LowLatencyCapturedStep> CaptureAsync(DeviceDispatchInput input, LowLatencyDispatchOptions options, nint expertOutput, bool weightedSum, bool oneKernel, OperationContext operation)
    {
        ThrowIfUnusable(operation);
        int format = options.Format == LowLatencyFormat.Fp8
            ? (int)(options.PowerOfTwoScales ? NativeLowLatencyFormat.Fp8PowerOfTwo : NativeLowLatencyFormat.Fp8)
            : (int)NativeLowLatencyFormat.Bf16;
        int n = input.TokenCount;
        return await OnWorkerAsync(operation, () =>
        {
            nint[] graphs = new nint[4];
            try
            {
                if (oneKernel)
                {
                    graphs[0] = Capture(() => epa2a_ll_dispatch(layer.Pointer, input.Tokens, input.ExpertIds, input.Weights, n, format, stream.Pointer), "epa2a_ll_dispatch");
                    graphs[2] = Capture(() => epa2a_ll_combine(layer.Pointer, expertOutput, combined.Pointer, weightedSum ? 1 : 0, stream.Pointer), "epa2a_ll_combine");
                }
                else
                {
                    graphs[0] = Capture(() => epa2a_ll_dispatch_send(layer.Pointer, input.Tokens, input.ExpertIds, input.Weights, n, format, stream.Pointer), "epa2a_ll_dispatch_send");
                    graphs[1] = Capture(() => epa2a_ll_dispatch_recv(layer.Pointer, stream.Pointer), "epa2a_ll_dispatch_recv");
                    graphs[2] = Capture(() => epa2a_ll_combine_send(layer.Pointer, expertOutput, stream.Pointer), "epa2a_ll_combine_send");
                    graphs[3] = Capture(() => epa2a_ll_combine_recv(layer.Pointer, combined.Pointer, weightedSum ? 1 : 0, stream.Pointer), "epa2a_ll_combine_recv");
                }

                bool isFp8 = options.Format == LowLatencyFormat.Fp8;
                return new LowLatencyCapturedStep(
                    graphs,
                    n,
                    new DeviceReceived(isFp8 ? 0 : buffers.Tokens, isFp8 ? buffers.Tokens : 0, isFp8 ? buffers.Scales : 0, buffers.RowsPerExpert),
                    combined.Pointer);
            }
            catch
            {
                foreach (nint g in graphs)
                {
                    _ = epa2a_graph_destroy(g);
                }

                throw;
            }
        }).ConfigureAwait(false);
    }

    public async ValueTask<LowLatencyGraphReplay> ReplayAsync(LowLatencyCapturedStep step, LowLatencyGraphPhases phases, bool alignRanks, OperationContext operation)
    {
        ThrowIfUnusable(operation);
        return await OnWorkerAsync(operation, () =>
        {
            if (alignRanks)
            {
                Check(epa2a_ll_layer_barrier(layer.Pointer, stream.Pointer), "epa2a_ll_layer_barrier");
            }

            Record(EvBarrier);
            for (int i = 0; i < 4; i++)
            {
                if (((int)phases & (1 << i)) != 0 && step.Graphs[i] != 0)
                {
                    Check(epa2a_graph_launch(step.Graphs[i], stream.Pointer), "epa2a_graph_launch");
                }

                Record(EvDispatchSent + i);
            }

            Synchronize("epa2a_ll_layer_sync");
            TimeSpan Between(int from, int to)
            {
                Check(epa2a_event_elapsed_ms(events[from].Pointer, events[to].Pointer, out float ms), "epa2a_event_elapsed_ms");
                return TimeSpan.FromTicks((long)(ms * TimeSpan.TicksPerMillisecond));
            }

            return new LowLatencyGraphReplay(
                Between(EvBarrier, EvDispatched),
                Between(EvDispatched, EvCombined),
                Between(EvBarrier, EvDispatchSent),
                Between(EvDispatchSent, EvDispatched),
                Between(EvDispatched, EvCombineSent),
                Between(EvCombineSent, EvCombined));
        }).ConfigureAwait(false);
    }

    /// <summary>
    /// Waits for the layer's stream (the device API's results are then on the device), then reports what the device
    /// recorded: a failed wait (the layer needs RecoverAsync) or a dropped input.
    /// </summary>
    public Task SynchronizeAsync()
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        return worker.RunAsync(() =>
        {
            int status = epa2a_ll_layer_sync(layer.Pointer, stream.Pointer);
            if (status == 0)
            {
                return true;
            }

            string message = LastError();
            if (status is (int)NativeCode.BadExpertId or (int)NativeCode.Capacity && epa2a_ll_layer_status(layer.Pointer, out NativeStatus s) == 0)
            {
                if (inputErrorReported)
                {
                    return true;
                }

                inputErrorReported = true;
                throw InputError(s);
            }

            if (IsFatal(status))
            {
                needsRecovery = true;
                int peer = epa2a_ll_layer_status(layer.Pointer, out NativeStatus f) == 0 ? f.Peer : -1;
                throw status == (int)NativeCode.Timeout
                    ? new EpStepTimeoutException($"rank {config.Rank}: {message}; every rank must call RecoverAsync together before the next step", peer)
                    : new EpStepAbortedException($"rank {config.Rank}: {message}; every rank must call RecoverAsync together before the next step", peer);
            }

            throw new NativeCallException("epa2a_ll_layer_sync", (NativeCode)status, message);
        });
    }

    /// <summary>Fills the receive buffers, rows per expert and the combine result with 0xFF bytes (NaN, -1) between steps.</summary>
    public Task PoisonReceiveBuffersAsync()
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        long rows = (long)epr * blockRows;
        return worker.RunAsync(() =>
        {
            Check(epa2a_memset_async(buffers.Tokens, 0xFF, (nuint)(rows * config.Hidden * 2), stream.Pointer), "epa2a_memset_async");
            if (config.Hidden % LowLatencyDispatchOptions.ScaleGroup == 0)
            {
                Check(epa2a_memset_async(buffers.Scales, 0xFF, (nuint)(rows * (config.Hidden / LowLatencyDispatchOptions.ScaleGroup) * 4), stream.Pointer), "epa2a_memset_async");
            }

            Check(epa2a_memset_async(buffers.RowsPerExpert, 0xFF, (nuint)(epr * 4), stream.Pointer), "epa2a_memset_async");
            Check(epa2a_memset_async(combined.Pointer, 0xFF, (nuint)((long)config.MaxTokens * config.Hidden * 2), stream.Pointer), "epa2a_memset_async");
            Check(epa2a_stream_sync(stream.Pointer), "epa2a_stream_sync");
            return true;
        });
    }

    public void Release(LowLatencyCapturedStep step)
    {
        _ = worker.Post(() =>
        {
            foreach (nint g in step.Graphs.Where(g => g != 0))
            {
                _ = epa2a_graph_destroy(g);
            }
        });
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
        foreach (GpuHandle h in new GpuHandle[] { stagedTokens, stagedIds, stagedWeights, combined })
        {
            h.Dispose();
        }

        foreach (CudaEventHandle e in events)
        {
            e.Dispose();
        }

        stream.Dispose();
    }

    /// <summary>A libepa2a of another version, or built before the low-latency layer, fails here with a clear message, not at the first step.</summary>
    private static void CheckLibrary()
    {
        try
        {
            NativeLibraryVersion.EnsureCompatible();
            _ = epa2a_ll_layer_status(0, out _); // NULL layer: only proves the entry point exists
        }
        catch (EntryPointNotFoundException e)
        {
            throw new NotSupportedException("the loaded libepa2a has no low-latency layer (epa2a_ll_*): rebuild native/ (cmake --build native/build)", e);
        }
    }

    private static T Keep<T>(List<GpuHandle> made, T handle)
        where T : GpuHandle
    {
        made.Add(handle);
        return handle;
    }

    /// <summary>Refuses a call after a failed step, or when the device has recorded one since the last call.</summary>
    private void ThrowIfUnusable(OperationContext op)
    {
        ObjectDisposedException.ThrowIf(disposed, this);
        if (needsRecovery)
        {
            throw new InvalidOperationException(
                $"rank {config.Rank}: an earlier low-latency step failed on the device; every rank must call RecoverAsync together before the next step");
        }

        if (op.Token.IsCancellationRequested)
        {
            throw Cancelled(op, null, -1, "cancelled before it started on the device");
        }

        if (epa2a_ll_layer_status(layer.Pointer, out NativeStatus s) == 0 && IsFatal(s.Code))
        {
            // A device wait of an earlier call gave up (no host waited for it): this is the next point that can say so.
            throw Translate(new NativeCallException("epa2a_ll_layer_status", (NativeCode)s.Code, StatusText(s)), op);
        }
    }

    private static bool IsFatal(int code) => (NativeCode)code is NativeCode.Timeout or NativeCode.Aborted or NativeCode.BadRow;

    private string StatusText(in NativeStatus s) => (NativeCode)s.Code switch
    {
        NativeCode.Timeout or NativeCode.Aborted =>
            $"rank {s.Rank} {((NativeCode)s.Code == NativeCode.Timeout ? "timed out" : "aborted")} after {s.WaitedNs / 1e6:0.0} ms waiting for rank {s.Peer} while {PhaseText(s.Phase)} (signal expected {s.Expected}, saw {s.Observed})",
        NativeCode.BadExpertId => $"rank {s.Rank}: expert id {s.Value} at (token, k) entry {s.Index} is outside [0, {config.NumExperts}]; the entry was dropped",
        NativeCode.Capacity => $"rank {s.Rank}: local expert {s.Index} was sent {s.Value} rows but holds {s.Expected}; the rows past it were dropped",
        _ => $"rank {s.Rank}: device error {(NativeCode)s.Code} while {PhaseText(s.Phase)} (peer {s.Peer}, index {s.Index}, value {s.Value})",
    };

    private static string PhaseText(int phase) => phase switch
    {
        PhaseLowLatencyDispatchReceive => "waiting for a peer's low-latency dispatch",
        PhaseLowLatencyCombineReceive => "waiting for a peer's low-latency combine",
        _ => $"phase {phase}",
    };

    /// <summary>
    /// Before a dispatch send: an input error the device recorded in an earlier step that no combine receive has
    /// reported yet is kept, because the send clears the record.
    /// </summary>
    private void TakeInputError()
    {
        if (!inputErrorReported && pendingInputError is null && epa2a_ll_layer_status(layer.Pointer, out NativeStatus s) == 0 && s.Code != 0 && !IsFatal(s.Code))
        {
            pendingInputError = InputError(s);
        }

        inputErrorReported = false;
    }

    /// <summary>After a combine receive was enqueued: reports the step's (or an earlier step's) input error.</summary>
    private void ReportInputError()
    {
        ArgumentException? error = pendingInputError;
        pendingInputError = null;
        if (error is null && !inputErrorReported && epa2a_ll_layer_status(layer.Pointer, out NativeStatus s) == 0 && s.Code != 0 && !IsFatal(s.Code))
        {
            inputErrorReported = true;
            error = InputError(s);
        }

        if (error is not null)
        {
            throw error;
        }
    }

    private ArgumentException InputError(in NativeStatus s)
    {
        string at = s.Index >= 0 && (NativeCode)s.Code == NativeCode.BadExpertId ? $" (expertIds[{s.Index / config.TopK}, {s.Index % config.TopK}] = {s.Value})" : string.Empty;
        return new ArgumentException($"rank {config.Rank}: {StatusText(s)}{at}; the step completed with the other ranks", ExpertIdsParameter);
    }

    /// <summary>Device-API calls: enqueue on the caller's thread (nothing waits there), translating native failures.</summary>
    private void OnCallerThread(OperationContext op, Action work)
    {
        if (threadDevice != device + 1)
        {
            Check(epa2a_use_device(device), "epa2a_use_device");
            threadDevice = device + 1;
        }

        try
        {
            work();
        }
        catch (NativeCallException e)
        {
            throw Translate(e, op);
        }
    }

    /// <summary>
    /// Host-API calls: run on the worker while the operation's token (deadline or caller) aborts the layer's device
    /// waits; native failures are translated on the worker, where libepa2a's last error lives.
    /// </summary>
    private async ValueTask<T> OnWorkerAsync<T>(OperationContext op, Func<T> work)
    {
        T result;
        T Translated()
        {
            try
            {
                return work();
            }
            catch (NativeCallException e)
            {
                throw Translate(e, op);
            }
        }

        using (op.Token.UnsafeRegister(static self => ((CudaLowLatencyBackend)self!).Abort(), this))
        {
            result = await worker.RunAsync(Translated).ConfigureAwait(false);
        }

        if (Volatile.Read(ref abortRequested) != 0)
        {
            // The abort landed after the device work was done: the flag now stops every later wait, so the layer needs
            // the collective reset like any failed step.
            needsRecovery = true;
            throw Cancelled(op, null, -1, "the step was cancelled as it completed");
        }

        return result;
    }

    /// <summary>Any thread: makes every device wait of the layer give up now.</summary>
    private void Abort()
    {
        if (disposed || layer.IsClosed)
        {
            return;
        }

        Volatile.Write(ref abortRequested, 1);
        _ = epa2a_ll_layer_abort(layer.Pointer);
    }

    private Exception Cancelled(OperationContext op, Exception? inner, int peer, string detail)
    {
        if (op.Deadline.IsCancellationRequested)
        {
            return new EpStepTimeoutException($"rank {config.Rank}: low-latency operation {op.Sequence} passed its {op.Timeout.TotalSeconds:0.###} s deadline: {detail}", peer);
        }

        return new OperationCanceledException($"rank {config.Rank}: low-latency operation {op.Sequence} {detail}", inner, op.Token);
    }

    /// <summary>Turns a native failure into the exception the layer's callers expect.</summary>
    private Exception Translate(NativeCallException e, OperationContext op)
    {
        switch ((NativeCode)e.Code)
        {
            case NativeCode.Timeout:
            case NativeCode.Aborted:
            case NativeCode.BadRow:
                {
                    needsRecovery = true;
                    int peer = epa2a_ll_layer_status(layer.Pointer, out NativeStatus status) == 0 && status.Code != 0 ? status.Peer : -1;
                    string who = peer >= 0 ? $"rank {peer}" : "a peer";
                    string detail = $"{e.Message}; every rank must call RecoverAsync together before the next step";
                    if ((NativeCode)e.Code == NativeCode.Timeout || op.Deadline.IsCancellationRequested)
                    {
                        return new EpStepTimeoutException($"rank {config.Rank}: {who} did not arrive within {op.Timeout.TotalSeconds:0.###} s (low-latency operation {op.Sequence}): {detail}", peer);
                    }

                    if (op.Token.IsCancellationRequested)
                    {
                        return Cancelled(op, e, peer, $"was cancelled while waiting for {who}: {detail}");
                    }

                    if ((NativeCode)e.Code == NativeCode.BadRow)
                    {
                        return new EpStepFailedException($"rank {config.Rank}: a row index failed its bounds check: {detail}", peer, e);
                    }

                    return new EpStepAbortedException($"rank {config.Rank}: the low-latency step was aborted while waiting for {who}: {detail}", peer);
                }

            case NativeCode.BadExpertId:
            case NativeCode.Capacity:
                return new ArgumentException($"rank {config.Rank}: {e.Message}", ExpertIdsParameter, e);
            case NativeCode.InvalidArgument:
                return new ArgumentException($"rank {config.Rank}: {e.Message}", e);
            case NativeCode.State:
                needsRecovery |= e.Message.Contains("epa2a_ll_layer_reset", StringComparison.Ordinal);
                return new InvalidOperationException($"rank {config.Rank}: {e.Message}", e);
            default:
                return e;
        }
    }

    /// <summary>On the worker: waits for the stream; a recorded device error (other than a dropped input) throws.</summary>
    private void Synchronize(string call)
    {
        int status = epa2a_ll_layer_sync(layer.Pointer, stream.Pointer);
        if (status is (int)NativeCode.BadExpertId or (int)NativeCode.Capacity)
        {
            return; // the entries were dropped and the step completes: the combine receive reports it
        }

        Check(status, call);
    }

    private int[] DownloadRows()
    {
        int[] rows = new int[epr];
        Download(MemoryMarshal.AsBytes(rows.AsSpan()), buffers.RowsPerExpert);
        foreach (int r in rows)
        {
            if (r < 0 || r > blockRows)
            {
                throw new EpStepFailedException($"rank {config.Rank}: the device reported {r} rows for a local expert (capacity {blockRows})");
            }
        }

        hostRows = rows;
        return rows;
    }

    /// <summary>On the worker: captures what <paramref name="enqueue"/> puts on this backend's stream.</summary>
    private nint Capture(Func<int> enqueue, string call) => StreamCapture.Capture(stream.Pointer, enqueue, call);

    private void Record(int ev) => Check(epa2a_event_record(events[ev].Pointer, stream.Pointer), "epa2a_event_record");

    private unsafe void Upload(nint deviceAddress, ReadOnlySpan<byte> host)
    {
        if (host.IsEmpty)
        {
            return;
        }

        fixed (byte* p = host)
        {
            Check(epa2a_memcpy_async(deviceAddress, (nint)p, (nuint)host.Length, stream.Pointer), "epa2a_memcpy_async");

            // The copy reads pageable memory that stays pinned only inside this block.
            Check(epa2a_stream_sync(stream.Pointer), "epa2a_stream_sync");
        }
    }

    private unsafe void Download(Span<byte> host, nint deviceAddress)
    {
        if (host.IsEmpty)
        {
            return;
        }

        fixed (byte* p = host)
        {
            Check(epa2a_memcpy_async((nint)p, deviceAddress, (nuint)host.Length, stream.Pointer), "epa2a_memcpy_async");
            Check(epa2a_stream_sync(stream.Pointer), "epa2a_stream_sync");
        }
    }
}

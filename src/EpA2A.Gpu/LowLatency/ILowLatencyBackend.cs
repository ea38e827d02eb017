using System.Numerics.Tensors;
using EpA2A.Layer;
using EpA2A.Numerics;

namespace EpA2A.LowLatency;

/// <summary>
/// The data plane of an <see cref="EpLowLatencyLayer"/>. The layer validates every argument, enforces the call order
/// (DispatchSend, DispatchReceive, CombineSend, CombineReceive, repeat), opens each call's <see cref="OperationContext"/>
/// (the step's sequence number, the deadline, the caller's cancellation) and records telemetry; a backend moves the data.
/// What every implementation must guarantee:
/// <list type="bullet">
/// <item>Semantics exactly as /work/gpu-feedback/LL-DESIGN.md (and BRIEF §1 "Low-latency mode"): compact expert-major
/// placement by (source rank, token, k), no atomic deciding a position; the FP8 quantizer of <see cref="Fp8E4M3"/>
/// bit for bit; combine sums weight*row in fp32 in k order and rounds once (RNE); an all-dropped token gives zeros.</item>
/// <item>Capacity is fixed at creation ([ExpertsPerRank, WorldSize*MaxTokens, Hidden] receive and combine buffers,
/// MaxTokens-row send buffers); nothing is allocated or grown per step beyond transport messages (CPU).</item>
/// <item>Sends return once the data is issued and never wait for a peer. Receives wait for every one of the W ranks
/// (zero-count destinations included): every wait is bounded by <see cref="OperationContext.Deadline"/> and observes
/// <see cref="OperationContext.Token"/>; when it passes, the failure is an <see cref="Errors.EpStepTimeoutException"/>
/// naming the first rank that had not arrived. On CUDA the wait is on the device (the kernel spins with the deadline and
/// the abort flag) and the host does not wait at all: the device methods return once their kernels are enqueued on the
/// layer's stream (capturable), and a device-side failure (timeout, bad expert id) is reported at the next host
/// synchronisation point, naming the rank and the error as the normal mode does.</item>
/// <item>Host inputs are read before the send returns; device inputs are read in stream order (the caller keeps them
/// alive and unchanged until the stream has passed the send). Ids and weights needed by combine are kept by the
/// backend from the dispatch send (the caller may reuse its arrays).</item>
/// <item>Results are values: receive methods return the buffers' location; the buffers belong to the backend and stay
/// valid until the next dispatch send (dispatch results) or combine receive (device combine result).</item>
/// <item>A failed call leaves the backend usable for a fresh step from DispatchSend (the layer resets its call order); a
/// backend that needs a collective reset first (CUDA) refuses the next step until <see cref="RecoverAsync"/>.</item>
/// </list>
/// </summary>
internal interface ILowLatencyBackend : IDisposable
{
    /// <summary>A short name for logs and tables ("cpu", "cuda").</summary>
    string Name { get; }

    /// <summary>Whether the device API (device inputs and results) is available.</summary>
    bool HasDeviceBuffers { get; }

    /// <summary>
    /// The zero-copy combine-send buffer, [ExpertsPerRank * WorldSize*MaxTokens * Hidden] bf16: a host array on the CPU
    /// backend (null on CUDA).
    /// </summary>
    BFloat16[]? HostCombineBuffer { get; }

    /// <summary>The same buffer on the device (CUDA; 0 on the CPU backend).</summary>
    nint DeviceCombineBuffer { get; }

    /// <summary>
    /// Quantizes (FP8) or copies the tokens into the send buffers and issues one message (CPU) / the peer stores and
    /// signal (CUDA) to every destination, carrying the counts with the data. Returns the bytes of rows it issued.
    /// </summary>
    ValueTask<long> DispatchSendAsync(LowLatencyDispatchInput input, LowLatencyDispatchOptions options, OperationContext operation);

    /// <summary>
    /// Waits for every source (deadline) and places its rows compactly in the expert-major output, with rowsPerExpert.
    /// <paramref name="place"/> says where the caller reads the result (the CPU backend has only the host).
    /// </summary>
    ValueTask<LowLatencyReceived> DispatchReceiveAsync(LowLatencyPlace place, OperationContext operation);

    /// <summary>
    /// Issues the expert outputs of each source's entries back to it (from <paramref name="output"/>, or from the
    /// combine buffer itself when it is <see cref="ZeroCopyExpertOutput"/>); reads only rows below rowsPerExpert.
    /// Returns the bytes of rows it issued.
    /// </summary>
    ValueTask<long> CombineSendAsync(LowLatencyExpertOutput output, bool weighted, OperationContext operation);

    /// <summary>
    /// Waits for every destination (deadline) and writes each token's weighted fp32 sum, rounded once, in the caller's
    /// token order: [TokenCount, Hidden].
    /// </summary>
    ValueTask<LowLatencyCombined> CombineReceiveAsync(LowLatencyPlace place, OperationContext operation);

    /// <summary>Drops per-step state (buffered messages) of steps before <paramref name="sequence"/>.</summary>
    void Reset(long epoch, long sequence);

    /// <summary>After a failed step, brings this rank back to a clean state; collective where the backend needs it (CUDA).</summary>
    ValueTask RecoverAsync() => ValueTask.CompletedTask;
}

/// <summary>Where the caller wants a receive's result.</summary>
internal enum LowLatencyPlace
{
    /// <summary>Host arrays (the host API).</summary>
    Host = 0,

    /// <summary>Device buffers (the device API, CUDA).</summary>
    Device = 1,
}

/// <summary>A dispatch's inputs: host arrays or device pointers.</summary>
internal abstract record LowLatencyDispatchInput(int TokenCount, bool HasWeights);

/// <summary>Host inputs, flat and row-major: tokens [n*Hidden], ids [n*TopK], weights [n*TopK] or null. Validated by the layer.</summary>
internal sealed record HostDispatchInput(BFloat16[] Tokens, int[] ExpertIds, float[]? Weights, int TokenCount)
    : LowLatencyDispatchInput(TokenCount, Weights is not null);

/// <summary>Device inputs (CUDA): tokens [n, Hidden] bf16, ids [n, TopK] int32, weights [n, TopK] fp32 or 0. Shapes validated; ids are device data.</summary>
internal sealed record DeviceDispatchInput(nint Tokens, nint ExpertIds, nint Weights, int TokenCount)
    : LowLatencyDispatchInput(TokenCount, Weights != 0);

/// <summary>A combine's expert outputs, [ExpertsPerRank, WorldSize*MaxTokens, Hidden] bf16.</summary>
internal abstract record LowLatencyExpertOutput;

/// <summary>A dense host tensor of the expert outputs.</summary>
internal sealed record HostExpertOutput(Tensor<BFloat16> Rows) : LowLatencyExpertOutput;

/// <summary>Device expert outputs (CUDA), 16-byte aligned.</summary>
internal sealed record DeviceExpertOutput(nint Rows) : LowLatencyExpertOutput;

/// <summary>The experts wrote straight into the combine-send buffer.</summary>
internal sealed record ZeroCopyExpertOutput : LowLatencyExpertOutput
{
    public static ZeroCopyExpertOutput Instance { get; } = new();
}

/// <summary>Where a dispatch receive left its rows.</summary>
internal abstract record LowLatencyReceived;

/// <summary>
/// Host arrays owned by the backend: bf16 rows or FP8 bytes [ExpertsPerRank*WorldSize*MaxTokens*Hidden], FP8 scales
/// [ExpertsPerRank*WorldSize*MaxTokens*Hidden/128], rows per local expert [ExpertsPerRank].
/// </summary>
internal sealed record HostReceived(BFloat16[]? Tokens, byte[]? Fp8Tokens, float[]? Scales, int[] RowsPerExpert) : LowLatencyReceived;

/// <summary>Device buffers owned by the backend, same shapes (0 for an absent one).</summary>
internal sealed record DeviceReceived(nint Tokens, nint Fp8Tokens, nint Scales, nint RowsPerExpert) : LowLatencyReceived;

/// <summary>Where a combine receive left its [TokenCount, Hidden] bf16 result.</summary>
internal abstract record LowLatencyCombined;

/// <summary>A host array [TokenCount*Hidden], the caller's to keep.</summary>
internal sealed record HostCombined(BFloat16[] Output) : LowLatencyCombined;

/// <summary>A device buffer owned by the backend, valid until the next combine receive.</summary>
internal sealed record DeviceCombined(nint Output) : LowLatencyCombined;

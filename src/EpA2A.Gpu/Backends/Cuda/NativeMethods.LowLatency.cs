using System.Runtime.InteropServices;

namespace EpA2A.Backends.Cuda;

/// <summary>The low-latency layer's part of libepa2a's C ABI (native/include/epa2a.h, "low-latency layer").</summary>
internal static partial class NativeMethods
{
    /// <summary>EPA2A_PHASE_LL_DISPATCH_RECV: a device wait for a peer's low-latency dispatch.</summary>
    public const int PhaseLowLatencyDispatchReceive = 21;

    /// <summary>EPA2A_PHASE_LL_COMBINE_RECV: a device wait for a peer's low-latency combine.</summary>
    public const int PhaseLowLatencyCombineReceive = 22;

    [LibraryImport(Library)]
    internal static partial int epa2a_ll_layer_create(in NativeLowLatencyConfig config, out nint layer);

    [LibraryImport(Library)]
    internal static partial int epa2a_ll_layer_destroy(nint layer);

    [LibraryImport(Library)]
    internal static partial int epa2a_ll_get_buffers(nint layer, out NativeLowLatencyBuffers buffers);

    [LibraryImport(Library)]
    internal static partial int epa2a_ll_layer_set_timeout(nint layer, long timeoutNs);

    [LibraryImport(Library)]
    internal static partial int epa2a_ll_layer_abort(nint layer);

    [LibraryImport(Library)]
    internal static partial int epa2a_ll_layer_status(nint layer, out NativeStatus status);

    [LibraryImport(Library)]
    internal static partial int epa2a_ll_layer_sync(nint layer, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_ll_layer_reset(nint layer);

    [LibraryImport(Library)]
    internal static partial int epa2a_ll_layer_barrier(nint layer, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_ll_dispatch_send(nint layer, nint x, nint expertIds, nint weights, int numTokens, int format, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_ll_dispatch_recv(nint layer, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_ll_combine_send(nint layer, nint expertOutput, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_ll_combine_recv(nint layer, nint output, int weighted, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_ll_dispatch(nint layer, nint x, nint expertIds, nint weights, int numTokens, int format, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_ll_combine(nint layer, nint expertOutput, nint output, int weighted, nint stream);
}

using System.Reflection;
using System.Runtime.InteropServices;
using EpA2A.Cuda;

namespace EpA2A.Backends.Cuda;

/// <summary>
/// The flat C ABI of libepa2a (native/include/epa2a.h). Every call returns a status; <see cref="Check"/>
/// turns a failure into an exception that names the call and carries the library's last error.
/// </summary>
internal static partial class NativeMethods
{
    public const string Library = "epa2a";

    static NativeMethods() => NativeLibrary.SetDllImportResolver(typeof(NativeMethods).Assembly, Resolve);

    [LibraryImport(Library)]
    internal static partial nint epa2a_last_error();

    [LibraryImport(Library)]
    internal static partial int epa2a_version(out int major, out int minor);

    [LibraryImport(Library)]
    internal static partial int epa2a_device_count(out int count);

    [LibraryImport(Library)]
    internal static partial int epa2a_uid_size(out int bytes);

    [LibraryImport(Library)]
    internal static partial int epa2a_use_device(int device);

    [LibraryImport(Library)]
    internal static unsafe partial int epa2a_uid_create(byte* uid, int bytes);

    [LibraryImport(Library)]
    internal static unsafe partial int epa2a_init(byte* uid, int bytes, int rank, int worldSize, int cudaDevice);

    [LibraryImport(Library)]
    internal static partial int epa2a_finalize();

    [LibraryImport(Library)]
    internal static partial int epa2a_rank(out int rank, out int worldSize);

    [LibraryImport(Library)]
    internal static partial int epa2a_sym_malloc(nuint bytes, out nint ptr);

    [LibraryImport(Library)]
    internal static partial int epa2a_sym_free(nint ptr);

    [LibraryImport(Library)]
    internal static partial int epa2a_sym_peer_ptr(nint ptr, int peer, out nint peerPtr);

    [LibraryImport(Library)]
    internal static partial int epa2a_barrier_all(nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_barrier_node(nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_stream_create(out nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_stream_destroy(nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_stream_sync(nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_event_create(out nint evt);

    [LibraryImport(Library)]
    internal static partial int epa2a_event_record(nint evt, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_event_sync(nint evt);

    [LibraryImport(Library)]
    internal static partial int epa2a_event_elapsed_ms(nint start, nint end, out float ms);

    [LibraryImport(Library)]
    internal static partial int epa2a_event_destroy(nint evt);

    [LibraryImport(Library)]
    internal static partial int epa2a_memcpy_async(nint dst, nint src, nuint bytes, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_memset_async(nint dst, int byteValue, nuint bytes, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_host_alloc_pinned(nuint bytes, out nint ptr);

    [LibraryImport(Library)]
    internal static partial int epa2a_host_free_pinned(nint ptr);

    [LibraryImport(Library)]
    internal static partial int epa2a_device_alloc(nuint bytes, out nint ptr);

    [LibraryImport(Library)]
    internal static partial int epa2a_device_free(nint ptr);

    [LibraryImport(Library)]
    internal static partial int epa2a_device_sync();

    [LibraryImport(Library)]
    internal static partial int epa2a_layer_create(in NativeLayerConfig config, out nint layer);

    [LibraryImport(Library)]
    internal static partial int epa2a_layer_destroy(nint layer);

    [LibraryImport(Library)]
    internal static partial int epa2a_layer_get_buffers(nint layer, out NativeLayerBuffers buffers);

    [LibraryImport(Library)]
    internal static partial int epa2a_layer_grow_output(nint layer, int rows);

    [LibraryImport(Library)]
    internal static partial int epa2a_layer_set_timeout(nint layer, long timeoutNs);

    [LibraryImport(Library)]
    internal static partial int epa2a_layer_abort(nint layer);

    [LibraryImport(Library)]
    internal static partial int epa2a_layer_status(nint layer, out NativeStatus status);

    [LibraryImport(Library)]
    internal static partial int epa2a_layer_sync(nint layer, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_layer_reset(nint layer);

    [LibraryImport(Library)]
    internal static partial int epa2a_layer_barrier(nint layer, int intraNodeOnly, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_dispatch_prepare(nint layer, nint tokens, nint expertIds, nint weights, nint scatterIndices, int numTokens, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_dispatch_wait_sizes(nint layer, long timeoutNs, out int maxRecvRows);

    [LibraryImport(Library)]
    internal static unsafe partial int epa2a_dispatch_get_layout(nint layer, int* recvRowsPerRank, int* tokensPerRank, int* rowsPerLocalExpert, int* paddedRowsPerLocalExpert, int* expertRowStarts);

    [LibraryImport(Library)]
    internal static partial int epa2a_dispatch_send(nint layer, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_dispatch_finish(nint layer, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_combine(nint layer, nint expertOutput, nint output, int weighted, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_dispatch_reject(nint layer, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_combine_reject(nint layer, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_dispatch_enqueue(nint layer, nint tokens, nint expertIds, nint weights, nint scatterIndices, int numTokens, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_graph_begin(nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_graph_end(nint stream, out nint graphExec);

    [LibraryImport(Library)]
    internal static partial int epa2a_graph_launch(nint graphExec, nint stream);

    [LibraryImport(Library)]
    internal static partial int epa2a_graph_destroy(nint graphExec);

    [LibraryImport(Library)]
    internal static partial int epa2a_mem_info(out nuint freeBytes, out nuint totalBytes);

    /// <summary>The library's last error on this thread.</summary>
    public static string LastError() => Marshal.PtrToStringUTF8(epa2a_last_error()) ?? "(no message)";

    /// <summary>Throws <see cref="NativeCallException"/> naming <paramref name="call"/> unless the status is ok.</summary>
    public static void Check(int status, string call)
    {
        if (status != 0)
        {
            throw new NativeCallException(call, (NativeCode)status, LastError());
        }
    }

    /// <summary>True when libepa2a and a CUDA device can be used in this process.</summary>
    public static bool IsAvailable(out string why)
    {
        try
        {
            Check(epa2a_device_count(out int count), "epa2a_device_count");
            why = count > 0 ? string.Empty : "no CUDA device";
            return count > 0;
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException or NativeCallException or BadImageFormatException)
        {
            why = e.Message;
            return false;
        }
    }

    // Looks in EPA2A_NATIVE_DIR, next to the app, then native/build of a source checkout, before the loader's own search.
    private static nint Resolve(string name, Assembly assembly, DllImportSearchPath? path)
    {
        if (name != Library)
        {
            return 0;
        }

        List<string> dirs = [];
        if (Environment.GetEnvironmentVariable("EPA2A_NATIVE_DIR") is { Length: > 0 } env)
        {
            dirs.Add(env);
        }

        dirs.Add(AppContext.BaseDirectory);
        for (DirectoryInfo? d = new(AppContext.BaseDirectory); d is not null; d = d.Parent)
        {
            dirs.Add(Path.Combine(d.FullName, "native", "build"));
        }

        foreach (string dir in dirs)
        {
            string candidate = Path.Combine(dir, "libepa2a.so");
            if (File.Exists(candidate) && NativeLibrary.TryLoad(candidate, out nint handle))
            {
                return handle;
            }
        }

        return 0;
    }
}

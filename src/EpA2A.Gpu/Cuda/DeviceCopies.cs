using System.Runtime.InteropServices;
using EpA2A.Backends.Cuda;
using EpA2A.Layer;
using static EpA2A.Backends.Cuda.NativeMethods;

namespace EpA2A.Cuda;

/// <summary>
/// Copies and fills between device views, and the device-to-device copy bandwidth: the ceiling of a step when
/// every rank shares one GPU (its bytes read + written over this rate).
/// </summary>
public static class DeviceCopies
{
    /// <summary>Copies <paramref name="bytes"/> bytes between device (or host-mapped) pointers and waits for the copy.</summary>
    public static Task CopyAsync(NvshmemRuntime runtime, nint destination, nint source, long bytes)
    {
        ArgumentNullException.ThrowIfNull(runtime);
        runtime.ThrowIfDisposed();
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        return runtime.Worker.RunAsync(() =>
        {
            Check(epa2a_memcpy_async(destination, source, (nuint)bytes, runtime.CopyStream), "epa2a_memcpy_async");
            Check(epa2a_stream_sync(runtime.CopyStream), "epa2a_stream_sync");
        });
    }

    /// <summary>Copies a device view into host memory of the same element count and waits for the copy.</summary>
    public static Task DownloadAsync<T>(NvshmemRuntime runtime, DeviceTensor<T> source, Memory<T> destination)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(runtime);
        ArgumentNullException.ThrowIfNull(source);
        runtime.ThrowIfDisposed();
        if (destination.Length != source.FlattenedLength)
        {
            throw new ArgumentException($"destination has {destination.Length} elements; {source} has {source.FlattenedLength}", nameof(destination));
        }

        return runtime.Worker.RunAsync(() => HostCopy(runtime, source.Pointer, MemoryMarshal.AsBytes(destination.Span), toDevice: false));
    }

    /// <summary>Copies host memory into a device view of the same element count and waits for the copy.</summary>
    public static Task UploadAsync<T>(NvshmemRuntime runtime, ReadOnlyMemory<T> source, DeviceTensor<T> destination)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(runtime);
        ArgumentNullException.ThrowIfNull(destination);
        runtime.ThrowIfDisposed();
        if (source.Length != destination.FlattenedLength)
        {
            throw new ArgumentException($"source has {source.Length} elements; {destination} has {destination.FlattenedLength}", nameof(source));
        }

        return runtime.Worker.RunAsync(() => HostCopy(runtime, destination.Pointer, MemoryMarshal.AsBytes(source.Span), toDevice: true));
    }

    /// <summary>Sets <paramref name="bytes"/> bytes at <paramref name="destination"/> to <paramref name="value"/>.</summary>
    public static Task FillAsync(NvshmemRuntime runtime, nint destination, long bytes, byte value)
    {
        ArgumentNullException.ThrowIfNull(runtime);
        runtime.ThrowIfDisposed();
        ArgumentOutOfRangeException.ThrowIfNegative(bytes);
        return runtime.Worker.RunAsync(() =>
        {
            Check(epa2a_memset_async(destination, value, (nuint)bytes, runtime.CopyStream), "epa2a_memset_async");
            Check(epa2a_stream_sync(runtime.CopyStream), "epa2a_stream_sync");
        });
    }

    /// <summary>
    /// Median device-to-device copy rate of a <paramref name="bytes"/>-byte buffer, in bytes read + written per second
    /// (CUDA events, after two warm-up copies).
    /// </summary>
    public static Task<double> MeasureBandwidthAsync(NvshmemRuntime runtime, long bytes = 1L << 30, int repeats = 10)
    {
        ArgumentNullException.ThrowIfNull(runtime);
        runtime.ThrowIfDisposed();
        ArgumentOutOfRangeException.ThrowIfLessThan(bytes, 1L << 20);
        ArgumentOutOfRangeException.ThrowIfLessThan(repeats, 1);
        GpuWorker w = runtime.Worker;
        return w.RunAsync(() =>
        {
            using DeviceMemoryHandle a = DeviceMemoryHandle.Allocate(w, bytes);
            using DeviceMemoryHandle b = DeviceMemoryHandle.Allocate(w, bytes);
            using CudaEventHandle start = CudaEventHandle.Create(w);
            using CudaEventHandle end = CudaEventHandle.Create(w);
            nint s = runtime.CopyStream;
            Check(epa2a_memset_async(a.Pointer, 0x3c, (nuint)bytes, s), "epa2a_memset_async");
            List<double> ms = [];
            for (int i = 0; i < repeats + 2; i++)
            {
                Check(epa2a_event_record(start.Pointer, s), "epa2a_event_record");
                Check(epa2a_memcpy_async(b.Pointer, a.Pointer, (nuint)bytes, s), "epa2a_memcpy_async");
                Check(epa2a_event_record(end.Pointer, s), "epa2a_event_record");
                Check(epa2a_event_sync(end.Pointer), "epa2a_event_sync");
                Check(epa2a_event_elapsed_ms(start.Pointer, end.Pointer, out float t), "epa2a_event_elapsed_ms");
                if (i >= 2)
                {
                    ms.Add(t);
                }
            }

            ms.Sort();
            return 2.0 * bytes / (ms[ms.Count / 2] * 1e-3);
        });
    }

    private static unsafe void HostCopy(NvshmemRuntime runtime, nint device, ReadOnlySpan<byte> host, bool toDevice)
    {
        if (host.IsEmpty)
        {
            return;
        }

        fixed (byte* p = host)
        {
            nint h = (nint)p;
            Check(toDevice ? epa2a_memcpy_async(device, h, (nuint)host.Length, runtime.CopyStream) : epa2a_memcpy_async(h, device, (nuint)host.Length, runtime.CopyStream), "epa2a_memcpy_async");
            Check(epa2a_stream_sync(runtime.CopyStream), "epa2a_stream_sync");
        }
    }
}

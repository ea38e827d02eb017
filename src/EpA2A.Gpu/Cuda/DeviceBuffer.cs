using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using EpA2A.Backends.Cuda;
using EpA2A.Layer;
using static EpA2A.Backends.Cuda.NativeMethods;

namespace EpA2A.Cuda;

/// <summary>
/// Device memory of a <typeparamref name="T"/>-typed shape, owned by the caller (inputs and expert outputs for the
/// layer's device-buffer API). Copies run on the runtime's GPU worker and complete before their task does.
/// </summary>
/// <typeparam name="T">The element type.</typeparam>
public sealed class DeviceBuffer<T> : IDisposable
    where T : unmanaged
{
    private readonly NvshmemRuntime runtime;
    private readonly DeviceMemoryHandle memory;

    internal DeviceBuffer(NvshmemRuntime runtime, DeviceMemoryHandle memory, int[] shape)
    {
        this.runtime = runtime;
        this.memory = memory;
        Tensor = new DeviceTensor<T>(memory.Pointer, shape, this);
    }

    /// <summary>The buffer as a typed view.</summary>
    public DeviceTensor<T> Tensor { get; }

    /// <summary>Copies <paramref name="source"/> (exactly the buffer's element count) to the device.</summary>
    public Task UploadAsync(ReadOnlyMemory<T> source)
    {
        CheckLength(source.Length, nameof(source));
        return runtime.Worker.RunAsync(() => Copy(memory.Pointer, source.Span, toDevice: true));
    }

    /// <summary>Copies the device contents into <paramref name="destination"/> (exactly the buffer's element count).</summary>
    public Task DownloadAsync(Memory<T> destination)
    {
        CheckLength(destination.Length, nameof(destination));
        return runtime.Worker.RunAsync(() => Copy(memory.Pointer, destination.Span, toDevice: false));
    }

    /// <summary>Sets every byte to <paramref name="value"/> (0xFF makes every bf16, fp16 and fp32 element a NaN).</summary>
    public Task FillBytesAsync(byte value) => DeviceCopies.FillAsync(runtime, Tensor.Pointer, Tensor.ByteLength, value);

    /// <summary>Frees the memory (queued on the GPU worker, after work already queued).</summary>
    public void Dispose() => memory.Dispose();

    private void CheckLength(int length, string argument)
    {
        ObjectDisposedException.ThrowIf(memory.IsClosed, this);
        if (length != Tensor.FlattenedLength)
        {
            throw new ArgumentException($"{argument} has {length} elements; the buffer holds {Tensor.FlattenedLength}", argument);
        }
    }

    private unsafe void Copy(nint device, ReadOnlySpan<T> host, bool toDevice)
    {
        ReadOnlySpan<byte> bytes = MemoryMarshal.AsBytes(host);
        if (bytes.IsEmpty)
        {
            return;
        }

        fixed (byte* p = bytes)
        {
            nint h = (nint)p;
            Check(toDevice ? epa2a_memcpy_async(device, h, (nuint)bytes.Length, runtime.CopyStream) : epa2a_memcpy_async(h, device, (nuint)bytes.Length, runtime.CopyStream), "epa2a_memcpy_async");
            Check(epa2a_stream_sync(runtime.CopyStream), "epa2a_stream_sync");
        }
    }

    private void Copy(nint device, Span<T> host, bool toDevice) => Copy(device, (ReadOnlySpan<T>)host, toDevice);
}

/// <summary>Allocates <see cref="DeviceBuffer{T}"/>s.</summary>
public static class DeviceBuffer
{
    /// <summary>Allocates device memory of <paramref name="shape"/> on the runtime's device (contents undefined).</summary>
    public static DeviceBuffer<T> Allocate<T>(NvshmemRuntime runtime, params int[] shape)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(runtime);
        ArgumentNullException.ThrowIfNull(shape);
        runtime.ThrowIfDisposed();
        long elements = 1;
        foreach (int d in shape)
        {
            ArgumentOutOfRangeException.ThrowIfNegative(d, nameof(shape));
            elements *= d;
        }

        long bytes = elements * Unsafe.SizeOf<T>();
        int[] dims = [.. shape];
        return runtime.Worker.Run(() => new DeviceBuffer<T>(runtime, DeviceMemoryHandle.Allocate(runtime.Worker, bytes), dims));
    }
}

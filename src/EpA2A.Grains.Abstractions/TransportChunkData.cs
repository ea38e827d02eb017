using System.Buffers;
using EpA2A.Transport;
using Orleans.Serialization.Buffers;
using Orleans.Serialization.Cloning;
using Orleans.Serialization.Codecs;
using Orleans.Serialization.WireProtocol;

namespace EpA2A.Grains;

/// <summary>
/// The bytes of a <see cref="TransportChunk"/>. On the sender's side a view of a slice of its message's buffer: nothing is
/// copied until Orleans writes the call onto the wire, and the sender's transport owns (and later releases) the buffer. On
/// the receiver's side the codec rents a <see cref="TransportBuffer"/> and reads the bytes into it, so a received chunk
/// allocates no array; whoever takes it with <see cref="TakeBuffer"/> owns it from then on.
/// </summary>
public sealed class TransportChunkData
{
    private TransportBuffer? received;

    /// <summary>A view of bytes the caller keeps owning (and must not change or release until the call has finished).</summary>
    public TransportChunkData(ReadOnlyMemory<byte> bytes) => Bytes = bytes;

    private TransportChunkData(TransportBuffer received)
    {
        this.received = received;
        Bytes = received.Memory;
    }

    /// <summary>The chunk's bytes; for a received chunk, readable until its buffer is taken and released.</summary>
    public ReadOnlyMemory<byte> Bytes { get; }

    /// <summary>The chunk's length in bytes.</summary>
    public int Length => Bytes.Length;

    /// <summary>
    /// The buffer the codec rented for a received chunk, once: the caller owns it from here (to post as a message, or to
    /// release after copying from it). Null for a sender's view, which owns no buffer, or when already taken.
    /// </summary>
    public TransportBuffer? TakeBuffer() => Interlocked.Exchange(ref received, null);

    /// <summary>Writes the bytes length-prefixed, as Orleans writes a byte array; reads them into a rented buffer.</summary>
    [RegisterSerializer]
    internal sealed class Codec : IFieldCodec<TransportChunkData>
    {
        public void WriteField<TBufferWriter>(ref Writer<TBufferWriter> writer, uint fieldIdDelta, Type? expectedType, TransportChunkData? value)
            where TBufferWriter : IBufferWriter<byte>
        {
            if (ReferenceCodec.TryWriteReferenceField(ref writer, fieldIdDelta, expectedType, value))
            {
                return;
            }

            writer.WriteFieldHeader(fieldIdDelta, expectedType, typeof(TransportChunkData), WireType.LengthPrefixed);
            ReadOnlySpan<byte> bytes = value!.Bytes.Span; // not null: TryWriteReferenceField wrote a null
            writer.WriteVarUInt32((uint)bytes.Length);
            writer.Write(bytes);
        }

        public TransportChunkData? ReadValue<TInput>(ref Reader<TInput> reader, Field field)
        {
            if (field.WireType == WireType.Reference)
            {
                return ReferenceCodec.ReadReference<TransportChunkData, TInput>(ref reader, field);
            }

            field.EnsureWireType(WireType.LengthPrefixed);
            uint length = reader.ReadVarUInt32();
            if (length > (uint)Array.MaxLength)
            {
                throw new InvalidDataException($"a transport chunk announces {length} bytes, more than an array holds");
            }

            // A length larger than the bytes that follow fails in ReadBytes; the rented buffer is then left to the GC.
            TransportBuffer buffer = TransportBuffer.Rent((int)length);
            reader.ReadBytes(buffer.Span);
            TransportChunkData value = new(buffer);
            ReferenceCodec.RecordObject(reader.Session, value);
            return value;
        }
    }

    /// <summary>
    /// A call inside one silo passes the chunk without serializing it (the chunk is immutable), so this copier runs only
    /// for a chunk copied on its own; the copy is a plain view, never a second owner of the original's buffer.
    /// </summary>
    [RegisterCopier]
    internal sealed class Copier : IDeepCopier<TransportChunkData>
    {
        public TransportChunkData? DeepCopy(TransportChunkData? input, CopyContext context)
        {
            ArgumentNullException.ThrowIfNull(context);
            if (input is null)
            {
                return null;
            }

            if (context.TryGetCopy(input, out TransportChunkData? copy))
            {
                return copy;
            }

            copy = new TransportChunkData(input.Bytes.ToArray());
            context.RecordCopy(input, copy);
            return copy;
        }
    }
}

using System.Buffers.Binary;
using System.Text.Json;

namespace EpA2A.Safetensors;

/// <summary>
/// Writes safetensors files deterministically: the same tensors and metadata give the same bytes. The header
/// is compact JSON with "__metadata__" first (keys sorted), then the tensors sorted by name (ordinal), whose
/// data lie in the same order; the header is padded with spaces to a multiple of 8 bytes so the data buffer
/// starts 8-byte aligned.
/// </summary>
public static class SafetensorsWriter
{
    private const int Alignment = 8;

    /// <summary>The whole file as bytes.</summary>
    public static byte[] Serialize(SafetensorsFile file)
    {
        ArgumentNullException.ThrowIfNull(file);
        byte[] header = Header(file);
        long total = 8L + header.Length + file.Tensors.Sum(t => (long)t.Data.Length);
        if (total > Array.MaxLength)
        {
            throw new InvalidOperationException($"the file would be {total} bytes, more than one array holds; use {nameof(WriteTo)}");
        }

        byte[] bytes = new byte[total];
        using MemoryStream stream = new(bytes);
        WriteTo(stream, file, header);
        return bytes;
    }

    /// <summary>Writes the file to <paramref name="path"/>, replacing it only once it is complete.</summary>
    public static void Write(string path, SafetensorsFile file)
    {
        ArgumentNullException.ThrowIfNull(path);
        ArgumentNullException.ThrowIfNull(file);
        string full = Path.GetFullPath(path);
        string partial = full + ".partial";
        try
        {
            using (FileStream stream = new(partial, FileMode.Create, FileAccess.Write, FileShare.None))
            {
                WriteTo(stream, file);
            }

            File.Move(partial, full, overwrite: true);
        }
        finally
        {
            File.Delete(partial);
        }
    }

    /// <summary>Writes the file to a stream.</summary>
    public static void WriteTo(Stream stream, SafetensorsFile file)
    {
        ArgumentNullException.ThrowIfNull(stream);
        ArgumentNullException.ThrowIfNull(file);
        WriteTo(stream, file, Header(file));
    }

    private static void WriteTo(Stream stream, SafetensorsFile file, byte[] header)
    {
        Span<byte> prefix = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(prefix, (ulong)header.Length);
        stream.Write(prefix);
        stream.Write(header);
        foreach (SafetensorsTensor tensor in file.Tensors)
        {
            stream.Write(tensor.Data.Span);
        }
    }

    private static byte[] Header(SafetensorsFile file)
    {
        using MemoryStream json = new();
        using (Utf8JsonWriter writer = new(json))
        {
            writer.WriteStartObject();
            if (file.Metadata.Count > 0)
            {
                writer.WriteStartObject(SafetensorsTensor.MetadataKey);
                foreach ((string key, string value) in file.Metadata)
                {
                    writer.WriteString(key, value);
                }

                writer.WriteEndObject();
            }

            long offset = 0;
            foreach (SafetensorsTensor tensor in file.Tensors)
            {
                writer.WriteStartObject(tensor.Name);
                writer.WriteString("dtype", SafetensorsDTypes.NameOf(tensor.DType));
                writer.WriteStartArray("shape");
                foreach (long dim in tensor.Shape)
                {
                    writer.WriteNumberValue(dim);
                }

                writer.WriteEndArray();
                writer.WriteStartArray("data_offsets");
                writer.WriteNumberValue(offset);
                offset += tensor.Data.Length;
                writer.WriteNumberValue(offset);
                writer.WriteEndArray();
                writer.WriteEndObject();
            }

            writer.WriteEndObject();
        }

        int length = (int)json.Length;
        int padded = (length + Alignment - 1) / Alignment * Alignment;
        byte[] header = new byte[padded];
        json.GetBuffer().AsSpan(0, length).CopyTo(header);
        header.AsSpan(length).Fill((byte)' ');
        return header;
    }
}

using System.Buffers.Binary;
using System.Text.Json;

namespace EpA2A.Safetensors;

/// <summary>
/// Reads safetensors files, checking every rule of the format before a tensor is handed out: an 8-byte
/// little-endian header length N, N bytes of UTF-8 JSON starting with '{', then the data buffer, which the
/// tensors' data_offsets (relative to the buffer) must tile exactly, without gaps or overlaps. A broken file
/// is an <see cref="InvalidDataException"/> whose message names the file, the tensor and the rule.
/// </summary>
public static class SafetensorsReader
{
    /// <summary>The largest header accepted (as the reference implementation): anything bigger is not a real header.</summary>
    public const long MaxHeaderBytes = 100_000_000;

    private const int LengthPrefixBytes = 8;

    /// <summary>Reads and checks a whole file. The header is checked before the data buffer is read.</summary>
    /// <exception cref="InvalidDataException">The file breaks a rule of the format.</exception>
    /// <exception cref="IOException">The file cannot be read.</exception>
    public static SafetensorsFile Read(string path)
    {
        ArgumentNullException.ThrowIfNull(path);
        using FileStream stream = new(path, FileMode.Open, FileAccess.Read, FileShare.Read, bufferSize: 1, FileOptions.SequentialScan);
        long fileLength = stream.Length;
        Span<byte> prefix = stackalloc byte[LengthPrefixBytes];
        int got = stream.ReadAtLeast(prefix, LengthPrefixBytes, throwOnEndOfStream: false);
        long headerLength = CheckHeaderLength(path, fileLength, got < LengthPrefixBytes ? null : BinaryPrimitives.ReadUInt64LittleEndian(prefix));

        byte[] header = new byte[headerLength];
        stream.ReadExactly(header);
        long bufferLength = fileLength - LengthPrefixBytes - headerLength;
        List<Entry> entries = ParseHeader(path, header, bufferLength, out Dictionary<string, string> metadata);
        if (bufferLength > Array.MaxLength)
        {
            throw new InvalidDataException($"{path}: the data buffer is {bufferLength} bytes; this reader holds at most {Array.MaxLength} in memory");
        }

        byte[] buffer = new byte[bufferLength];
        stream.ReadExactly(buffer);
        return Build(entries, buffer, metadata);
    }

    /// <summary>Checks and reads a file held in memory; the tensors share <paramref name="bytes"/>.</summary>
    /// <param name="bytes">The whole file.</param>
    /// <param name="source">What to call the file in error messages.</param>
    /// <exception cref="InvalidDataException">The bytes break a rule of the format.</exception>
    public static SafetensorsFile Parse(ReadOnlyMemory<byte> bytes, string source)
    {
        ArgumentNullException.ThrowIfNull(source);
        ReadOnlySpan<byte> span = bytes.Span;
        long headerLength = CheckHeaderLength(source, span.Length, span.Length < LengthPrefixBytes ? null : BinaryPrimitives.ReadUInt64LittleEndian(span));
        int bufferStart = LengthPrefixBytes + (int)headerLength;
        List<Entry> entries = ParseHeader(source, bytes[LengthPrefixBytes..bufferStart], span.Length - bufferStart, out Dictionary<string, string> metadata);
        return Build(entries, bytes[bufferStart..], metadata);
    }

    private static long CheckHeaderLength(string source, long fileLength, ulong? headerLength)
    {
        if (headerLength is not { } n)
        {
            throw new InvalidDataException($"{source}: the file is {fileLength} bytes, too short for the 8-byte header length that starts a safetensors file");
        }

        if (n > MaxHeaderBytes)
        {
            throw new InvalidDataException($"{source}: the header length is {n} bytes, more than the {MaxHeaderBytes} a safetensors header may have (not a safetensors file?)");
        }

        if ((long)n > fileLength - LengthPrefixBytes)
        {
            throw new InvalidDataException($"{source}: the header length is {n} bytes, but only {fileLength - LengthPrefixBytes} bytes follow the length (truncated file?)");
        }

        return (long)n;
    }

    private static List<Entry> ParseHeader(string source, ReadOnlyMemory<byte> header, long bufferLength, out Dictionary<string, string> metadata)
    {
        if (header.Length == 0 || header.Span[0] != (byte)'{')
        {
            throw new InvalidDataException($"{source}: the header must be a JSON object starting with '{{' (it starts with {(header.Length == 0 ? "nothing" : $"byte 0x{header.Span[0]:X2}")})");
        }

        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(header, new JsonDocumentOptions { MaxDepth = 16 });
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{source}: the header is not valid JSON: {e.Message}", e);
        }

        using (document)
        {
            metadata = new Dictionary<string, string>(StringComparer.Ordinal);
            List<Entry> entries = [];
            HashSet<string> names = new(StringComparer.Ordinal);
            foreach (JsonProperty property in document.RootElement.EnumerateObject())
            {
                if (!names.Add(property.Name))
                {
                    throw new InvalidDataException($"{source}: the header names '{property.Name}' twice; names must be unique");
                }

                if (property.Name == SafetensorsTensor.MetadataKey)
                {
                    ReadMetadata(source, property.Value, metadata);
                }
                else
                {
                    entries.Add(ReadEntry(source, property.Name, property.Value));
                }
            }

            CheckLayout(source, entries, bufferLength);
            return entries;
        }
    }

    private static void ReadMetadata(string source, JsonElement value, Dictionary<string, string> metadata)
    {
        if (value.ValueKind != JsonValueKind.Object)
        {
            throw new InvalidDataException($"{source}: '{SafetensorsTensor.MetadataKey}' is a JSON {Kind(value)}; it must be an object of strings");
        }

        foreach (JsonProperty item in value.EnumerateObject())
        {
            if (item.Value.ValueKind != JsonValueKind.String)
            {
                throw new InvalidDataException($"{source}: metadata '{item.Name}' is a JSON {Kind(item.Value)}; metadata values must be strings");
            }

            if (!metadata.TryAdd(item.Name, item.Value.GetString()!))
            {
                throw new InvalidDataException($"{source}: metadata names '{item.Name}' twice; keys must be unique");
            }
        }
    }

    private static Entry ReadEntry(string source, string name, JsonElement value)
    {
        string where = $"{source}: tensor '{name}'";
        if (value.ValueKind != JsonValueKind.Object)
        {
            throw new InvalidDataException($"{where} is a JSON {Kind(value)}; it must be an object with dtype, shape and data_offsets");
        }

        string dtypeName = Member(where, value, "dtype", JsonValueKind.String).GetString()!;
        if (!SafetensorsDTypes.TryParse(dtypeName, out SafetensorsDType dtype))
        {
            throw new InvalidDataException($"{where} has dtype \"{dtypeName}\", which this reader does not know (known: {SafetensorsDTypes.KnownNames})");
        }

        long[] shape = Integers(where, Member(where, value, "shape", JsonValueKind.Array), "shape");
        for (int i = 0; i < shape.Length; i++)
        {
            if (shape[i] < 0)
            {
                throw new InvalidDataException($"{where} has shape {SafetensorsTensor.FormatShape(shape)}: dimension {i} is negative");
            }
        }

        long[] offsets = Integers(where, Member(where, value, "data_offsets", JsonValueKind.Array), "data_offsets");
        if (offsets.Length != 2 || offsets[0] < 0 || offsets[1] < offsets[0])
        {
            throw new InvalidDataException($"{where} has data_offsets {SafetensorsTensor.FormatShape(offsets)}; they must be [begin, end] with 0 <= begin <= end");
        }

        long count = SafetensorsTensor.CountElements(shape)
            ?? throw new InvalidDataException($"{where} has shape {SafetensorsTensor.FormatShape(shape)}, whose element count overflows 64 bits");
        long? bytes = SafetensorsTensor.ByteLength(count, dtype);
        long span = offsets[1] - offsets[0];
        if (bytes != span)
        {
            throw new InvalidDataException(
                $"{where}: shape {SafetensorsTensor.FormatShape(shape)} of {dtypeName} needs {(bytes is null ? "more than 2^63" : bytes.Value.ToString(System.Globalization.CultureInfo.InvariantCulture))} bytes, but data_offsets [{offsets[0]}, {offsets[1]}] span {span}");
        }

        return new Entry(name, dtype, shape, count, offsets[0], offsets[1]);
    }

    /// <summary>The tensors must tile the buffer: sorted by offset, each begins where the previous ended, the last ends at its end.</summary>
    private static void CheckLayout(string source, List<Entry> entries, long bufferLength)
    {
        foreach (Entry e in entries)
        {
            if (e.End > bufferLength)
            {
                throw new InvalidDataException($"{source}: tensor '{e.Name}' has data_offsets [{e.Begin}, {e.End}], past the end of the {bufferLength}-byte data buffer");
            }
        }

        Entry[] sorted = [.. entries.OrderBy(e => e.Begin).ThenBy(e => e.End).ThenBy(e => e.Name, StringComparer.Ordinal)];
        long covered = 0;
        Entry? previous = null;
        foreach (Entry e in sorted)
        {
            if (e.Begin > covered)
            {
                throw new InvalidDataException($"{source}: bytes [{covered}, {e.Begin}) of the data buffer belong to no tensor (a gap before tensor '{e.Name}'); tensors must cover the buffer without gaps");
            }

            if (e.Begin < covered)
            {
                throw new InvalidDataException($"{source}: tensor '{e.Name}' [{e.Begin}, {e.End}) overlaps tensor '{previous!.Name}' [{previous.Begin}, {previous.End})");
            }

            covered = e.End;
            previous = e;
        }

        if (covered != bufferLength)
        {
            throw new InvalidDataException($"{source}: bytes [{covered}, {bufferLength}) at the end of the data buffer belong to no tensor; tensors must cover the buffer exactly");
        }
    }

    private static SafetensorsFile Build(List<Entry> entries, ReadOnlyMemory<byte> buffer, Dictionary<string, string> metadata) =>
        new(entries.Select(e => SafetensorsTensor.Trusted(e.Name, e.DType, e.Shape, e.Count, buffer[(int)e.Begin..(int)e.End])), metadata);

    private static JsonElement Member(string where, JsonElement entry, string key, JsonValueKind kind)
    {
        if (!entry.TryGetProperty(key, out JsonElement member))
        {
            throw new InvalidDataException($"{where} has no \"{key}\"");
        }

        if (member.ValueKind != kind)
        {
            throw new InvalidDataException($"{where}: \"{key}\" is a JSON {Kind(member)}, expected {(kind == JsonValueKind.Array ? "an array" : "a string")}");
        }

        return member;
    }

    private static long[] Integers(string where, JsonElement array, string key)
    {
        long[] values = new long[array.GetArrayLength()];
        int i = 0;
        foreach (JsonElement item in array.EnumerateArray())
        {
            if (item.ValueKind != JsonValueKind.Number || !item.TryGetInt64(out values[i]))
            {
                throw new InvalidDataException($"{where}: {key}[{i}] = {item.GetRawText()} is not an integer that fits in 64 bits");
            }

            i++;
        }

        return values;
    }

    private static string Kind(JsonElement value) => value.ValueKind switch
    {
        JsonValueKind.Object => "object",
        JsonValueKind.Array => "array",
        JsonValueKind.String => "string",
        JsonValueKind.Number => "number",
        JsonValueKind.True or JsonValueKind.False => "boolean",
        JsonValueKind.Null => "null",
        _ => value.ValueKind.ToString(),
    };

    private sealed record Entry(string Name, SafetensorsDType DType, long[] Shape, long Count, long Begin, long End);
}

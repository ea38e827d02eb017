using System.Buffers.Binary;
using System.Text;
using EpA2A.Numerics;

namespace EpA2A.Safetensors.Tests;

/// <summary>The safetensors writer and reader agree on every dtype, and the writer's bytes are the format's, deterministically.</summary>
public sealed class SafetensorsRoundTripTests
{
    public static TheoryData<string> EveryDType() => [.. SafetensorsDTypes.All.Select(SafetensorsDTypes.NameOf)];

    [Theory]
    [MemberData(nameof(EveryDType))]
    public void Every_dtype_survives_a_write_and_a_read_bit_for_bit(string dtypeName)
    {
        Assert.True(SafetensorsDTypes.TryParse(dtypeName, out SafetensorsDType dtype));
        int seed = Random.Shared.Next();
        Random rng = new(seed);
        int size = SafetensorsDTypes.SizeOf(dtype);
        long[][] shapes = [[3, 5], [7], [], [2, 0, 4], [1, 1, 1, 3]];
        List<SafetensorsTensor> tensors = [];
        for (int i = 0; i < shapes.Length; i++)
        {
            long count = shapes[i].Aggregate(1L, (a, b) => a * b);
            byte[] data = new byte[count * size];
            rng.NextBytes(data);
            tensors.Add(SafetensorsTensor.FromBytes($"t{i}", dtype, shapes[i], data));
        }

        SafetensorsFile written = new(tensors, new Dictionary<string, string> { ["seed"] = $"{seed}", ["é"] = "ünïcode \"quoted\"" });
        byte[] bytes = SafetensorsWriter.Serialize(written);
        SafetensorsFile read = SafetensorsReader.Parse(bytes, "memory");

        Assert.Equal(written.Metadata, read.Metadata);
        Assert.Equal(written.Tensors.Count, read.Tensors.Count);
        foreach (SafetensorsTensor expected in written.Tensors)
        {
            Assert.True(read.TryGet(expected.Name, out SafetensorsTensor? actual), $"{expected.Name} missing (seed {seed})");
            Assert.Equal(dtype, actual.DType);
            Assert.Equal(expected.Shape.ToArray(), actual.Shape.ToArray());
            Assert.True(expected.Data.Span.SequenceEqual(actual.Data.Span), $"{dtype} {expected.Name}: bytes differ after a round trip (seed {seed})");
        }
    }

    [Fact]
    public void Typed_values_of_every_clr_element_type_come_back_equal_through_a_file()
    {
        int seed = Random.Shared.Next();
        Random rng = new(seed);
        BFloat16[] bf16 = [.. Enumerable.Range(0, 12).Select(_ => BFloat16.FromSingle((float)((rng.NextDouble() * 8) - 4)))];
        Half[] f16 = [.. Enumerable.Range(0, 12).Select(_ => (Half)((rng.NextDouble() * 8) - 4))];
        float[] f32 = [.. Enumerable.Range(0, 12).Select(_ => (float)((rng.NextDouble() * 8) - 4))];
        double[] f64 = [.. Enumerable.Range(0, 12).Select(_ => (rng.NextDouble() * 8) - 4)];
        int[] i32 = [.. Enumerable.Range(0, 12).Select(_ => rng.Next(int.MinValue, int.MaxValue))];
        long[] i64 = [.. Enumerable.Range(0, 12).Select(_ => rng.NextInt64(long.MinValue, long.MaxValue))];
        short[] i16 = [.. Enumerable.Range(0, 12).Select(_ => (short)rng.Next(short.MinValue, short.MaxValue))];
        bool[] flags = [.. Enumerable.Range(0, 12).Select(_ => rng.Next(2) == 1)];
        SafetensorsFile written = new(
        [
            SafetensorsTensor.FromValues<BFloat16>("bf16", [3, 4], bf16),
            SafetensorsTensor.FromValues<Half>("f16", [4, 3], f16),
            SafetensorsTensor.FromValues<float>("f32", [12], f32),
            SafetensorsTensor.FromValues<double>("f64", [2, 6], f64),
            SafetensorsTensor.FromValues<int>("i32", [6, 2], i32),
            SafetensorsTensor.FromValues<long>("i64", [1, 12], i64),
            SafetensorsTensor.FromValues<short>("i16", [12], i16),
            SafetensorsTensor.FromValues<bool>("bool", [12], flags),
        ]);

        string path = Path.Combine(Path.GetTempPath(), $"epa2a-roundtrip-{seed}-{Guid.NewGuid():N}.safetensors");
        try
        {
            SafetensorsWriter.Write(path, written);
            SafetensorsFile read = SafetensorsReader.Read(path);
            string why = $"seed {seed}";
            Assert.True(read.TryGet("bf16", out SafetensorsTensor? t) && t.ToArray<BFloat16>().SequenceEqual(bf16), why);
            Assert.True(read.TryGet("f16", out t) && t.ToArray<Half>().SequenceEqual(f16), why);
            Assert.True(read.TryGet("f32", out t) && t.ToArray<float>().SequenceEqual(f32), why);
            Assert.True(read.TryGet("f64", out t) && t.ToArray<double>().SequenceEqual(f64), why);
            Assert.True(read.TryGet("i32", out t) && t.ToArray<int>().SequenceEqual(i32), why);
            Assert.True(read.TryGet("i64", out t) && t.ToArray<long>().SequenceEqual(i64), why);
            Assert.True(read.TryGet("i16", out t) && t.ToArray<short>().SequenceEqual(i16), why);
            Assert.True(read.TryGet("bool", out t) && t.ToArray<bool>().SequenceEqual(flags), why);
            Assert.Equal([6L, 2L], read.Tensors.Single(x => x.Name == "i32").Shape.ToArray());
            Assert.Throws<InvalidOperationException>(() => read.Tensors.Single(x => x.Name == "i32").ToArray<float>());
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void The_writer_emits_the_format_exactly_sorted_and_space_padded_to_eight_bytes()
    {
        SafetensorsFile file = new(
            [
                SafetensorsTensor.FromValues<int>("b", [2], [1, -2]),
                SafetensorsTensor.FromValues<float>("a", [1, 1], [1.5f]),
            ],
            new Dictionary<string, string> { ["z"] = "1", ["k"] = "v" });

        byte[] bytes = SafetensorsWriter.Serialize(file);

        string json = "{\"__metadata__\":{\"k\":\"v\",\"z\":\"1\"},"
            + "\"a\":{\"dtype\":\"F32\",\"shape\":[1,1],\"data_offsets\":[0,4]},"
            + "\"b\":{\"dtype\":\"I32\",\"shape\":[2],\"data_offsets\":[4,12]}}";
        int padded = (json.Length + 7) / 8 * 8;
        Assert.Equal((ulong)padded, BinaryPrimitives.ReadUInt64LittleEndian(bytes));
        Assert.Equal(json.PadRight(padded, ' '), Encoding.UTF8.GetString(bytes, 8, padded));
        byte[] data = [0x00, 0x00, 0xC0, 0x3F, 0x01, 0x00, 0x00, 0x00, 0xFE, 0xFF, 0xFF, 0xFF];
        Assert.Equal(data, bytes[(8 + padded)..]);

        // Same contents given in another order: the same bytes.
        SafetensorsFile shuffled = new(
            [file.Tensors[1], file.Tensors[0]],
            new Dictionary<string, string> { ["k"] = "v", ["z"] = "1" });
        Assert.Equal(bytes, SafetensorsWriter.Serialize(shuffled));
    }

    [Fact]
    public void A_header_written_by_another_tool_with_unsorted_offsets_and_extra_spaces_is_read()
    {
        // Tensors listed in another order than their data, a metadata block last, whitespace padding: all allowed.
        string header = "{ \"y\": {\"dtype\": \"BF16\", \"shape\": [2], \"data_offsets\": [2, 6]},\n"
            + "  \"x\": {\"dtype\": \"U8\", \"shape\": [2], \"data_offsets\": [0, 2]},\n"
            + "  \"__metadata__\": {\"format\": \"pt\"} }   ";
        byte[] buffer = [7, 9, 0x80, 0x3F, 0x00, 0xC0];
        byte[] bytes = SafetensorsBytes.Craft(header, buffer);

        SafetensorsFile read = SafetensorsReader.Parse(bytes, "other-tool");

        Assert.Equal(["x", "y"], read.Tensors.Select(t => t.Name));
        Assert.Equal("pt", read.Metadata["format"]);
        Assert.True(read.TryGet("x", out SafetensorsTensor? x));
        Assert.Equal(new byte[] { 7, 9 }, x.ToArray<byte>());
        Assert.True(read.TryGet("y", out SafetensorsTensor? y));
        Assert.Equal([1f, -2f], y.ToArray<BFloat16>().Select(v => v.ToSingle()));
    }

    [Fact]
    public void Tensors_that_break_the_format_cannot_be_built()
    {
        Assert.Throws<ArgumentException>(() => SafetensorsTensor.FromValues<int>("x", [2, 2], [1, 2, 3]));
        Assert.Throws<ArgumentException>(() => SafetensorsTensor.FromValues<int>("x", [-1], []));
        Assert.Throws<ArgumentException>(() => SafetensorsTensor.FromValues<int>("__metadata__", [1], [1]));
        Assert.Throws<ArgumentException>(() => new SafetensorsFile(
            [SafetensorsTensor.FromValues<int>("x", [1], [1]), SafetensorsTensor.FromValues<int>("x", [1], [2])]));
    }
}

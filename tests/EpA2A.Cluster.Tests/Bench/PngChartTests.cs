using System.Buffers.Binary;
using System.IO.Compression;
using System.Text;
using EpA2A.Tools.Bench;

namespace EpA2A.Cluster.Tests.Bench;

/// <summary>The bench chart is a valid PNG of the promised size whose pixels show the series, whatever the data.</summary>
public sealed class PngChartTests
{
    private static readonly byte[] Signature = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A];

    [Fact]
    public void Chunks_carry_valid_crcs_and_the_header_gives_the_grid_size()
    {
        byte[] png = PngChart.Render("sweep", [Panel("a", "dispatch"), Panel("b", "dispatch"), Panel("c", "combine")], columns: 2, panelWidth: 400, panelHeight: 300);

        Assert.Equal(Signature, png[..8]);
        List<(string Type, byte[] Data)> chunks = ReadChunks(png);
        Assert.Equal(["IHDR", "IDAT", "IEND"], chunks.Select(c => c.Type));
        byte[] header = chunks[0].Data;
        Assert.Equal(2 * 400, BinaryPrimitives.ReadInt32BigEndian(header));
        Assert.Equal(PngChart.TitleHeight + (2 * 300) + PngChart.LegendHeight(1), BinaryPrimitives.ReadInt32BigEndian(header.AsSpan(4)));
        Assert.Equal([8, 2, 0, 0, 0], header[8..]);
    }

    [Fact]
    public void Pixels_show_the_first_series_color_on_a_white_background()
    {
        ChartPanel bandwidth = new("dispatch bandwidth", "tokens per rank", "GB/s", [Series("epa2a", 0.4, 120, false), Series("nccl a2a", 0.3, 90, true), Series("epa2a low latency", 0.9, 35, false)]);
        ChartPanel latency = new("dispatch latency", "tokens per rank", "us", [Series("epa2a", 18, 40, false), Series("nccl a2a", 30, 45, true), Series("epa2a low latency", 9, 60, false)]);
        ChartPanel linear = new("linear axes", "step", "ms", [Series("epa2a", 0.5, 1.1, false)], LogX: false, LogY: false);
        byte[] png = PngChart.Render("EpA2A bench: 8 ranks, hidden 7168", [bandwidth, latency, linear]);
        File.WriteAllBytes(Path.Combine(Path.GetTempPath(), "epa2a-pngchart-sample.png"), png);

        (int width, int height, byte[] rows) = Decode(png);
        Assert.Equal(height * (1 + (3 * width)), rows.Length);
        Assert.Equal([0xFF, 0xFF, 0xFF], Pixel(rows, width, 0, 0));
        Assert.Equal([0xFF, 0xFF, 0xFF], Pixel(rows, width, width - 1, height - 1));
        int first = PngChart.PaletteColor(0);
        byte[] expected = [(byte)(first >> 16), (byte)(first >> 8), (byte)first];
        int hits = 0;
        for (int y = 0; y < height; y++)
        {
            for (int x = 0; x < width; x++)
            {
                hits += Pixel(rows, width, x, y).SequenceEqual(expected) ? 1 : 0;
            }
        }

        Assert.True(hits > 500, $"{hits} pixels of the first series' color");
        Assert.Equal(png, PngChart.Render("EpA2A bench: 8 ranks, hidden 7168", [bandwidth, latency, linear]));
    }

    [Fact]
    public void Empty_series_and_values_a_log_axis_cannot_show_still_render()
    {
        int seed = Environment.TickCount;
        Random random = new(seed);
        (double, double)[] hostile = [.. Enumerable.Range(0, 20).Select(_ => ((random.NextDouble() - 0.5) * 1e4, (random.NextDouble() - 0.5) * 1e3)), (0, 0), (double.NaN, 1), (1, double.PositiveInfinity), (-4, -1)];
        ChartPanel[] panels =
        [
            new("empty", "x", "y", [new ChartSeries("none", [])]),
            new("no series", "x", "y", []),
            new("hostile log", "x", "y", [new ChartSeries("hostile", hostile)]),
            new("hostile linear", "x", "y", [new ChartSeries("hostile", hostile, Dashed: true)], LogX: false, LogY: false),
            new("one point", "x", "y", [new ChartSeries("single", [(64, 3.5)])], LogX: false, LogY: false),
        ];

        byte[] png = PngChart.Render("odd input \u00e9\t~", panels, columns: 3);

        (int width, int height, byte[] rows) = Decode(png);
        Assert.True(width == 3 * 560 && rows.Length == height * (1 + (3 * width)), $"seed {seed}: {width}x{height}");
    }

    [Theory]
    [InlineData(1, "1")]
    [InlineData(128, "128")]
    [InlineData(4096, "4k")]
    [InlineData(8192, "8k")]
    [InlineData(0.5, "0.5")]
    [InlineData(12.34, "12.3")]
    [InlineData(1200, "1.2k")]
    [InlineData(0.003, "3e-3")]
    [InlineData(1_000_000, "1M")]
    [InlineData(-2.5, "-2.5")]
    public void Tick_labels_are_compact(double value, string label)
    {
        Assert.Equal(label, PngChart.FormatTick(value));
    }

    private static ChartPanel Panel(string title, string series) => new(title, "tokens", "GB/s", [Series(series, 2, 3, false)]);

    // A sweep over tokens per rank, 1..8192, that grows from first toward first * growth and flattens out.
    private static ChartSeries Series(string name, double first, double growth, bool dashed) =>
        new(name, [.. Enumerable.Range(0, 14).Select(i => ((double)(1 << i), first * (1 + ((growth - 1) * (1 - Math.Exp(-i / 4.0))))))], dashed);

    private static byte[] Pixel(byte[] rows, int width, int x, int y) => rows.AsSpan((y * (1 + (3 * width))) + 1 + (3 * x), 3).ToArray();

    private static (int Width, int Height, byte[] Rows) Decode(byte[] png)
    {
        List<(string Type, byte[] Data)> chunks = ReadChunks(png);
        using MemoryStream rows = new();
        using (ZLibStream zlib = new(new MemoryStream([.. chunks.Where(c => c.Type == "IDAT").SelectMany(c => c.Data)]), CompressionMode.Decompress))
        {
            zlib.CopyTo(rows);
        }

        return (BinaryPrimitives.ReadInt32BigEndian(chunks[0].Data), BinaryPrimitives.ReadInt32BigEndian(chunks[0].Data.AsSpan(4)), rows.ToArray());
    }

    private static List<(string Type, byte[] Data)> ReadChunks(byte[] png)
    {
        List<(string Type, byte[] Data)> chunks = [];
        for (int at = 8; at < png.Length;)
        {
            int length = BinaryPrimitives.ReadInt32BigEndian(png.AsSpan(at));
            byte[] typeAndData = png[(at + 4)..(at + 8 + length)];
            uint stored = BinaryPrimitives.ReadUInt32BigEndian(png.AsSpan(at + 8 + length));
            string type = Encoding.ASCII.GetString(typeAndData, 0, 4);
            Assert.True(stored == BitwiseCrc32(typeAndData), $"chunk {type} CRC");
            chunks.Add((type, typeAndData[4..]));
            at += 12 + length;
        }

        return chunks;
    }

    // Bit by bit, independent of the table the encoder uses.
    private static uint BitwiseCrc32(byte[] bytes)
    {
        uint crc = uint.MaxValue;
        foreach (byte b in bytes)
        {
            crc ^= b;
            for (int k = 0; k < 8; k++)
            {
                crc = (crc >> 1) ^ (0xEDB88320 & (0 - (crc & 1)));
            }
        }

        return ~crc;
    }
}

using EpA2A.Tools.Bench;
using SkiaSharp;

namespace EpA2A.Cluster.Tests.Bench;

/// <summary>The bench chart (ScottPlot) is a PNG of the promised size whose pixels show the series, whatever the data.</summary>
public sealed class BenchChartTests
{
    private static readonly byte[] Signature = [0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A];

    [Fact]
    public void The_png_has_the_grid_size_and_the_first_series_color_on_a_white_background()
    {
        ChartPanel bandwidth = new("dispatch bandwidth", "tokens per rank", "GB/s", [Series("epa2a", 0.4, 120, false), Series("nccl a2a", 0.3, 90, true), Series("epa2a low latency", 0.9, 35, false)]);
        ChartPanel latency = new("dispatch latency", "tokens per rank", "us", [Series("epa2a", 18, 40, false), Series("nccl a2a", 30, 45, true)]);
        ChartPanel linear = new("linear axes", "step", "ms", [Series("epa2a", 0.5, 1.1, false)], LogX: false, LogY: false);
        byte[] png = BenchChart.Render("EpA2A bench: 8 ranks, hidden 7168", [bandwidth, latency, linear], columns: 2, panelWidth: 500, panelHeight: 320);
        File.WriteAllBytes(Path.Combine(Path.GetTempPath(), "epa2a-benchchart-sample.png"), png);

        Assert.Equal(Signature, png[..8]);
        using SKBitmap image = SKBitmap.Decode(png);
        Assert.Equal(2 * 500, image.Width);
        Assert.Equal(BenchChart.TitleHeight + (2 * 320), image.Height);
        Assert.Equal(SKColors.White, image.GetPixel(0, 0));
        Assert.Equal(SKColors.White, image.GetPixel(image.Width - 1, image.Height - 1)); // the empty fourth cell
        ScottPlot.Color first = BenchChart.PaletteColor(0);
        int hits = 0;
        for (int y = 0; y < image.Height; y++)
        {
            for (int x = 0; x < image.Width; x++)
            {
                SKColor c = image.GetPixel(x, y);
                hits += c.Red == first.R && c.Green == first.G && c.Blue == first.B ? 1 : 0;
            }
        }

        Assert.True(hits > 500, $"{hits} pixels of the first series' color");
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

        byte[] png = BenchChart.Render("odd input \u00e9\t~", panels, columns: 3);

        using SKBitmap image = SKBitmap.Decode(png);
        Assert.True(image.Width == 3 * 560 && image.Height == BenchChart.TitleHeight + (2 * 380), $"seed {seed}: {image.Width}x{image.Height}");
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
        Assert.Equal(label, BenchChart.FormatTick(value));
    }

    // A sweep over tokens per rank, 1..8192, that grows from first toward first * growth and flattens out.
    private static ChartSeries Series(string name, double first, double growth, bool dashed) =>
        new(name, [.. Enumerable.Range(0, 14).Select(i => ((double)(1 << i), first * (1 + ((growth - 1) * (1 - Math.Exp(-i / 4.0))))))], dashed);
}

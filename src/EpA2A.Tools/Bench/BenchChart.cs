using System.Globalization;
using ScottPlot;
using ScottPlot.TickGenerators;
using SkiaSharp;

namespace EpA2A.Tools.Bench;

/// <summary>One line of a chart panel; non-positive values are left out on a log axis, non-finite ones always.</summary>
internal sealed record ChartSeries(string Name, IReadOnlyList<(double X, double Y)> Points, bool Dashed = false);

/// <summary>One panel of a chart: a title, axis labels and its series; both axes logarithmic unless said otherwise.</summary>
internal sealed record ChartPanel(string Title, string XLabel, string YLabel, IReadOnlyList<ChartSeries> Series, bool LogX = true, bool LogY = true);

/// <summary>
/// The bench chart, drawn by ScottPlot: panels row by row, <c>columns</c> to a row, under a title, each with its
/// legend. A log axis plots log10 of the values with decade ticks labelled in the values' own units. The same
/// series name has the same color in every panel.
/// </summary>
internal static class BenchChart
{
    internal const int TitleHeight = 34;

    /// <summary>Renders the panels into one PNG of <c>columns × panelWidth</c> by <c>TitleHeight + rows × panelHeight</c> pixels.</summary>
    public static byte[] Render(string title, IReadOnlyList<ChartPanel> panels, int columns = 2, int panelWidth = 560, int panelHeight = 380)
    {
        ArgumentNullException.ThrowIfNull(title);
        ArgumentNullException.ThrowIfNull(panels);
        ArgumentOutOfRangeException.ThrowIfLessThan(columns, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(panelWidth, 100);
        ArgumentOutOfRangeException.ThrowIfLessThan(panelHeight, 100);
        int rows = Math.Max(1, (panels.Count + columns - 1) / columns);
        int width = columns * panelWidth;
        int height = TitleHeight + (rows * panelHeight);
        List<string> names = [.. panels.SelectMany(p => p.Series).Select(s => s.Name).Distinct()];

        using SKSurface surface = SKSurface.Create(new SKImageInfo(width, height, SKColorType.Rgba8888, SKAlphaType.Premul));
        SKCanvas canvas = surface.Canvas;
        canvas.Clear(SKColors.White);
        using (SKFont font = new(SKTypeface.Default, 16))
        using (SKPaint ink = new() { Color = SKColors.Black, IsAntialias = true })
        {
            canvas.DrawText(title, width / 2f, TitleHeight - 10, SKTextAlign.Center, font, ink);
        }

        for (int i = 0; i < panels.Count; i++)
        {
            float left = (i % columns) * panelWidth;
            float top = TitleHeight + ((i / columns) * panelHeight);
            // Each panel on a surface of its own: a plot clears the whole canvas it renders to.
            using SKSurface cell = SKSurface.Create(new SKImageInfo(panelWidth, panelHeight, SKColorType.Rgba8888, SKAlphaType.Premul));
            Panel(panels[i], names).Render(cell);
            using SKImage drawn = cell.Snapshot();
            canvas.DrawImage(drawn, left, top);
        }

        using SKImage image = surface.Snapshot();
        using SKData png = image.Encode(SKEncodedImageFormat.Png, 100);
        return png.ToArray();
    }

    /// <summary>The color of the <paramref name="index"/>-th distinct series name.</summary>
    internal static Color PaletteColor(int index) => new ScottPlot.Palettes.Category10().GetColor(index);

    /// <summary>A tick label in a few characters: 1, 128, 8k, 0.5, 12.3, 1.2k, 3e-3. Exact multiples of 1024 read as k.</summary>
    internal static string FormatTick(double value)
    {
        if (value == 0 || !double.IsFinite(value))
        {
            return value == 0 ? "0" : value.ToString(CultureInfo.InvariantCulture);
        }

        double magnitude = Math.Abs(value);
        double digit = Math.Pow(10, Math.Floor(Math.Log10(magnitude)) - 2);
        magnitude = Math.Round(magnitude / digit) * digit; // three significant digits
        double sign = Math.Sign(value);
        if (magnitude < 0.01)
        {
            int exponent = (int)Math.Floor(Math.Log10(magnitude));
            return string.Create(CultureInfo.InvariantCulture, $"{sign * magnitude / Math.Pow(10, exponent):G3}e{exponent}");
        }

        string[] units = ["", "k", "M", "G", "T"];
        int unit = 0;
        while (unit < units.Length - 1 && magnitude >= Math.Pow(1000, unit + 1))
        {
            unit++;
        }

        bool binary = unit > 0 && Math.Abs(value) % Math.Pow(1024, unit) == 0;
        double shown = binary ? value / Math.Pow(1024, unit) : sign * magnitude / Math.Pow(1000, unit);
        return shown.ToString("G3", CultureInfo.InvariantCulture) + units[unit];
    }

    private static Plot Panel(ChartPanel panel, List<string> names)
    {
        Plot plot = new();
        plot.FigureBackground.Color = Colors.White;
        plot.Title(panel.Title, size: 14);
        plot.XLabel(panel.XLabel, size: 12);
        plot.YLabel(panel.YLabel, size: 12);
        foreach (ChartSeries series in panel.Series)
        {
            (double X, double Y)[] shown = [.. series.Points.Where(p => Shows(p.X, panel.LogX) && Shows(p.Y, panel.LogY))];
            if (shown.Length == 0)
            {
                continue;
            }

            double[] xs = [.. shown.Select(p => panel.LogX ? Math.Log10(p.X) : p.X)];
            double[] ys = [.. shown.Select(p => panel.LogY ? Math.Log10(p.Y) : p.Y)];
            ScottPlot.Plottables.Scatter line = plot.Add.Scatter(xs, ys, PaletteColor(names.IndexOf(series.Name)));
            line.LegendText = series.Name;
            line.LineWidth = 2;
            line.MarkerSize = 6;
            line.LinePattern = series.Dashed ? LinePattern.Dashed : LinePattern.Solid;
        }

        if (panel.LogX)
        {
            plot.Axes.Bottom.TickGenerator = LogTicks();
        }

        if (panel.LogY)
        {
            plot.Axes.Left.TickGenerator = LogTicks();
        }

        plot.ShowLegend(Alignment.LowerRight);
        return plot;
    }

    private static bool Shows(double value, bool log) => double.IsFinite(value) && (!log || value > 0);

    private static NumericAutomatic LogTicks() => new()
    {
        MinorTickGenerator = new LogMinorTickGenerator(),
        IntegerTicksOnly = true,
        LabelFormatter = exponent => FormatTick(Math.Pow(10, exponent)),
    };
}

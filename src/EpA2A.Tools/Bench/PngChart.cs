using System.Buffers.Binary;
using System.Globalization;
using System.IO.Compression;

namespace EpA2A.Tools.Bench;

/// <summary>One line on a chart; its color follows its name, so a name keeps one color on every panel.</summary>
internal sealed record ChartSeries(string Name, IReadOnlyList<(double X, double Y)> Points, bool Dashed = false);

/// <summary>One plot of a chart. On a log axis, points with a non-positive coordinate are left out.</summary>
internal sealed record ChartPanel(string Title, string XLabel, string YLabel, IReadOnlyList<ChartSeries> Series, bool LogX = true, bool LogY = true);

/// <summary>
/// Draws line charts into a PNG with no dependency beyond the base library: a title, a grid of panels and one legend
/// for all of them. Log X axes tick at powers of 2 (token counts), log Y axes at powers of 10.
/// </summary>
internal static class PngChart
{
    internal const int TitleHeight = 34;
    internal const int LegendRowHeight = 20;
    private const int LegendPadding = 10;
    private const int Black = 0x000000, Grid = 0xE4E4E4, Ink = 0x404040;
    private const int MarginLeft = 64, MarginRight = 16, MarginTop = 24, MarginBottom = 38;
    private const int DashOn = 7, DashPeriod = 12;

    // Distinct under common color blindness; chosen for this chart, cycled when there are more series.
    private static readonly int[] Palette = [0x1F6FB4, 0xE8731A, 0x2E9E3E, 0xC8302C, 0x8A5CC2, 0x7F5539, 0xD65DB1, 0x6B6B6B, 0xA8A820, 0x17A9BF];

    /// <summary>The color, as 0xRRGGBB, of the series whose name is the <paramref name="index"/>-th distinct one.</summary>
    internal static int PaletteColor(int index) => Palette[index % Palette.Length];

    internal static int LegendHeight(int legendRows) => (legendRows * LegendRowHeight) + LegendPadding;

    /// <summary>
    /// Renders <paramref name="panels"/> row by row, <paramref name="columns"/> to a row, under <paramref name="title"/>,
    /// with the legend of every distinct series name at the bottom. Same input, same bytes.
    /// </summary>
    public static byte[] Render(string title, IReadOnlyList<ChartPanel> panels, int columns = 2, int panelWidth = 560, int panelHeight = 380)
    {
        ArgumentNullException.ThrowIfNull(title);
        ArgumentNullException.ThrowIfNull(panels);
        if (panels.Count == 0)
        {
            throw new ArgumentException("A chart needs at least one panel.", nameof(panels));
        }

        ArgumentOutOfRangeException.ThrowIfLessThan(columns, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(panelWidth, 200);
        ArgumentOutOfRangeException.ThrowIfLessThan(panelHeight, 150);

        Dictionary<string, int> colorIndex = new(StringComparer.Ordinal);
        List<ChartSeries> legend = [];
        foreach (ChartSeries series in panels.SelectMany(p => p.Series))
        {
            if (colorIndex.TryAdd(series.Name, colorIndex.Count))
            {
                legend.Add(series);
            }
        }

        int cols = Math.Min(columns, panels.Count);
        int rows = (panels.Count + cols - 1) / cols;
        int width = cols * panelWidth;
        List<List<ChartSeries>> legendRows = WrapLegend(legend, width - 20);
        Canvas canvas = new(width, TitleHeight + (rows * panelHeight) + LegendHeight(legendRows.Count));
        canvas.Text((width - Canvas.TextWidth(title, 2)) / 2, 9, title, Black, 2);
        for (int i = 0; i < panels.Count; i++)
        {
            DrawPanel(canvas, panels[i], colorIndex, (i % cols) * panelWidth, TitleHeight + (i / cols * panelHeight), panelWidth, panelHeight);
        }

        int y = TitleHeight + (rows * panelHeight) + (LegendPadding / 2);
        foreach (List<ChartSeries> row in legendRows)
        {
            int x = (width - row.Sum(LegendEntryWidth)) / 2;
            foreach (ChartSeries series in row)
            {
                int color = PaletteColor(colorIndex[series.Name]);
                int mid = y + (LegendRowHeight / 2) - 1;
                int phase = DashPeriod - 3; // a dashed sample opens and closes with a short gap
                canvas.Line(x, mid, x + 24, mid, color, series.Dashed, ref phase);
                canvas.Fill(x + 10, mid - 2, 5, 5, color);
                canvas.Text(x + 30, mid - 3, series.Name, Black);
                x += LegendEntryWidth(series);
            }

            y += LegendRowHeight;
        }

        return EncodePng(canvas);
    }

    private static int LegendEntryWidth(ChartSeries series) => 30 + Canvas.TextWidth(series.Name) + 20;

    private static List<List<ChartSeries>> WrapLegend(List<ChartSeries> entries, int width)
    {
        List<List<ChartSeries>> rows = [];
        int used = 0;
        foreach (ChartSeries entry in entries)
        {
            if (rows.Count == 0 || used + LegendEntryWidth(entry) > width)
            {
                rows.Add([]);
                used = 0;
            }

            rows[^1].Add(entry);
            used += LegendEntryWidth(entry);
        }

        return rows;
    }

    private static void DrawPanel(Canvas canvas, ChartPanel panel, Dictionary<string, int> colorIndex, int ox, int oy, int width, int height)
    {
        int left = ox + MarginLeft, right = ox + width - MarginRight, top = oy + MarginTop, bottom = oy + height - MarginBottom;
        Axis xAxis = Axis.Build(panel.Series.SelectMany(s => s.Points).Select(p => p.X), panel.LogX, 2);
        Axis yAxis = Axis.Build(panel.Series.SelectMany(s => s.Points).Select(p => p.Y), panel.LogY, 10);

        canvas.Text(ox + ((width - Canvas.TextWidth(panel.Title)) / 2), oy + 8, panel.Title, Black);
        canvas.Text(ox + ((width - Canvas.TextWidth(panel.XLabel)) / 2), bottom + 22, panel.XLabel, Black);
        canvas.Text(ox + 6, ((top + bottom + Canvas.TextWidth(panel.YLabel)) / 2) - 1, panel.YLabel, Black, upward: true);

        int labelRight = int.MinValue;
        foreach (Tick tick in xAxis.Ticks)
        {
            int x = xAxis.Map(tick.Value, left, right);
            if (tick.Major)
            {
                canvas.Fill(x, top + 1, 1, bottom - top - 1, Grid);
            }

            canvas.Fill(x, bottom + 1, 1, tick.Major ? 4 : 2, Ink);
            string label = FormatTick(tick.Value);
            int labelLeft = x - (Canvas.TextWidth(label) / 2);
            if (tick.Labeled && labelLeft > labelRight + 4)
            {
                canvas.Text(labelLeft, bottom + 7, label, Ink);
                labelRight = labelLeft + Canvas.TextWidth(label);
            }
        }

        foreach (Tick tick in yAxis.Ticks)
        {
            int y = yAxis.Map(tick.Value, bottom, top);
            if (tick.Major)
            {
                canvas.Fill(left + 1, y, right - left - 1, 1, Grid);
            }

            canvas.Fill(left - (tick.Major ? 4 : 2), y, tick.Major ? 4 : 2, 1, Ink);
            if (tick.Labeled)
            {
                string label = FormatTick(tick.Value);
                canvas.Text(left - 7 - Canvas.TextWidth(label), y - 3, label, Ink);
            }
        }

        canvas.Fill(left, top, right - left + 1, 1, Black);
        canvas.Fill(left, bottom, right - left + 1, 1, Black);
        canvas.Fill(left, top, 1, bottom - top + 1, Black);
        canvas.Fill(right, top, 1, bottom - top + 1, Black);

        // Markers on the data's edge, which a log axis puts on the frame, stay whole.
        canvas.Clip = (left - 2, top - 2, right + 2, bottom + 2);
        foreach (ChartSeries series in panel.Series)
        {
            int color = PaletteColor(colorIndex[series.Name]);
            int phase = 0;
            (int X, int Y)? previous = null;
            foreach ((double x, double y) in series.Points)
            {
                if (!xAxis.Shows(x) || !yAxis.Shows(y))
                {
                    continue;
                }

                (int X, int Y) point = (xAxis.Map(x, left, right), yAxis.Map(y, bottom, top));
                if (previous is { } from)
                {
                    canvas.Line(from.X, from.Y, point.X, point.Y, color, series.Dashed, ref phase);
                }

                canvas.Fill(point.X - 2, point.Y - 2, 5, 5, color);
                previous = point;
            }
        }

        canvas.Clip = null;
    }

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

    private readonly record struct Tick(double Value, bool Major, bool Labeled);

    private sealed record Axis(bool Log, double Low, double High, List<Tick> Ticks)
    {
        public bool Shows(double value) => double.IsFinite(value) && (!Log || value > 0);

        public int Map(double value, int pixelLow, int pixelHigh)
        {
            double t = Log ? Math.Log(value / Low) / Math.Log(High / Low) : (value - Low) / (High - Low);
            return pixelLow + (int)Math.Round(t * (pixelHigh - pixelLow));
        }

        /// <summary>A log axis spans whole powers of <paramref name="logBase"/>; a linear one about five round steps.</summary>
        public static Axis Build(IEnumerable<double> values, bool log, int logBase)
        {
            double low = double.PositiveInfinity, high = double.NegativeInfinity;
            foreach (double value in values.Where(v => double.IsFinite(v) && (!log || v > 0)))
            {
                low = Math.Min(low, value);
                high = Math.Max(high, value);
            }

            List<Tick> ticks = [];
            if (log)
            {
                Func<double, double> logOf = logBase == 2 ? Math.Log2 : Math.Log10;
                int first = low <= high ? (int)Math.Floor(logOf(low) + 1e-9) : 0;
                int last = low <= high ? (int)Math.Ceiling(logOf(high) - 1e-9) : 1;
                last = Math.Max(last, first + 1);
                int stride = ((last - first) / 14) + 1;
                for (int e = first; e <= last; e++)
                {
                    double power = Math.Pow(logBase, e);
                    ticks.Add(new(power, Major: true, Labeled: (e - first) % stride == 0));
                    for (int m = 2; logBase == 10 && e < last && last - first <= 4 && m <= 9; m++)
                    {
                        ticks.Add(new(power * m, Major: false, Labeled: last - first <= 2 && m is 2 or 5));
                    }
                }

                return new(true, Math.Pow(logBase, first), Math.Pow(logBase, last), ticks);
            }

            if (low > high)
            {
                (low, high) = (0, 1);
            }
            else if (low == high)
            {
                double pad = low == 0 ? 1 : Math.Abs(low) / 2;
                (low, high) = (low - pad, high + pad);
            }

            double step = Math.Pow(10, Math.Floor(Math.Log10((high - low) / 5)));
            step *= (high - low) / step > 35 ? 10 : (high - low) / step > 15 ? 5 : (high - low) / step > 7 ? 2 : 1;
            double k0 = Math.Floor(low / step), k1 = Math.Ceiling(high / step);
            for (double k = k0; k <= k1; k++)
            {
                ticks.Add(new(k * step, Major: true, Labeled: true));
            }

            return new(false, k0 * step, k1 * step, ticks);
        }
    }

    /// <summary>An RGB pixel buffer with the few primitives a chart needs; pixels outside <see cref="Clip"/> are dropped.</summary>
    private sealed class Canvas(int width, int height)
    {
        // 5x8 glyphs for ASCII 32..126, drawn for this file: one byte per row from the top (the last row holds
        // descenders), bit 4 the leftmost column. Anything else prints as '?'.
        private static readonly ulong[] Font =
        [
        0x0000000000000000, 0x0404040404000400, 0x0A0A0A0000000000, 0x0A0A1F0A1F0A0A00, 0x040F140E051E0400, 0x1819020408130300,
        0x0C12140815120D00, 0x0404040000000000, 0x0204080808040200, 0x0804020202040800, 0x0004150E15040000, 0x0004041F04040000,
        0x00000000000C0408, 0x0000001F00000000, 0x00000000000C0C00, 0x0101020408101000, 0x0E11131519110E00, 0x040C040404040E00,
        0x0E11010204081F00, 0x0E11010601110E00, 0x02060A121F020200, 0x1F101E0101110E00, 0x0608101E11110E00, 0x1F01020408080800,
        0x0E11110E11110E00, 0x0E11110F01020C00, 0x000C0C000C0C0000, 0x000C0C000C040800, 0x0204081008040200, 0x00001F001F000000,
        0x0804020102040800, 0x0E11010204000400, 0x0E11171517100E00, 0x0E11111F11111100, 0x1E11111E11111E00, 0x0E11101010110E00,
        0x1E11111111111E00, 0x1F10101E10101F00, 0x1F10101E10101000, 0x0E11101711110F00, 0x1111111F11111100, 0x0E04040404040E00,
        0x0702020202120C00, 0x1112141814121100, 0x1010101010101F00, 0x111B151511111100, 0x1111191513111100, 0x0E11111111110E00,
        0x1E11111E10101000, 0x0E11111115120D00, 0x1E11111E14121100, 0x0F10100E01011E00, 0x1F04040404040400, 0x1111111111110E00,
        0x11111111110A0400, 0x1111111515150A00, 0x11110A040A111100, 0x11110A0404040400, 0x1F01020408101F00, 0x0E08080808080E00,
        0x1010080402010100, 0x0E02020202020E00, 0x040A110000000000, 0x000000000000001F, 0x0804000000000000, 0x00000E010F110F00,
        0x10101E1111111E00, 0x00000E1010100E00, 0x01010F1111110F00, 0x00000E111F100E00, 0x0609081C08080800, 0x00000F11110F010E,
        0x1010161911111100, 0x04000C0404040E00, 0x020006020202120C, 0x1010121418141200, 0x0C04040404040E00, 0x00001A1515151500,
        0x0000161911111100, 0x00000E1111110E00, 0x00001E11111E1010, 0x00000F11110F0101, 0x0000161910101000, 0x00000E100E011E00,
        0x08081C0808090600, 0x0000111111130D00, 0x00001111110A0400, 0x0000111115150A00, 0x0000110A040A1100, 0x00001111110F010E,
        0x00001F0204081F00, 0x0204040804040200, 0x0404040404040404, 0x0804040204040800, 0x0000081502000000,
        ];

        public int Width { get; } = width;

        public int Height { get; } = height;

        public byte[] Pixels { get; } = Enumerable.Repeat((byte)0xFF, width * height * 3).ToArray();

        public (int Left, int Top, int Right, int Bottom)? Clip { get; set; }

        public static int TextWidth(string text, int scale = 1) => text.Length * 6 * scale;

        public void Fill(int x, int y, int w, int h, int color)
        {
            (int left, int top, int right, int bottom) = Clip ?? (0, 0, Width - 1, Height - 1);
            for (int py = Math.Max(y, top); py < Math.Min(y + h, bottom + 1); py++)
            {
                for (int px = Math.Max(x, left); px < Math.Min(x + w, right + 1); px++)
                {
                    int at = ((py * Width) + px) * 3;
                    (Pixels[at], Pixels[at + 1], Pixels[at + 2]) = ((byte)(color >> 16), (byte)(color >> 8), (byte)color);
                }
            }
        }

        /// <summary>A 2-px line; a dashed one keeps its dash <paramref name="phase"/> from segment to segment.</summary>
        public void Line(int x0, int y0, int x1, int y1, int color, bool dashed, ref int phase)
        {
            int dx = Math.Abs(x1 - x0), dy = -Math.Abs(y1 - y0), sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
            int error = dx + dy;
            while (true)
            {
                if (!dashed || phase++ % DashPeriod < DashOn)
                {
                    Fill(x0, y0, 2, 2, color);
                }

                if (x0 == x1 && y0 == y1)
                {
                    return;
                }

                int doubled = 2 * error;
                if (doubled >= dy)
                {
                    error += dy;
                    x0 += sx;
                }

                if (doubled <= dx)
                {
                    error += dx;
                    y0 += sy;
                }
            }
        }

        /// <summary>Text with its top-left at (x, y); <paramref name="upward"/> text starts at (x, y) and reads bottom to top.</summary>
        public void Text(int x, int y, string text, int color, int scale = 1, bool upward = false)
        {
            for (int i = 0; i < text.Length; i++)
            {
                ulong glyph = Font[text[i] is >= ' ' and <= '~' ? text[i] - ' ' : '?' - ' '];
                for (int row = 0; row < 8; row++)
                {
                    for (int column = 0; column < 5; column++)
                    {
                        int along = ((i * 6) + column) * scale, across = row * scale;
                        if (((glyph >> (((7 - row) * 8) + 4 - column)) & 1) != 0)
                        {
                            Fill(upward ? x + across : x + along, upward ? y - along - scale + 1 : y + across, scale, scale, color);
                        }
                    }
                }
            }
        }
    }

    private static byte[] EncodePng(Canvas canvas)
    {
        byte[] header = new byte[13];
        BinaryPrimitives.WriteInt32BigEndian(header, canvas.Width);
        BinaryPrimitives.WriteInt32BigEndian(header.AsSpan(4), canvas.Height);
        header[8] = 8; // bits per channel
        header[9] = 2; // color type: RGB

        using MemoryStream compressed = new();
        using (ZLibStream zlib = new(compressed, CompressionLevel.Optimal, leaveOpen: true))
        {
            int stride = canvas.Width * 3;
            for (int y = 0; y < canvas.Height; y++)
            {
                zlib.WriteByte(0); // filter: none
                zlib.Write(canvas.Pixels, y * stride, stride);
            }
        }

        using MemoryStream png = new();
        png.Write([0x89, (byte)'P', (byte)'N', (byte)'G', 0x0D, 0x0A, 0x1A, 0x0A]);
        WriteChunk(png, "IHDR"u8, header);
        WriteChunk(png, "IDAT"u8, compressed.GetBuffer().AsSpan(0, (int)compressed.Length));
        WriteChunk(png, "IEND"u8, []);
        return png.ToArray();
    }

    private static void WriteChunk(MemoryStream png, ReadOnlySpan<byte> type, ReadOnlySpan<byte> data)
    {
        Span<byte> word = stackalloc byte[4];
        BinaryPrimitives.WriteInt32BigEndian(word, data.Length);
        png.Write(word);
        png.Write(type);
        png.Write(data);
        BinaryPrimitives.WriteUInt32BigEndian(word, ~Crc32(Crc32(uint.MaxValue, type), data));
        png.Write(word);
    }

    private static readonly uint[] CrcTable = Enumerable.Range(0, 256).Select(n =>
    {
        uint c = (uint)n;
        for (int k = 0; k < 8; k++)
        {
            c = (c & 1) != 0 ? 0xEDB88320 ^ (c >> 1) : c >> 1;
        }

        return c;
    }).ToArray();

    // The CRC-32 of PNG chunks (reflected, polynomial 0xEDB88320), continued from crc.
    private static uint Crc32(uint crc, ReadOnlySpan<byte> bytes)
    {
        foreach (byte b in bytes)
        {
            crc = CrcTable[(crc ^ b) & 0xFF] ^ (crc >> 8);
        }

        return crc;
    }
}

using System.Runtime.InteropServices;
using EpA2A.Backends.Cuda;

namespace EpA2A.Tests;

/// <summary>The rule by which both CUDA backends accept or refuse the loaded libepa2a (no GPU needed: the pure comparison).</summary>
public sealed class NativeLibraryVersionTests
{
    [Theory]
    [InlineData(0, 1, 0, 1)]
    [InlineData(0, 1, 0, 2)]
    [InlineData(1, 3, 1, 7)]
    public void A_library_of_the_same_major_and_at_least_the_expected_minor_is_accepted(int expectedMajor, int expectedMinor, int foundMajor, int foundMinor)
    {
        Assert.Null(NativeLibraryVersion.Mismatch(expectedMajor, expectedMinor, foundMajor, foundMinor));
    }

    [Theory]
    [InlineData(0, 2, 0, 1, "older than 0.2")]
    [InlineData(0, 1, 1, 1, "major version differs from 0")]
    [InlineData(1, 0, 0, 9, "major version differs from 1")]
    public void A_library_of_another_major_or_an_older_minor_is_refused_naming_both_versions(int expectedMajor, int expectedMinor, int foundMajor, int foundMinor, string rule)
    {
        string? why = NativeLibraryVersion.Mismatch(expectedMajor, expectedMinor, foundMajor, foundMinor);

        Assert.NotNull(why);
        Assert.Contains($"reports version {foundMajor}.{foundMinor}", why, StringComparison.Ordinal);
        Assert.Contains($"expect {expectedMajor}.{expectedMinor}", why, StringComparison.Ordinal);
        Assert.Contains(rule, why, StringComparison.Ordinal);
    }

    [Fact]
    public void The_expected_version_is_the_one_the_native_header_declares()
    {
        string header = File.ReadAllText(FindHeader());

        Assert.Contains($"#define EPA2A_VERSION_MAJOR {NativeLibraryVersion.ExpectedMajor}\n", header, StringComparison.Ordinal);
        Assert.Contains($"#define EPA2A_VERSION_MINOR {NativeLibraryVersion.ExpectedMinor}\n", header, StringComparison.Ordinal);
    }

    [Fact]
    public void Both_config_structs_lead_with_size_and_version_and_match_the_headers_sizes_and_versions()
    {
        string header = File.ReadAllText(FindHeader());

        // The library reads size and version before any other field: they must be first, in this order.
        Assert.Equal(0, (int)Marshal.OffsetOf<NativeLayerConfig>(nameof(NativeLayerConfig.Size)));
        Assert.Equal(4, (int)Marshal.OffsetOf<NativeLayerConfig>(nameof(NativeLayerConfig.Version)));
        Assert.Equal(0, (int)Marshal.OffsetOf<NativeLowLatencyConfig>(nameof(NativeLowLatencyConfig.Size)));
        Assert.Equal(4, (int)Marshal.OffsetOf<NativeLowLatencyConfig>(nameof(NativeLowLatencyConfig.Version)));
        Assert.Equal(72, Marshal.SizeOf<NativeLayerConfig>());
        Assert.Equal(56, Marshal.SizeOf<NativeLowLatencyConfig>());
        Assert.Contains("72 bytes, no implicit padding", header, StringComparison.Ordinal);
        Assert.Contains("56 bytes, no implicit padding", header, StringComparison.Ordinal);
        Assert.Contains($"#define EPA2A_LAYER_CONFIG_VERSION {NativeLayerConfig.CurrentVersion}\n", header, StringComparison.Ordinal);
        Assert.Contains($"#define EPA2A_LL_CONFIG_VERSION {NativeLowLatencyConfig.CurrentVersion}\n", header, StringComparison.Ordinal);
    }

    private static string FindHeader()
    {
        for (DirectoryInfo? d = new(AppContext.BaseDirectory); d is not null; d = d.Parent)
        {
            string candidate = Path.Combine(d.FullName, "native", "include", "epa2a.h");
            if (File.Exists(candidate))
            {
                return candidate;
            }
        }

        throw new FileNotFoundException("native/include/epa2a.h not found above the test's directory", "epa2a.h");
    }
}

namespace EpA2A.Backends.Cuda;

/// <summary>
/// The libepa2a version these bindings were written for (native/include/epa2a.h: EPA2A_VERSION_MAJOR / _MINOR), and the
/// check both CUDA backends make before their first layer call, so that a stale or foreign library fails with a message
/// naming both versions instead of a wrong struct layout or a missing entry point later.
/// </summary>
internal static class NativeLibraryVersion
{
    /// <summary>EPA2A_VERSION_MAJOR: a different major is a different ABI.</summary>
    public const int ExpectedMajor = 0;

    /// <summary>EPA2A_VERSION_MINOR: the oldest minor that has every entry point these bindings call.</summary>
    public const int ExpectedMinor = 3;

    private static readonly Lazy<(int Major, int Minor)> Found = new(ReadFound);

    /// <summary>Asks the loaded libepa2a its version once per process and throws unless it is one these bindings can call.</summary>
    /// <exception cref="NotSupportedException">The library reports another major, or an older minor.</exception>
    public static void EnsureCompatible()
    {
        (int major, int minor) = Found.Value;
        if (Mismatch(ExpectedMajor, ExpectedMinor, major, minor) is string why)
        {
            throw new NotSupportedException(why);
        }
    }

    /// <summary>
    /// Null when a library reporting <paramref name="foundMajor"/>.<paramref name="foundMinor"/> can serve bindings written
    /// for <paramref name="expectedMajor"/>.<paramref name="expectedMinor"/> (the same major, a minor at least the expected
    /// one: minors only add); otherwise the message, naming both versions.
    /// </summary>
    public static string? Mismatch(int expectedMajor, int expectedMinor, int foundMajor, int foundMinor)
    {
        if (foundMajor == expectedMajor && foundMinor >= expectedMinor)
        {
            return null;
        }

        string rule = foundMajor == expectedMajor
            ? $"it is older than {expectedMajor}.{expectedMinor}"
            : $"its major version differs from {expectedMajor}";
        return $"the loaded libepa2a reports version {foundMajor}.{foundMinor}, but these bindings expect {expectedMajor}.{expectedMinor} " +
            $"({rule}): rebuild native/ (cmake --build native/build) or point EPA2A_NATIVE_DIR at a matching build";
    }

    private static (int Major, int Minor) ReadFound()
    {
        NativeMethods.Check(NativeMethods.epa2a_version(out int major, out int minor), "epa2a_version");
        return (major, minor);
    }
}

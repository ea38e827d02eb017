namespace EpA2A.Grains;

/// <summary>Which data plane a rank runs. Spelled "cpu" and "cuda" on the command line, in configuration and in output.</summary>
public enum EpBackendKind
{
    /// <summary>The managed CPU backend, messages between ranks through grain calls (the default).</summary>
    Cpu = 0,

    /// <summary>The CUDA + NVSHMEM backend: one NVSHMEM job per group, one GPU per rank.</summary>
    Cuda = 1,
}

/// <summary>The one parser and printer of <see cref="EpBackendKind"/>'s spellings.</summary>
public static class EpBackendKinds
{
    /// <summary>The accepted spellings, in the order of <see cref="EpBackendKind"/>.</summary>
    public static IReadOnlyList<string> Names { get; } = ["cpu", "cuda"];

    /// <summary>The spelling of <paramref name="kind"/>: "cpu" or "cuda".</summary>
    public static string ToName(this EpBackendKind kind) => kind switch
    {
        EpBackendKind.Cpu => "cpu",
        EpBackendKind.Cuda => "cuda",
        _ => throw new ArgumentOutOfRangeException(nameof(kind), kind, $"not a backend: expected one of {string.Join(", ", Names)}"),
    };

    /// <summary>Parses a spelling ("cpu" or "cuda", exactly), or returns false.</summary>
    public static bool TryParse(string? text, out EpBackendKind kind)
    {
        (bool ok, kind) = text switch
        {
            "cpu" => (true, EpBackendKind.Cpu),
            "cuda" => (true, EpBackendKind.Cuda),
            _ => (false, EpBackendKind.Cpu),
        };
        return ok;
    }

    /// <summary>Parses the value of <paramref name="option"/>; anything else is one line naming the option and the accepted values.</summary>
    /// <exception cref="ArgumentException">Not "cpu" or "cuda".</exception>
    public static EpBackendKind Parse(string? text, string option) =>
        TryParse(text, out EpBackendKind kind) ? kind : throw new ArgumentException(Invalid(text, option));

    /// <summary>The one-line rule for a value that is not a backend.</summary>
    public static string Invalid(string? text, string option) => $"{option} '{text}' is not a backend: expected one of {string.Join(", ", Names)}";
}

namespace EpA2A.Grains.Hosting;

/// <summary>
/// Which rank of which group a silo serves, and how; bound from the configuration section "EpA2A:Rank"
/// (appsettings.json, environment variables such as <c>EpA2A__Rank__ChunkBytes</c>) and then from the code's
/// configure action, checked by <see cref="RankSiloOptionsValidator"/> when the silo starts.
/// </summary>
public sealed class RankSiloOptions
{
    /// <summary>The configuration section.</summary>
    public const string SectionName = "EpA2A:Rank";

    /// <summary>The group (a set of ranks that dispatch to each other).</summary>
    public string Group { get; set; } = "default";

    /// <summary>The rank this silo serves.</summary>
    public int Rank { get; set; }

    /// <summary>The GPU this silo drives (null on the CPU backend).</summary>
    public int? Gpu { get; set; }

    /// <summary>The data plane (configuration spells it "cpu", the default, or "cuda").</summary>
    public EpBackendKind Backend { get; set; } = EpBackendKind.Cpu;

    /// <summary>Largest message piece between ranks through grain calls; well below Orleans' message size limit.</summary>
    public int ChunkBytes { get; set; } = 1 << 20;
}

using System.Net;

using EpA2A.Grains;

namespace EpA2A.Silo.Hosting;

/// <summary>How membership is found: one host (localhost) or a Redis store shared by several hosts.</summary>
public enum ClusteringKind
{
    /// <summary>Development clustering on one host; silo 0's endpoint is the primary.</summary>
    Localhost = 0,

    /// <summary>Membership in Redis (several processes or hosts).</summary>
    Redis = 1,
}

/// <summary>Everything a silo of EpA2A needs to start.</summary>
public sealed record SiloSettings
{
    /// <summary>The group the silo's rank belongs to.</summary>
    public string Group { get; init; } = "default";

    /// <summary>The rank it serves.</summary>
    public required int Rank { get; init; }

    /// <summary>The data plane.</summary>
    public EpBackendKind Backend { get; init; } = EpBackendKind.Cpu;

    /// <summary>GPU index (CUDA backend).</summary>
    public int? Gpu { get; init; }

    /// <summary>Silo-to-silo port.</summary>
    public required int SiloPort { get; init; }

    /// <summary>Client gateway port.</summary>
    public required int GatewayPort { get; init; }

    /// <summary>The primary silo's endpoint (localhost clustering).</summary>
    public IPEndPoint? Primary { get; init; }

    /// <summary>Which membership.</summary>
    public ClusteringKind Clustering { get; init; } = ClusteringKind.Localhost;

    /// <summary>
    /// Redis clustering: the address this silo advertises to the cluster (null: this host's own, see
    /// <see cref="Hosting.AdvertisedAddress.OfThisHost"/>). The silo listens on every address of the host.
    /// </summary>
    public IPAddress? AdvertisedAddress { get; init; }

    /// <summary>Redis connection string (Redis clustering).</summary>
    public string? RedisConnection { get; init; }

    /// <summary>Orleans cluster id: silos and clients of one deployment share it.</summary>
    public string ClusterId { get; init; } = "epa2a";

    /// <summary>Orleans service id.</summary>
    public string ServiceId { get; init; } = "epa2a";

    /// <summary>Fault drill: this rank's experts wait this long every step (a straggler); zero for none.</summary>
    public TimeSpan ExpertDelay { get; init; }

    /// <summary>
    /// A directory of SwiGLU expert weights (`epa2a weights`): the rank serves its experts from its file there instead of
    /// the deterministic built-in; null for the built-in.
    /// </summary>
    public string? Weights { get; init; }

    /// <summary>Ranks in the group (checked against the weights' files); needed with <see cref="Weights"/>.</summary>
    public int? WorldSize { get; init; }

    /// <summary>Settings layered over appsettings.json and the environment (e.g. EpA2A:Telemetry:PrometheusPortBase).</summary>
    public IReadOnlyDictionary<string, string?> Configuration { get; init; } = new Dictionary<string, string?>();

    /// <summary>
    /// Whether this silo builds its process' telemetry pipeline from EpA2A:Telemetry (its Prometheus port is the
    /// base plus its rank). Listeners are process-wide: of several silos in one process, at most one may.
    /// </summary>
    public bool OwnsTelemetry { get; init; } = true;
}

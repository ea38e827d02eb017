using System.Runtime.InteropServices;

namespace EpA2A.Backends.Cuda;

/// <summary>epa2a_layer_config: the same on every rank except the rank. 72 bytes; size and version first.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct NativeLayerConfig
{
    /// <summary>EPA2A_LAYER_CONFIG_VERSION of the epa2a.h these bindings mirror.</summary>
    public const int CurrentVersion = 1;

    public int Size;
    public int Version;
    public long TimeoutNs;
    public int MaxTokens;
    public int Hidden;
    public int TopK;
    public int NumExperts;
    public int Rank;
    public int WorldSize;
    public int LocalWorldSize;
    public int TokenBytes;
    public int TokenType;
    public int NumSms;
    public int EnableLocalCombine;
    public int ExpertAlignment;
    public int Capacity;
    public int Flags;
}

/// <summary>epa2a_status: the first device error of a layer. 48 bytes.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct NativeStatus
{
    public int Code;
    public int Phase;
    public int Rank;
    public int Peer;
    public int Index;
    public int Value;
    public long Expected;
    public long Observed;
    public long WaitedNs;
}

/// <summary>epa2a_layer_buffers: device pointers a layer owns.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct NativeLayerBuffers
{
    public nint Output;
    public nint Weights;
    public nint RowOrigin;
    public nint ScatterRows;
    public int OutputRows;
    public int Reserved;
}

/// <summary>epa2a_layer_config.flags.</summary>
[Flags]
internal enum NativeLayerFlags
{
    None = 0,

    /// <summary>EPA2A_LAYER_FIXED_CAPACITY: rows fixed at creation, steps enqueue without a host wait.</summary>
    FixedCapacity = 1,
}

/// <summary>Status codes of libepa2a.</summary>
internal enum NativeCode
{
    Ok = 0,
    InvalidArgument = 1,
    Cuda = 2,
    Nvshmem = 3,
    NotInitialized = 4,
    State = 5,
    Capacity = 6,
    Timeout = 7,
    Aborted = 8,
    BadExpertId = 9,
    BadScatterIndex = 10,
    BadRow = 11,
    PeerRejected = 12,
}

/// <summary>epa2a_ll_config: the low-latency layer's configuration, the same on every rank except the rank. 56 bytes.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct NativeLowLatencyConfig
{
    /// <summary>EPA2A_LL_CONFIG_VERSION.</summary>
    public const int CurrentVersion = 1;

    public int Size;
    public int Version;
    public long TimeoutNs;
    public int MaxTokens;
    public int Hidden;
    public int TopK;
    public int NumExperts;
    public int Rank;
    public int WorldSize;
    public int LocalWorldSize;
    public int NumSms;
    public int Flags;
    public int Reserved;
}

/// <summary>epa2a_ll_buffers: device pointers a low-latency layer owns.</summary>
[StructLayout(LayoutKind.Sequential)]
internal struct NativeLowLatencyBuffers
{
    public nint Tokens;
    public nint Scales;
    public nint RowsPerExpert;
    public nint CombineInput;
    public int LocalExperts;
    public int ExpertCapacity;
    public int Hidden;

    /// <summary>Blocks of every kernel: the SM budget, capped so that the grids of all ranks on this GPU fit at once.</summary>
    public int Blocks;
}

/// <summary>EPA2A_LL_FORMAT_*: the token format of a low-latency dispatch.</summary>
internal enum NativeLowLatencyFormat
{
    Bf16 = 0,
    Fp8 = 1,
    Fp8PowerOfTwo = 2,
}

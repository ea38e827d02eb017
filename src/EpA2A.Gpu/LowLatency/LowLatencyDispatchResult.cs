using System.Numerics.Tensors;
using EpA2A.Layer;
using EpA2A.Numerics;

namespace EpA2A.LowLatency;

/// <summary>
/// What a low-latency dispatch returns on the host API: views of the layer's receive buffers, valid until the next
/// dispatch send. Local expert j's rows are <c>[j, 0 .. RowsPerExpert[j], :]</c>: compact from row 0, every row from
/// source rank 0 first, then rank 1, ...; inside a source by token index, then by k. Rows past RowsPerExpert[j] hold
/// stale data and must not be read.
/// </summary>
/// <param name="Tokens">bf16 rows [ExpertsPerRank, WorldSize*MaxTokens, Hidden] (bf16 format), else null.</param>
/// <param name="Fp8Tokens">FP8 e4m3 bytes [ExpertsPerRank, WorldSize*MaxTokens, Hidden] (FP8 format), else null.</param>
/// <param name="Scales">fp32 scales [ExpertsPerRank, WorldSize*MaxTokens, Hidden/128] (FP8 format), else null: value = e4m3 * scale.</param>
/// <param name="RowsPerExpert">[ExpertsPerRank]: rows received per local expert.</param>
/// <param name="Handle">What combine takes.</param>
public sealed record LowLatencyDispatchResult(
    Tensor<BFloat16>? Tokens,
    Tensor<byte>? Fp8Tokens,
    Tensor<float>? Scales,
    Tensor<int> RowsPerExpert,
    LowLatencyHandle Handle);

/// <summary>
/// What a low-latency dispatch returns on the device API (CUDA): device views of the layer's own buffers, valid
/// until the next dispatch send; the same layout as <see cref="LowLatencyDispatchResult"/>. Nothing here is on the
/// host: RowsPerExpert is a device tensor, written in stream order.
/// </summary>
/// <param name="Tokens">bf16 rows [ExpertsPerRank, WorldSize*MaxTokens, Hidden] (bf16 format), else null.</param>
/// <param name="Fp8Tokens">FP8 e4m3 bytes [ExpertsPerRank, WorldSize*MaxTokens, Hidden] (FP8 format), else null.</param>
/// <param name="Scales">fp32 scales [ExpertsPerRank, WorldSize*MaxTokens, Hidden/128] (FP8 format), else null.</param>
/// <param name="RowsPerExpert">[ExpertsPerRank] int32 on the device.</param>
/// <param name="Handle">What combine takes.</param>
public sealed record LowLatencyDeviceDispatchResult(
    DeviceTensor<BFloat16>? Tokens,
    DeviceTensor<byte>? Fp8Tokens,
    DeviceTensor<float>? Scales,
    DeviceTensor<int> RowsPerExpert,
    LowLatencyHandle Handle);

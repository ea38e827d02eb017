using System.Numerics.Tensors;

namespace EpA2A.Layer;

/// <summary>What dispatch returns.</summary>
/// <typeparam name="T">The token element type.</typeparam>
/// <param name="Output">Received rows, [RecvRows, Hidden]; a view of the layer's buffer, valid until the next dispatch.</param>
/// <param name="Weights">One routing weight per received row, [RecvRows]; null when dispatch had no weights.</param>
/// <param name="Layout">What combine needs.</param>
public sealed record DispatchResult<T>(Tensor<T> Output, Tensor<float>? Weights, EpAllToAllLayout Layout);

namespace EpA2A.Layer;

/// <summary>What dispatch with device buffers returns: device views of the layer's own buffers, no host copies.</summary>
/// <typeparam name="T">The token element type.</typeparam>
/// <param name="Output">
/// Received rows, [RecvRows, Hidden], in the layer's symmetric output buffer: run the experts on it (in place is
/// fine). Valid until the next dispatch; the next combine may overwrite it with the expert outputs it is given.
/// </param>
/// <param name="Weights">One routing weight per received row, [RecvRows]; null when dispatch had no weights.</param>
/// <param name="Layout">
/// What combine needs. On the device path the per-slot arrays stay on the device: TopKIds and ScatterIndices are
/// empty; the per-rank and per-expert counts are filled.
/// </param>
public sealed record DeviceDispatchResult<T>(DeviceTensor<T> Output, DeviceTensor<float>? Weights, EpAllToAllLayout Layout)
    where T : unmanaged;

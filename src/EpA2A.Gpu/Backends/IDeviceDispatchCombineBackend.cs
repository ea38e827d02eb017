namespace EpA2A.Backends;

/// <summary>A backend whose buffers live on the device, for the layer's in-process device-buffer API.</summary>
internal interface IDeviceDispatchCombineBackend
{
    /// <summary>The dispatch output rows (and combine input), [OutputRows, Hidden]; moves when the buffers grow.</summary>
    nint DeviceOutput { get; }

    /// <summary>One routing weight per output row.</summary>
    nint DeviceWeights { get; }
}

using EpA2A.Layer;

namespace EpA2A.Cuda;

/// <summary>
/// A phase observer that also wants GPU time (CUDA events around the kernels). Give it as
/// <see cref="EpLayerOptions.Observer"/> to a CUDA layer: besides the host-timed <see cref="IPhaseObserver.OnPhase"/>
/// of every phase, it gets <see cref="OnGpuPhase"/> for DispatchPreprocess (counting, counts exchange, row
/// assignment), DispatchOutputSizeWait (the GPU idle while the host polls the sizes and grows buffers),
/// DispatchKernel (send and finish) and CombineKernel (copy-in, pre-sum, barrier and sum).
/// </summary>
public interface IGpuPhaseObserver : IPhaseObserver
{
    /// <summary>
    /// Whether the layer should time its kernels now (read at the start of each dispatch and combine). Recording and
    /// reading the CUDA events costs host time on every call; an observer can switch it off between steps.
    /// </summary>
    bool WantsGpuTimes => true;

    /// <summary>Called after the stream has synchronized (on the thread that ran the step); keep it cheap.</summary>
    void OnGpuPhase(int rank, Phase phase, TimeSpan gpuElapsed, long tokens);
}

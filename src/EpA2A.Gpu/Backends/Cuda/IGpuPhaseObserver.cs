using EpA2A.Layer;

namespace EpA2A.Backends.Cuda;

/// <summary>
/// A phase observer that also wants GPU time (CUDA events around the kernels). Give it as
/// <see cref="EpLayerOptions.Observer"/> to a CUDA layer: besides the host-timed <see cref="IPhaseObserver.OnPhase"/>
/// of every phase, it gets <see cref="OnGpuPhase"/> for DispatchPreprocess (counting, counts exchange, row
/// assignment), DispatchOutputSizeWait (the GPU idle while the host polls the sizes and grows buffers),
/// DispatchKernel (send and finish) and CombineKernel (copy-in, pre-sum, barrier and sum).
/// </summary>
public interface IGpuPhaseObserver : IPhaseObserver
{
    /// <summary>Called on the GPU worker thread after the stream has synchronized; keep it cheap.</summary>
    void OnGpuPhase(int rank, Phase phase, TimeSpan gpuElapsed, long tokens);
}

using System.Diagnostics;
using EpA2A.Telemetry;

namespace EpA2A.Layer;

/// <summary>Times consecutive phases of one operation and reports each to the observer and the layer's telemetry.</summary>
internal struct PhaseClock(int rank, IPhaseObserver? observer, LayerTelemetry telemetry)
{
    private long start = Stopwatch.GetTimestamp();

    /// <summary>
    /// Ends a phase. <paramref name="gpuElapsed"/> is the seam for the CUDA backend: the GPU time of the
    /// phase's kernels from CUDA events, recorded as epa2a.phase.gpu.duration and on the phase's span.
    /// </summary>
    public void Lap(Phase phase, long tokens, long bytes, TimeSpan? gpuElapsed = null)
    {
        long now = Stopwatch.GetTimestamp();
        TimeSpan elapsed = Stopwatch.GetElapsedTime(start, now);
        observer?.OnPhase(rank, phase, elapsed, tokens, bytes);
        telemetry.PhaseEnded(phase, elapsed, tokens, bytes, gpuElapsed);
        start = now;
    }
}

using System.Collections.Concurrent;
using EpA2A.Layer;

namespace EpA2A.Grains.Ranks;

/// <summary>Sums each phase's time over a step, for the step report.</summary>
internal sealed class PhaseRecorder : IPhaseObserver
{
    private readonly ConcurrentDictionary<Phase, double> micros = new();

    public void OnPhase(int rank, Phase phase, TimeSpan elapsed, long tokens, long bytes) =>
        micros.AddOrUpdate(phase, elapsed.TotalMicroseconds, (_, v) => v + elapsed.TotalMicroseconds);

    public void Clear() => micros.Clear();

    public Dictionary<string, double> Snapshot() => micros.ToDictionary(kv => kv.Key.ToString(), kv => kv.Value);
}

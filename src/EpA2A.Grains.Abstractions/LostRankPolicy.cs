namespace EpA2A.Grains;

/// <summary>What a layer's coordinator does when a rank is lost (dead, stalled past the step deadline, or cut off).</summary>
public enum LostRankPolicy
{
    /// <summary>The step fails naming the rank; the next step re-forms the group with every rank (and fails until it is back).</summary>
    FailAndReform = 0,

    /// <summary>
    /// The step fails naming the rank, and the coordinator at once re-forms the group on the survivors: the lost rank's
    /// experts are masked (slots that pick them count as dropped, reported per step) until it answers again, when it is
    /// re-admitted at a step boundary. The CPU backend only (a CUDA group is one NVSHMEM job: see RELIABILITY.md).
    /// </summary>
    Mask = 1,
}

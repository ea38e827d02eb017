using EpA2A.Layer;

namespace EpA2A.Backends;

/// <summary>What the counts exchange produced.</summary>
/// <param name="Plan">The routing every rank agrees on.</param>
/// <param name="SmallestOutputRows">
/// The fewest dispatch output rows any rank of the step holds (the same answer on every rank): the CPU backend has
/// every rank report its size with its counts; the CUDA backend's symmetric buffers have one size everywhere.
/// </param>
internal readonly record struct ExchangedCounts(IRoutingPlan Plan, int SmallestOutputRows);

/// <summary>What the dispatch kernel produced besides the rows themselves (which land in the layer's buffers).</summary>
/// <param name="GlobalScatter">Where each (token, k) landed, as a global row, -1 when dropped; empty on the device path.</param>
/// <param name="Origins">The origin of every received row; empty on the device path.</param>
internal readonly record struct DispatchedRows(int[] GlobalScatter, RowOrigins Origins);

/// <summary>What a combine produced, [TokenCount, Hidden]: fp32 sums for the layer to round, rounded host rows, or device rows.</summary>
internal abstract record CombinedRows
{
    /// <summary>fp32 sums (the step's accumulator); the layer rounds them once.</summary>
    /// <param name="Sums">[TokenCount, Hidden] fp32.</param>
    internal sealed record HostSums(Memory<float> Sums) : CombinedRows;

    /// <summary>Rows the backend rounded (CUDA, host path).</summary>
    /// <param name="Rows">[TokenCount, Hidden] of the token type, as bytes.</param>
    internal sealed record HostRounded(byte[] Rows) : CombinedRows;

    /// <summary>Rows on the device (CUDA, device path), in a buffer the layer owns until the next combine.</summary>
    /// <param name="Rows">[TokenCount, Hidden] of the token type on the device.</param>
    internal sealed record Device(nint Rows) : CombinedRows;
}

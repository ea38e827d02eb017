namespace EpA2A.Grains;

/// <summary>
/// One rank of a group (key: "group/rank"), pinned to the silo whose metadata names that group and rank.
/// It hosts the rank's layers and their buffers; the <see cref="IExpertLayerGrain"/> drives it.
/// Calls that carry data for a running step interleave with it. Its calls are grouped by who makes them:
/// <see cref="IRankControl"/> (the coordinator), <see cref="IRankStaging"/> (a client), <see cref="IRankPeer"/> (the
/// other ranks' layers); a caller of one role can hold just that interface of the same grain.
/// </summary>
public interface IRankGrain : IRankControl, IRankStaging, IRankPeer
{
}

using EpA2A.Config;

namespace EpA2A.Reference;

/// <summary>
/// What a step on a group with masked ranks means, for checking it: the masked ranks dispatch nothing, and every slot
/// that picks an expert of a masked rank is dropped. The reference run on these inputs is what the survivors must return.
/// </summary>
public static class MaskedRanks
{
    /// <summary>The inputs with <paramref name="masked"/> ranks emptied and their experts' slots dropped; <paramref name="droppedSlots"/> counts the slots dropped on the other ranks.</summary>
    public static RankInput<T>[] Apply<T>(EpConfig config, IReadOnlyList<RankInput<T>> inputs, IReadOnlyCollection<int> masked, out int droppedSlots)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(config);
        ArgumentNullException.ThrowIfNull(inputs);
        ArgumentNullException.ThrowIfNull(masked);
        int dropped = 0;
        RankInput<T>[] result = new RankInput<T>[inputs.Count];
        for (int r = 0; r < inputs.Count; r++)
        {
            RankInput<T> input = inputs[r];
            if (masked.Contains(r))
            {
                result[r] = new RankInput<T>([], 0, [], input.Weights is null ? null : [], input.ScatterIndices is null ? null : []);
                continue;
            }

            int[] ids = (int[])input.ExpertIds.Clone();
            for (int i = 0; i < ids.Length; i++)
            {
                if (ids[i] != config.NumExperts && masked.Contains(config.RankOfExpert(ids[i])))
                {
                    ids[i] = config.NumExperts;
                    dropped++;
                }
            }

            result[r] = input with { ExpertIds = ids };
        }

        droppedSlots = dropped;
        return result;
    }
}

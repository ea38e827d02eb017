using System.Globalization;

namespace EpA2A.Grains;

/// <summary>Keys of the grains: a rank of a group, a layer of a group.</summary>
public static class GrainKeys
{
    /// <summary>
    /// The key of a rank for (group, rank): "group/rank", the same for each role it is reached through
    /// (<see cref="IRankControl"/>, <see cref="IRankStaging"/>, <see cref="IRankPeer"/>).
    /// </summary>
    public static string Rank(string group, int rank)
    {
        CheckGroup(group);
        ArgumentOutOfRangeException.ThrowIfNegative(rank);
        return string.Create(CultureInfo.InvariantCulture, $"{group}/{rank}");
    }

    /// <summary>The key of <see cref="IExpertLayerGrain"/> for (group, layer): "group/layer".</summary>
    public static string Layer(string group, string layer)
    {
        CheckGroup(group);
        ArgumentException.ThrowIfNullOrWhiteSpace(layer);
        return $"{group}/{layer}";
    }

    /// <summary>Splits a rank key; throws <see cref="FormatException"/> for anything else.</summary>
    public static (string Group, int Rank) ParseRank(string key)
    {
        ArgumentNullException.ThrowIfNull(key);
        int slash = key.LastIndexOf('/');
        if (slash <= 0 || !int.TryParse(key.AsSpan(slash + 1), NumberStyles.None, CultureInfo.InvariantCulture, out int rank))
        {
            throw new FormatException($"'{key}' is not a rank grain key (group/rank)");
        }

        return (key[..slash], rank);
    }

    /// <summary>Splits a layer key into group and layer name.</summary>
    public static (string Group, string Layer) ParseLayer(string key)
    {
        ArgumentNullException.ThrowIfNull(key);
        int slash = key.IndexOf('/', StringComparison.Ordinal);
        if (slash <= 0 || slash == key.Length - 1)
        {
            throw new FormatException($"'{key}' is not a layer grain key (group/layer)");
        }

        return (key[..slash], key[(slash + 1)..]);
    }

    private static void CheckGroup(string group)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(group);
        if (group.Contains('/', StringComparison.Ordinal))
        {
            throw new ArgumentException($"group '{group}' must not contain '/'", nameof(group));
        }
    }
}

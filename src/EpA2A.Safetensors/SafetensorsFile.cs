using System.Collections.ObjectModel;
using System.Diagnostics.CodeAnalysis;

namespace EpA2A.Safetensors;

/// <summary>
/// The contents of a safetensors file: named tensors and string metadata. <see cref="SafetensorsReader"/> makes
/// one from bytes, <see cref="SafetensorsWriter"/> writes one out.
/// </summary>
public sealed class SafetensorsFile
{
    private readonly Dictionary<string, SafetensorsTensor> byName;

    /// <summary>Collects tensors (names must be distinct) and optional metadata.</summary>
    /// <exception cref="ArgumentException">Two tensors share a name.</exception>
    public SafetensorsFile(IEnumerable<SafetensorsTensor> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        ArgumentNullException.ThrowIfNull(tensors);
        byName = new Dictionary<string, SafetensorsTensor>(StringComparer.Ordinal);
        foreach (SafetensorsTensor tensor in tensors)
        {
            ArgumentNullException.ThrowIfNull(tensor, nameof(tensors));
            if (!byName.TryAdd(tensor.Name, tensor))
            {
                throw new ArgumentException($"two tensors are named '{tensor.Name}'", nameof(tensors));
            }
        }

        Tensors = [.. byName.Values.OrderBy(t => t.Name, StringComparer.Ordinal)];
        Metadata = new ReadOnlyDictionary<string, string>(
            new SortedDictionary<string, string>(metadata?.ToDictionary(StringComparer.Ordinal) ?? [], StringComparer.Ordinal));
    }

    /// <summary>Every tensor, sorted by name (ordinal).</summary>
    public IReadOnlyList<SafetensorsTensor> Tensors { get; }

    /// <summary>The header's "__metadata__" entries, sorted by key; empty when there were none.</summary>
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>The tensor named <paramref name="name"/>, if any.</summary>
    public bool TryGet(string name, [NotNullWhen(true)] out SafetensorsTensor? tensor) => byName.TryGetValue(name, out tensor);
}

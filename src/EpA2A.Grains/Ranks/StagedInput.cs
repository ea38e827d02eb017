using EpA2A.Config;

namespace EpA2A.Grains.Ranks;

/// <summary>
/// A step's inputs on one rank, assembled from the chunks a client sent. Buffers are sized from the header,
/// which <see cref="HostedLayer.BeginInput"/> has bounded by MaxTokens; every chunk must lie inside its array,
/// overlap no earlier chunk, and (unless it ends the array) hold at least <see cref="MessageAssembler.MinChunkBytes"/>,
/// so a complete array has every byte written exactly once and a client cannot make the rank track many pieces. A chunk
/// that repeats a staged one byte for byte (the client asks again when an answer is lost) is taken as already staged.
/// </summary>
internal sealed class StagedInput
{
    private readonly int[] received = new int[4];
    private readonly SortedSet<(int Start, int End)>[] pieces = [[], [], [], []];

    private readonly int rank;

    /// <summary>Announced bytes per part (-1: not announced); arrays are made on the first chunk that does not fill one.</summary>
    private readonly int[] lengths = new int[4];
    private readonly byte[]?[] parts = new byte[]?[4];

    public StagedInput(StepInputHeader header, EpConfig config)
    {
        Header = header;
        rank = config.Rank;
        int slots = header.Tokens * config.TopK;
        lengths[(int)InputPart.Tokens] = header.Tokens * config.Hidden * config.TokenBytes;
        lengths[(int)InputPart.ExpertIds] = slots * 4;
        lengths[(int)InputPart.Weights] = header.HasWeights ? slots * 4 : -1;
        lengths[(int)InputPart.ScatterIndices] = header.HasScatterIndices ? slots * 4 : -1;
    }

    public StepInputHeader Header { get; }

    public byte[] Tokens => Part(InputPart.Tokens)!;

    public byte[] Ids => Part(InputPart.ExpertIds)!;

    public byte[]? Weights => Part(InputPart.Weights);

    public byte[]? Scatter => Part(InputPart.ScatterIndices);

    public void Add(InputPart part, int offset, byte[] data)
    {
        ArgumentNullException.ThrowIfNull(data);
        int length = (uint)part < (uint)lengths.Length ? lengths[(int)part] : -1;
        if (length < 0)
        {
            throw new ArgumentException($"rank {rank}: step {Header.Step} announced no {part}", nameof(part));
        }

        long end = (long)offset + data.Length;
        if (offset < 0 || end > length)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), $"rank {rank}: {part} chunk [{offset}, {end}) is outside the announced {length} bytes");
        }

        if (data.Length == 0 || (data.Length < MessageAssembler.MinChunkBytes && end != length))
        {
            throw new ArgumentException($"rank {rank}: {part} chunk [{offset}, {end}) holds {data.Length} bytes; only the piece that ends the array may be shorter than {MessageAssembler.MinChunkBytes}", nameof(data));
        }

        SortedSet<(int Start, int End)> seen = pieces[(int)part];
        (int Start, int End) piece = (offset, (int)end);
        if (seen.Contains(piece) && data.AsSpan().SequenceEqual(parts[(int)part]!.AsSpan(offset, data.Length)))
        {
            return; // the same chunk again (the client asked again when an answer was lost): staged once
        }

        // Pieces are never empty, so default (0, 0) means "none".
        (int Start, int End) before = seen.GetViewBetween((int.MinValue, int.MinValue), (offset, int.MaxValue)).Max;
        (int Start, int End) after = seen.GetViewBetween((offset, int.MinValue), (int.MaxValue, int.MaxValue)).Min;
        if ((before != default && before.End > offset) || (after != default && after.Start < end))
        {
            throw new ArgumentException($"rank {rank}: {part} chunk [{offset}, {end}) overlaps bytes already staged for step {Header.Step}", nameof(offset));
        }

        seen.Add(piece);
        if (data.Length == length)
        {
            // The whole array in one chunk (the usual case): the message's own array is the input, no copy.
            parts[(int)part] = data;
        }
        else
        {
            data.CopyTo(parts[(int)part] ??= new byte[length], offset);
        }

        received[(int)part] += data.Length;
    }

    public void ThrowIfIncomplete(int rank)
    {
        foreach (InputPart part in Enum.GetValues<InputPart>())
        {
            int length = lengths[(int)part];
            if (length >= 0 && received[(int)part] != length)
            {
                throw new ArgumentException($"rank {rank}: step {Header.Step} has {received[(int)part]} of {length} bytes of {part}");
            }
        }
    }

    /// <summary>An announced part (empty when it has no bytes), or null when it was not announced.</summary>
    private byte[]? Part(InputPart part) => lengths[(int)part] switch
    {
        < 0 => null,
        0 => [],
        int length => parts[(int)part] ?? new byte[length],
    };
}

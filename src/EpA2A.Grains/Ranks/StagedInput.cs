using EpA2A.Config;

namespace EpA2A.Grains.Ranks;

/// <summary>
/// A step's inputs on one rank, assembled from the chunks a client sent. Buffers are sized from the header,
/// which <see cref="HostedLayer.BeginInput"/> has bounded by MaxTokens; every chunk must lie inside its array,
/// overlap no earlier chunk, and (unless it ends the array) hold at least <see cref="MessageAssembler.MinChunkBytes"/>,
/// so a complete array has every byte written exactly once and a client cannot make the rank track many pieces.
/// </summary>
internal sealed class StagedInput
{
    private readonly int[] received = new int[4];
    private readonly SortedSet<(int Start, int End)>[] pieces = [[], [], [], []];

    private readonly int rank;

    public StagedInput(StepInputHeader header, EpConfig config)
    {
        Header = header;
        rank = config.Rank;
        int slots = header.Tokens * config.TopK;
        Tokens = new byte[header.Tokens * config.Hidden * config.TokenBytes];
        Ids = new byte[slots * 4];
        Weights = header.HasWeights ? new byte[slots * 4] : null;
        Scatter = header.HasScatterIndices ? new byte[slots * 4] : null;
    }

    public StepInputHeader Header { get; }

    public byte[] Tokens { get; }

    public byte[] Ids { get; }

    public byte[]? Weights { get; }

    public byte[]? Scatter { get; }

    public void Add(InputPart part, int offset, byte[] data)
    {
        ArgumentNullException.ThrowIfNull(data);
        byte[] target = Target(part) ?? throw new ArgumentException($"rank {rank}: step {Header.Step} announced no {part}", nameof(part));
        long end = (long)offset + data.Length;
        if (offset < 0 || end > target.Length)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), $"rank {rank}: {part} chunk [{offset}, {end}) is outside the announced {target.Length} bytes");
        }

        if (data.Length == 0 || (data.Length < MessageAssembler.MinChunkBytes && end != target.Length))
        {
            throw new ArgumentException($"rank {rank}: {part} chunk [{offset}, {end}) holds {data.Length} bytes; only the piece that ends the array may be shorter than {MessageAssembler.MinChunkBytes}", nameof(data));
        }

        SortedSet<(int Start, int End)> seen = pieces[(int)part];
        (int Start, int End) piece = (offset, (int)end);
        // Pieces are never empty, so default (0, 0) means "none".
        (int Start, int End) before = seen.GetViewBetween((int.MinValue, int.MinValue), (offset, int.MaxValue)).Max;
        (int Start, int End) after = seen.GetViewBetween((offset, int.MinValue), (int.MaxValue, int.MaxValue)).Min;
        if ((before != default && before.End > offset) || (after != default && after.Start < end))
        {
            throw new ArgumentException($"rank {rank}: {part} chunk [{offset}, {end}) overlaps bytes already staged for step {Header.Step}", nameof(offset));
        }

        seen.Add(piece);
        data.CopyTo(target, offset);
        received[(int)part] += data.Length;
    }

    public void ThrowIfIncomplete(int rank)
    {
        foreach (InputPart part in Enum.GetValues<InputPart>())
        {
            byte[]? target = Target(part);
            if (target is not null && received[(int)part] != target.Length)
            {
                throw new ArgumentException($"rank {rank}: step {Header.Step} has {received[(int)part]} of {target.Length} bytes of {part}");
            }
        }
    }

    private byte[]? Target(InputPart part) => part switch
    {
        InputPart.Tokens => Tokens,
        InputPart.ExpertIds => Ids,
        InputPart.Weights => Weights,
        InputPart.ScatterIndices => Scatter,
        _ => null,
    };
}

using EpA2A.Config;

namespace EpA2A.Grains.Ranks;

/// <summary>A step's inputs on one rank, assembled from the chunks a client sent.</summary>
internal sealed class StagedInput
{
    private readonly int[] received = new int[4];

    public StagedInput(StepInputHeader header, EpConfig config)
    {
        Header = header;
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
        byte[] target = Target(part) ?? throw new ArgumentException($"step {Header.Step} announced no {part}", nameof(part));
        if (offset < 0 || offset + data.Length > target.Length)
        {
            throw new ArgumentOutOfRangeException(nameof(offset), $"{part} chunk [{offset}, {offset + data.Length}) is outside the announced {target.Length} bytes");
        }

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

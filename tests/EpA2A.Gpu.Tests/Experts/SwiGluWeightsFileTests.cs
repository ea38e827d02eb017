using EpA2A.Experts.SwiGlu;
using EpA2A.Numerics;
using EpA2A.Safetensors;

namespace EpA2A.Tests.Experts;

/// <summary>The per-rank SwiGLU weights files: what `epa2a weights` writes reads back the same, and a wrong file is named.</summary>
public sealed class SwiGluWeightsFileTests : IDisposable
{
    private readonly string directory = Path.Combine(Path.GetTempPath(), $"epa2a-weights-{Guid.NewGuid():N}");

    [Fact]
    public void A_written_set_reads_back_each_ranks_experts_as_drawn_and_independent_of_the_split()
    {
        SwiGluWeightsFile.WriteRandom(directory, hidden: 16, ffn: 24, experts: 8, ranks: 2, seed: 5);

        SwiGluWeights rank1 = SwiGluWeightsFile.ReadRank(directory, 1, 2);
        SwiGluWeights drawn = SwiGluWeights.Random(16, 24, 4, 4, 5);
        SwiGluWeights alone = SwiGluWeights.Random(16, 24, 6, 1, 5); // expert 6 drawn in a split of its own
        Assert.Equal((16, 24, 4, 4), (rank1.Hidden, rank1.Ffn, rank1.FirstExpert, rank1.ExpertCount));
        for (int j = 0; j < 4; j++)
        {
            Assert.Equal(drawn.Gate(j).ToArray(), rank1.Gate(j).ToArray());
            Assert.Equal(drawn.Up(j).ToArray(), rank1.Up(j).ToArray());
            Assert.Equal(drawn.Down(j).ToArray(), rank1.Down(j).ToArray());
        }

        Assert.Equal(alone.Down(0).ToArray(), rank1.Down(2).ToArray());
        Assert.Contains(rank1.Gate(0).ToArray(), v => v.ToSingle() != 0);
        Assert.NotEqual(rank1.Gate(0).ToArray(), rank1.Up(0).ToArray());
    }

    [Fact]
    public void A_file_of_another_rank_or_a_missing_rank_is_named()
    {
        SwiGluWeightsFile.WriteRandom(directory, 8, 8, 4, 2, 1);

        InvalidDataException other = Assert.Throws<InvalidDataException>(() => SwiGluWeightsFile.ReadRank(directory, 1, 4));
        Assert.Contains("holds rank 1 of 2 ranks; this is rank 1 of 4", other.Message, StringComparison.Ordinal);
        FileNotFoundException missing = Assert.Throws<FileNotFoundException>(() => SwiGluWeightsFile.ReadRank(directory, 2, 4));
        Assert.Contains(SwiGluWeightsFile.FileName(2), missing.Message, StringComparison.Ordinal);
    }

    public static TheoryData<string, string> Breakages() => new()
    {
        { "missing", "no tensor 'experts.3.up_proj.weight'" },
        { "shape", "tensor 'experts.3.up_proj.weight' has shape [8, 6], expected [6, 8]" },
        { "dtype", "tensor 'experts.3.up_proj.weight' is F32, expected BF16" },
        { "extra", "unexpected: experts.9.up_proj.weight" },
        { "format", "metadata 'epa2a.format' is missing" },
    };

    [Theory]
    [MemberData(nameof(Breakages))]
    public void A_broken_file_is_an_invalid_data_error_naming_the_tensor_and_the_rule(string breakage, string message)
    {
        SwiGluWeights weights = SwiGluWeights.Random(8, 6, 2, 2, 3);
        SafetensorsFile good = SwiGluWeightsFile.ToSafetensors(weights, rank: 1, worldSize: 2, numExperts: 4);
        string up = SwiGluWeightsFile.TensorName(3, "up_proj");
        List<SafetensorsTensor> tensors = [.. good.Tensors.Where(t => breakage is not ("missing" or "shape" or "dtype") || t.Name != up)];
        Dictionary<string, string> metadata = good.Metadata.ToDictionary();
        switch (breakage)
        {
            case "shape":
                tensors.Add(SafetensorsTensor.FromValues(up, [8, 6], weights.Up(1)));
                break;
            case "dtype":
                tensors.Add(SafetensorsTensor.FromValues(up, [6, 8], new float[48]));
                break;
            case "extra":
                tensors.Add(SafetensorsTensor.FromValues(SwiGluWeightsFile.TensorName(9, "up_proj"), [6, 8], weights.Up(1)));
                break;
            case "format":
                metadata.Remove("epa2a.format");
                break;
        }

        SafetensorsFile broken = new(tensors, metadata);
        InvalidDataException e = Assert.Throws<InvalidDataException>(() => SwiGluWeightsFile.FromSafetensors(broken, "w.safetensors", out _, out _, out _));
        Assert.Contains("w.safetensors: ", e.Message, StringComparison.Ordinal);
        Assert.Contains(message, e.Message, StringComparison.Ordinal);
        _ = SwiGluWeightsFile.FromSafetensors(good, "w.safetensors", out int rank, out int world, out int experts);
        Assert.Equal((1, 2, 4), (rank, world, experts));
    }

    [Fact]
    public void Sizes_that_do_not_split_or_exceed_the_bound_are_refused_before_anything_is_written()
    {
        Assert.Contains("do not split evenly", Assert.Throws<ArgumentException>(() => SwiGluWeightsFile.WriteRandom(directory, 8, 8, 5, 2, 1)).Message, StringComparison.Ordinal);
        Assert.Contains("at most", Assert.Throws<ArgumentException>(() => SwiGluWeightsFile.WriteRandom(directory, 65536, 65536, 2, 1, 1)).Message, StringComparison.Ordinal);
        Assert.False(Directory.Exists(directory));
    }

    public void Dispose()
    {
        if (Directory.Exists(directory))
        {
            Directory.Delete(directory, recursive: true);
        }
    }
}

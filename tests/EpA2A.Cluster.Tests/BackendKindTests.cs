using EpA2A.Grains;

namespace EpA2A.Cluster.Tests;

/// <summary>The backend's one parser: the spellings "cpu" and "cuda" both ways, anything else one line naming the option and both.</summary>
public sealed class BackendKindTests
{
    [Theory]
    [InlineData("cpu", EpBackendKind.Cpu)]
    [InlineData("cuda", EpBackendKind.Cuda)]
    public void A_spelling_parses_to_its_kind_and_prints_back_the_same(string text, EpBackendKind kind)
    {
        Assert.Equal(kind, EpBackendKinds.Parse(text, "--backend"));
        Assert.Equal(text, kind.ToName());
    }

    [Fact]
    public void Every_kind_has_a_spelling_that_parses_back()
    {
        Assert.Equal(Enum.GetValues<EpBackendKind>().Length, EpBackendKinds.Names.Count);
        foreach (EpBackendKind kind in Enum.GetValues<EpBackendKind>())
        {
            Assert.True(EpBackendKinds.TryParse(kind.ToName(), out EpBackendKind back), $"{kind} prints as '{kind.ToName()}', which does not parse");
            Assert.Equal(kind, back);
        }
    }

    [Theory]
    [InlineData("tpu")]
    [InlineData("CUDA")]
    [InlineData("")]
    [InlineData(null)]
    public void Anything_else_is_refused_in_one_line_naming_the_option_and_the_accepted_values(string? text)
    {
        ArgumentException e = Assert.Throws<ArgumentException>(() => EpBackendKinds.Parse(text, "--backend"));
        Assert.Equal($"--backend '{text}' is not a backend: expected one of cpu, cuda", e.Message);
        Assert.False(EpBackendKinds.TryParse(text, out _));
    }
}

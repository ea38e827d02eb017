using EpA2A.Config;
using EpA2A.Experts.SwiGlu;
using EpA2A.Grains;
using EpA2A.Silo.Commands;

namespace EpA2A.Cluster.Tests.Experts;

/// <summary>
/// Real silos serving SwiGLU experts from per-rank weights files (what `epa2a local --weights` runs): steps through the
/// grains, each checked against the reference dispatch, the reference SwiGLU and the reference combine.
/// </summary>
public sealed class SwiGluClusterTests : IDisposable
{
    private readonly string root = Path.Combine(Path.GetTempPath(), $"epa2a-swiglu-{Guid.NewGuid():N}");

    [Theory]
    [InlineData(false, 7)]
    [InlineData(true, 8)]
    public async Task Steps_through_grains_with_swiglu_experts_match_the_reference_swiglu(bool weighted, int seed)
    {
        string weights = Write("served", seed);
        StringWriter output = new();

        int code = await Run(weights, SwiGluWeightsFile.ReadAll(weights, 4), seed, weighted).ExecuteAsync(output, CancellationToken.None);

        string text = output.ToString();
        Assert.True(code == 0, $"seed {seed}: exit {code}\n{text}");
        Assert.Contains("SwiGLU experts (ffn 48)", text, StringComparison.Ordinal);
        Assert.Contains("all 3 steps match the reference", text, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_silo_serving_other_weights_than_the_check_uses_is_a_mismatch()
    {
        const int seed = 9;
        string served = Write("served", seed);
        string other = Write("other", seed + 1);
        StringWriter output = new();

        int code = await Run(served, SwiGluWeightsFile.ReadAll(other, 4), seed, weighted: false).ExecuteAsync(output, CancellationToken.None);

        Assert.True(code == 1, $"seed {seed}: exit {code}, expected a mismatch\n{output}");
        Assert.Contains("MISMATCH", output.ToString(), StringComparison.Ordinal);
    }

    public void Dispose()
    {
        if (Directory.Exists(root))
        {
            Directory.Delete(root, recursive: true);
        }
    }

    private string Write(string name, int seed)
    {
        string directory = Path.Combine(root, name);
        SwiGluWeightsFile.WriteRandom(directory, hidden: 32, ffn: 48, experts: 8, ranks: 4, seed);
        return directory;
    }

    private static LocalRun Run(string weights, SwiGluWeights[] check, int seed, bool weighted) =>
        new(
            new LayerSpec { MaxTokens = 16, Hidden = 32, TopK = 3, NumExperts = 8, WorldSize = 4, TokenType = TokenType.BFloat16, StepTimeout = TimeSpan.FromSeconds(30) }.Validated(),
            Steps: 3,
            Seed: seed,
            Drop: 0.1,
            Skewed: false,
            Weighted: weighted,
            PortBase: 30000 + (Random.Shared.Next(0, 100) * 200))
        {
            Weights = weights,
            SwiGlu = check,
        };
}

using System.Globalization;
using EpA2A.Experts.SwiGlu;

namespace EpA2A.Cluster.Tests.MultiProcess;

/// <summary>
/// `epa2a weights`, `epa2a silo --weights` and `epa2a drive --weights` as real processes (two silos, localhost
/// clustering): the silos serve SwiGLU experts from the files `epa2a weights` wrote; drive checks three steps against
/// the reference SwiGLU on the same files (exit 0), and a drive checking against other weights reports a mismatch
/// (exit 1), so the check is not one that passes whatever the silos compute.
/// </summary>
[Collection(ProcessCluster.Collection)]
public sealed class SwiGluProcessTests : IDisposable
{
    private readonly string root = Path.Combine(Path.GetTempPath(), $"epa2a-swiglu-mp-{Guid.NewGuid():N}");

    [Fact]
    public async Task Drive_checks_silos_serving_swiglu_weights_and_a_drive_with_other_weights_mismatches()
    {
        int seed = Random.Shared.Next(1, 1_000_000);
        int portBase = 30000 + (Random.Shared.Next(0, 100) * 200);
        string port = portBase.ToString(CultureInfo.InvariantCulture);
        string served = Path.Combine(root, "served");
        string other = Path.Combine(root, "other");
        using (ChildProcess write = ChildProcess.Epa2a("weights", "weights", "--hidden", "64", "--ffn", "96", "--experts", "8", "--ranks", "2", "--seed", seed.ToString(CultureInfo.InvariantCulture), "--out", served))
        {
            Assert.True(await write.WaitForExitAsync(TimeSpan.FromSeconds(60)) == 0, $"seed {seed}: epa2a weights failed:\n{string.Join('\n', write.Lines)}");
        }

        SwiGluWeightsFile.WriteRandom(other, hidden: 64, ffn: 96, experts: 8, ranks: 2, seed + 1);
        using ChildProcess silo0 = ChildProcess.Epa2a("silo0", "silo", "--rank", "0", "--world-size", "2", "--group", "sw", "--port-base", port, "--weights", served);
        using ChildProcess silo1 = ChildProcess.Epa2a("silo1", "silo", "--rank", "1", "--world-size", "2", "--group", "sw", "--port-base", port, "--weights", served);
        await silo0.WaitForLineAsync(l => l.StartsWith("epa2a silo: rank", StringComparison.Ordinal), TimeSpan.FromSeconds(60));
        await silo1.WaitForLineAsync(l => l.StartsWith("epa2a silo: rank", StringComparison.Ordinal), TimeSpan.FromSeconds(60));
        string[] common = ["drive", "--world-size", "2", "--group", "sw", "--port-base", port, "--hidden", "64", "--experts", "8", "--topk", "3", "--max-tokens", "16",
            "--seed", seed.ToString(CultureInfo.InvariantCulture), "--timeout-seconds", "10", "--connect-timeout-seconds", "30"];

        using ChildProcess drive = ChildProcess.Epa2a("drive", [.. common, "--steps", "3", "--weights", served]);
        int code = await drive.WaitForExitAsync(TimeSpan.FromSeconds(60));
        Assert.True(code == 0, $"seed {seed}: drive --weights exited {code}:\n{string.Join('\n', drive.Lines)}");
        Assert.Equal(3, drive.Lines.Count(l => l.StartsWith("step ", StringComparison.Ordinal) && l.Contains(": ok, ", StringComparison.Ordinal) && !l.Contains(": ok, 0 rows", StringComparison.Ordinal)));
        Assert.Contains("drive: 0 of 3 steps failed (0 mismatched)", drive.Lines);

        using ChildProcess wrong = ChildProcess.Epa2a("wrong", [.. common, "--steps", "1", "--weights", other]);
        int wrongCode = await wrong.WaitForExitAsync(TimeSpan.FromSeconds(60));
        Assert.True(wrongCode == 1, $"seed {seed}: a drive checking other weights exited {wrongCode}, expected 1 (a mismatch):\n{string.Join('\n', wrong.Lines)}");
        Assert.Contains(wrong.Lines, l => l.StartsWith("step 1: MISMATCH", StringComparison.Ordinal));
    }

    public void Dispose()
    {
        if (Directory.Exists(root))
        {
            Directory.Delete(root, recursive: true);
        }
    }
}

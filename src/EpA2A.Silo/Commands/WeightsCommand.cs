using System.CommandLine;
using System.Globalization;
using EpA2A.Experts.SwiGlu;

namespace EpA2A.Silo.Commands;

/// <summary>
/// `epa2a weights`: writes random SwiGLU expert weights for a layer shape, one safetensors file per rank
/// (<see cref="SwiGluWeightsFile"/>), for `epa2a silo --weights`, `epa2a local --weights` and `epa2a drive --weights`.
/// </summary>
internal static class WeightsCommand
{
    public static Command Create()
    {
        Option<int> hidden = new("--hidden") { Description = "Elements per token (the layer's --hidden)", Required = true };
        Option<int> ffn = new("--ffn") { Description = "The FFN's intermediate size", Required = true };
        Option<int> experts = new("--experts") { Description = "Experts in the group (the layer's --experts)", Required = true };
        Option<int> ranks = new("--ranks") { Description = "Ranks the experts are split over (the layer's world size)", Required = true };
        Option<int> seed = new("--seed") { Description = "Seed of the random weights", DefaultValueFactory = _ => 1 };
        Option<string> output = new("--out") { Description = "Directory to write experts-rank{r}.safetensors into", Required = true };

        Command command = new("weights", "Write random SwiGLU expert weights (bf16), one safetensors file per rank.")
        {
            hidden, ffn, experts, ranks, seed, output,
        };
        command.SetAction((p, _) =>
        {
            int h = p.GetValue(hidden), f = p.GetValue(ffn), e = p.GetValue(experts), r = p.GetValue(ranks);
            try
            {
                SwiGluWeightsFile.RequireShape(h, f, e, r);
            }
            catch (ArgumentException x)
            {
                throw new UsageException($"--hidden, --ffn, --experts, --ranks: {x.Message.Replace($" (Parameter '{x.ParamName}')", string.Empty, StringComparison.Ordinal)}", x);
            }

            IReadOnlyList<string> paths = SwiGluWeightsFile.WriteRandom(p.GetValue(output)!, h, f, e, r, p.GetValue(seed));
            Console.WriteLine(string.Create(CultureInfo.InvariantCulture, $"epa2a weights: {e} SwiGLU experts (hidden {h}, ffn {f}, bf16) over {r} ranks, seed {p.GetValue(seed)}: {string.Join(", ", paths)}"));
            return Task.FromResult(ExitCodes.Ok);
        });
        return command;
    }
}

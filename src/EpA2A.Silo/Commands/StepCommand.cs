using System.CommandLine;

namespace EpA2A.Silo.Commands;

/// <summary>`epa2a step`: placeholder until the safetensors replay lands.</summary>
internal static class StepCommand
{
    public static Command Create() => new("step", "Runs one step from a safetensors file (not yet available).");
}

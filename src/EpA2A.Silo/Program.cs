using System.CommandLine;

using EpA2A.Silo.Commands;

RootCommand root = new("EpA2A: expert-parallel all-to-all for Mixture-of-Experts serving, hosted by Orleans.")
{
    LocalCommand.Create(),
    SiloCommand.Create(),
    StepCommand.Create(),
    DriveCommand.Create(),
    WeightsCommand.Create(),
};
return await CommandLineExit.InvokeAsync(root, args, Console.Error);

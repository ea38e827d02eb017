using System.CommandLine;
using System.Net.Sockets;
using EpA2A.Config;
using EpA2A.Errors;
using EpA2A.Grains;
using EpA2A.Silo.Hosting;

namespace EpA2A.Silo.Commands;

/// <summary>The exit codes every `epa2a` command keeps (README, "The command line").</summary>
internal static class ExitCodes
{
    /// <summary>Done, and every check passed.</summary>
    public const int Ok = 0;

    /// <summary>A result differs from the reference (outputs are still written).</summary>
    public const int Mismatch = 1;

    /// <summary>A bad option, a bad input file, or a combination the layer refuses: nothing was run or written.</summary>
    public const int BadInput = 2;

    /// <summary>The cluster or the step failed: a deadline, a lost rank, no silo, a layer held by another client.</summary>
    public const int ClusterFailed = 3;

    /// <summary>Reading or writing a file failed (disk full, permissions): outputs are whole or absent.</summary>
    public const int IoFailed = 4;
}

/// <summary>A bad option or combination of options, named in the message: one line, exit code 2.</summary>
internal sealed class UsageException : Exception
{
    public UsageException(string message)
        : base(message)
    {
    }

    public UsageException(string message, Exception inner)
        : base(message, inner)
    {
    }

    public UsageException()
    {
    }
}

/// <summary>
/// The top of every command: parse errors exit 2; any exception a command lets out becomes one line on stderr and
/// the exit code of its kind, never a stack trace.
/// </summary>
internal static class CommandLineExit
{
    public static async Task<int> InvokeAsync(RootCommand root, string[] args, TextWriter error)
    {
        ArgumentNullException.ThrowIfNull(root);
        ParseResult parse = root.Parse(args);
        string name = parse.CommandResult.Command == root ? "epa2a" : $"epa2a {parse.CommandResult.Command.Name}";
        if (parse.Errors.Count > 0)
        {
            foreach (System.CommandLine.Parsing.ParseError e in parse.Errors)
            {
                await error.WriteLineAsync($"{name}: {e.Message.ReplaceLineEndings(" ")}").ConfigureAwait(false);
            }

            return ExitCodes.BadInput;
        }

        try
        {
            return await parse.InvokeAsync(new InvocationConfiguration { EnableDefaultExceptionHandler = false }).ConfigureAwait(false);
        }
        catch (Exception e)
        {
            (int code, string line) = Describe(e);
            await error.WriteLineAsync($"{name}: {line}").ConfigureAwait(false);
            return code;
        }
    }

    /// <summary>The exit code and the one line for an exception that reached the top of a command.</summary>
    public static (int Code, string Line) Describe(Exception e)
    {
        ArgumentNullException.ThrowIfNull(e);
        e = e is AggregateException { InnerExceptions.Count: 1 } a ? a.InnerExceptions[0] : e;
        string message = e is TimeoutException or OrleansException ? RemoteFailure.Describe(e, innermost: false) : RemoteFailure.Clean(e.Message);
        return e switch
        {
            UsageException => (ExitCodes.BadInput, message),
            Microsoft.Extensions.Options.OptionsValidationException => (ExitCodes.BadInput, $"bad settings: {message}"),
            InvalidDataException => (ExitCodes.BadInput, $"bad input file: {message}"),
            LayerSpecConflictException => (ExitCodes.ClusterFailed, message),
            GroupStepFailedException or EpStepFailedException or NoSiloForRankException => (ExitCodes.ClusterFailed, $"the cluster failed: {message}"),
            SocketException s when s.SocketErrorCode == SocketError.AddressAlreadyInUse => (ExitCodes.ClusterFailed, $"a port is already in use: {message}"),
            ArgumentException => (ExitCodes.BadInput, message),
            OutOfMemoryException => (ExitCodes.BadInput, "out of memory: the input or options ask for more than this machine holds"),
            OperationCanceledException => (ExitCodes.ClusterFailed, "cancelled"),
            TimeoutException or OrleansException => (ExitCodes.ClusterFailed, $"the cluster failed: {message}"),
            IOException or UnauthorizedAccessException => (ExitCodes.IoFailed, message),
            _ => (ExitCodes.ClusterFailed, $"failed: {e.GetType().Name}: {message}"),
        };
    }
}

/// <summary>Checks of option values before anything is started or allocated; each failure names the option.</summary>
internal static class OptionRules
{
    public static void Require(bool ok, string rule)
    {
        if (!ok)
        {
            throw new UsageException(rule);
        }
    }

    /// <summary>The --backend option: "cpu" or "cuda"; anything else is a usage error naming the option and both.</summary>
    public static EpBackendKind Backend(string? value, string option = "--backend")
    {
        Require(EpBackendKinds.TryParse(value, out EpBackendKind kind), EpBackendKinds.Invalid(value, option));
        return kind;
    }

    /// <summary>--clustering (localhost, the default, or redis) with the --redis connection that redis needs.</summary>
    public static ClusteringKind Clustering(string? clustering, string? redis)
    {
        ClusteringKind kind = clustering switch
        {
            "localhost" or null => ClusteringKind.Localhost,
            "redis" => ClusteringKind.Redis,
            string other => throw new UsageException($"--clustering '{other}' is not localhost or redis"),
        };
        Require(kind != ClusteringKind.Redis || !string.IsNullOrWhiteSpace(redis), "--clustering redis needs --redis HOST:PORT");
        return kind;
    }

    /// <summary>--token-type: bf16, fp16 or fp32.</summary>
    public static TokenType TokenType(string text) => TokenTypeInfo.TryParse(text, out TokenType type)
        ? type
        : throw new UsageException($"--token-type '{text}' is not bf16, fp16 or fp32");

    /// <summary>A deadline option in seconds: finite and in (0, <paramref name="max"/>].</summary>
    public static TimeSpan Seconds(double value, string option, double max = 3600)
    {
        Require(double.IsFinite(value) && value > 0 && value <= max, $"{option} {value} must be in (0, {max}] seconds");
        return TimeSpan.FromSeconds(value);
    }

    /// <summary>A probability option in [0, 1).</summary>
    public static double Probability(double value, string option)
    {
        Require(double.IsFinite(value) && value >= 0 && value < 1, $"{option} {value} must be in [0, 1)");
        return value;
    }

    /// <summary>
    /// Ports of the scheme silo = base + rank, gateway = base + offset + rank: the two ranges must not meet (a silo of
    /// one rank would bind another rank's gateway) and must stay below 65536.
    /// </summary>
    public static void Ports(int portBase, int gatewayOffset, int worldSize, string worldOption)
    {
        Require(gatewayOffset >= 1, $"--gateway-offset {gatewayOffset} must be positive");
        Require(
            worldSize <= gatewayOffset,
            $"{worldOption} {worldSize} is more than --gateway-offset {gatewayOffset}: rank {gatewayOffset}'s silo port (base + rank) would be rank 0's gateway port (base + {gatewayOffset} + rank); pass --gateway-offset {worldSize} or more");
        Require(
            portBase >= 1024 && (long)portBase + gatewayOffset + worldSize - 1 <= 65535,
            $"--port-base {portBase} with --gateway-offset {gatewayOffset} and {worldSize} ranks needs ports {portBase} to {(long)portBase + gatewayOffset + worldSize - 1}, outside [1024, 65535]");
    }

    /// <summary>--weights: the directory must hold the file of every rank in <paramref name="ranks"/> (`epa2a weights` writes them).</summary>
    public static string? Weights(string? directory, IEnumerable<int> ranks)
    {
        if (directory is null)
        {
            return null;
        }

        foreach (int r in ranks)
        {
            string file = Path.Combine(directory, Experts.SwiGlu.SwiGluWeightsFile.FileName(r));
            Require(File.Exists(file), $"--weights {directory}: no {Experts.SwiGlu.SwiGluWeightsFile.FileName(r)} for rank {r} (write a set with `epa2a weights`)");
        }

        return directory;
    }

    /// <summary>
    /// --weights of a client that checks steps (local, drive): every rank's SwiGLU weights, which must fit the layer (hidden,
    /// experts per rank) and a normal-mode layer; null without --weights.
    /// </summary>
    public static Experts.SwiGlu.SwiGluWeights[]? SwiGluFor(string? directory, LayerSpec spec)
    {
        ArgumentNullException.ThrowIfNull(spec);
        if (Weights(directory, Enumerable.Range(0, spec.WorldSize)) is not { } dir)
        {
            return null;
        }

        Require(spec.Mode == LayerMode.Normal, "--weights: SwiGLU experts are checked in normal mode only (not with --mode low-latency)");
        Experts.SwiGlu.SwiGluWeights[] all = Experts.SwiGlu.SwiGluWeightsFile.ReadAll(dir, spec.WorldSize);
        foreach (Experts.SwiGlu.SwiGluWeights w in all)
        {
            Require(
                w.Hidden == spec.Hidden && w.ExpertCount * spec.WorldSize == spec.NumExperts,
                $"--weights {dir}: the weights are for hidden {w.Hidden} and {w.ExpertCount * spec.WorldSize} experts; the layer has --hidden {spec.Hidden} and --experts {spec.NumExperts}");
        }

        return all;
    }

    /// <summary>A layer spec from options; a field the layer refuses is named with the rule.</summary>
    public static LayerSpec Spec(Func<LayerSpec> build)
    {
        try
        {
            return build().Validated();
        }
        catch (ArgumentException e)
        {
            throw new UsageException($"the options make an invalid layer: {e.Message.ReplaceLineEndings(" ")}", e);
        }
    }
}

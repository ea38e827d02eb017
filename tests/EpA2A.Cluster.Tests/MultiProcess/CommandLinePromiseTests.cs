using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;

namespace EpA2A.Cluster.Tests.MultiProcess;

/// <summary>
/// The `epa2a` exit codes and one-line errors, from real processes (issue 17, findings 4, 5 and 8): parse errors and
/// bad options exit 2 before anything starts, a drive with no silos gives up at its deadline with exit 3, a taken port
/// is named, and `local --ranks 101` is refused in one line.
/// </summary>
[Collection(ProcessCluster.Collection)]
public sealed class CommandLinePromiseTests
{
    public static TheoryData<string[], string> BadOptions() => new()
    {
        { ["drive", "--world-size", "two"], "two" },
        { ["drive", "--world-size", "2", "--steps", "-1"], "--steps -1 must not be negative" },
        { ["drive", "--world-size", "2", "--timeout-seconds", "1e12"], "--timeout-seconds 1000000000000 must be in (0, 3600]" },
        { ["drive", "--world-size", "2", "--experts", "2147483647"], "the options make an invalid layer: EpConfig.NumExperts" },
        { ["local", "--drop", "1.5"], "--drop 1.5 must be in [0, 1)" },
        { ["local", "--ranks", "101"], "--ranks 101 is more than --gateway-offset 100" },
        { ["silo", "--rank", "3", "--world-size", "2"], "--rank 3 must be in [0, --world-size 2)" },
        { ["silo", "--rank", "0", "--world-size", "1", "--backend", "tpu"], "--backend 'tpu' is not a backend: expected one of cpu, cuda" },
        { ["step", "--no-such-option"], "--no-such-option" },
    };

    [Theory]
    [MemberData(nameof(BadOptions))]
    public async Task A_bad_option_exits_2_with_one_line_naming_it_before_anything_starts(string[] arguments, string message)
    {
        Stopwatch clock = Stopwatch.StartNew();
        using ChildProcess epa2a = ChildProcess.Epa2a(arguments[0], arguments);
        int code = await epa2a.WaitForExitAsync(TimeSpan.FromSeconds(60));
        string all = string.Join('\n', epa2a.Lines);
        Assert.True(code == 2, $"exit {code}: {all}");
        Assert.Contains(message, all, StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", all, StringComparison.Ordinal);
        Assert.DoesNotContain("Unhandled exception", all, StringComparison.Ordinal);
        Assert.True(epa2a.Lines.Count <= 2, $"more than one error line: {all}");
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30), $"took {clock.Elapsed}: something was started first");
    }

    [Fact]
    public async Task A_drive_with_no_silo_gives_up_at_its_connect_deadline_with_exit_3_naming_the_gateways()
    {
        int portBase = 40000 + (Random.Shared.Next(0, 100) * 200);
        using ChildProcess drive = ChildProcess.Epa2a("drive", "drive", "--world-size", "2", "--port-base", portBase.ToString(CultureInfo.InvariantCulture), "--connect-timeout-seconds", "3");
        int code = await drive.WaitForExitAsync(TimeSpan.FromSeconds(60));
        string all = string.Join('\n', drive.Lines);
        Assert.True(code == 3, $"exit {code}: {all}");
        Assert.Contains($"gateways on ports {portBase + 100}-{portBase + 101}", all, StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", all, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_silo_on_a_port_already_bound_is_refused_naming_the_port()
    {
        using TcpListener taken = new(IPAddress.Loopback, 0);
        taken.Start();
        int port = ((IPEndPoint)taken.LocalEndpoint).Port;
        using ChildProcess silo = ChildProcess.Epa2a("silo", "silo", "--rank", "0", "--world-size", "1", "--port-base", port.ToString(CultureInfo.InvariantCulture));
        int code = await silo.WaitForExitAsync(TimeSpan.FromSeconds(60));
        string all = string.Join('\n', silo.Lines);
        Assert.True(code == 2, $"exit {code}: {all}");
        Assert.Contains($"silo port {port} is already in use", all, StringComparison.Ordinal);
        Assert.DoesNotContain("   at ", all, StringComparison.Ordinal);
    }
}

using System.Diagnostics;
using System.Globalization;

namespace EpA2A.Cluster.Tests.MultiProcess;

/// <summary>
/// Hosts made of Linux network namespaces on this machine, each with its own address on one subnet: every host
/// namespace has an `eth0` whose other end is a port of a bridge that lives in a namespace of its own (the
/// machine's own network is never touched). Cutting a host's cable is setting its bridge port down. Everything is
/// named with a random prefix, so tests of several checkouts on one machine do not collide, and removed on
/// <see cref="Dispose"/> (processes first, then the namespaces), also after a failed test.
/// </summary>
public sealed class NetnsHosts : IDisposable
{
    private readonly List<string> namespaces = [];
    private readonly List<ChildProcess> processes = [];
    private readonly Dictionary<string, (string Namespace, string Address, string BridgePort)> hosts = [];
    private readonly string prefix;
    private readonly string subnet;
    private readonly string bridgeNamespace;

    private NetnsHosts()
    {
        prefix = "ea" + Convert.ToHexString(BitConverter.GetBytes(Random.Shared.Next()))[..6].ToLowerInvariant();
        subnet = string.Create(CultureInfo.InvariantCulture, $"10.{200 + Random.Shared.Next(50)}.{Random.Shared.Next(256)}");
        bridgeNamespace = prefix + "-br";
    }

    /// <summary>Why namespaces cannot be made here (not Linux, not root, no `ip netns`), or null when they can.</summary>
    public static string? Unavailable()
    {
        if (!OperatingSystem.IsLinux())
        {
            return "network namespaces are Linux only";
        }

        if (Run("id", "-u").Output.Trim() != "0")
        {
            return "making network namespaces needs root";
        }

        string probe = "eaprobe" + Environment.ProcessId.ToString(CultureInfo.InvariantCulture);
        (int code, string output) = Run("ip", "netns", "add", probe);
        if (code != 0)
        {
            return $"`ip netns add` failed ({code}): {output.Trim()}";
        }

        Run("ip", "netns", "del", probe);
        return null;
    }

    /// <summary>Makes the bridge namespace and one host namespace per name, addresses .1, .2, ... in name order.</summary>
    public static NetnsHosts Create(params string[] names)
    {
        NetnsHosts made = new();
        try
        {
            made.AddNamespace(made.bridgeNamespace);
            Ip(made.bridgeNamespace, "link", "add", "br0", "type", "bridge");
            Ip(made.bridgeNamespace, "link", "set", "br0", "up");
            for (int i = 0; i < names.Length; i++)
            {
                made.AddHost(names[i], string.Create(CultureInfo.InvariantCulture, $"{made.subnet}.{i + 1}"), i);
            }

            return made;
        }
        catch
        {
            made.Dispose();
            throw;
        }
    }

    /// <summary>The address of host <paramref name="name"/>.</summary>
    public string Address(string name) => hosts[name].Address;

    /// <summary>Starts <paramref name="file"/> inside host <paramref name="name"/>'s namespace; it is killed on <see cref="Dispose"/>.</summary>
    public ChildProcess Start(string name, string label, string file, params string[] arguments)
    {
        ChildProcess p = ChildProcess.Start(label, "ip", ["netns", "exec", hosts[name].Namespace, file, .. arguments]);
        processes.Add(p);
        return p;
    }

    /// <summary>`epa2a` (the build beside the tests) inside host <paramref name="name"/>, restarted by a shell loop whenever it exits (a supervisor).</summary>
    public ChildProcess StartSupervisedEpa2a(string name, string label, params string[] arguments)
    {
        string command = string.Join(' ', new[] { "dotnet", Path.Combine(AppContext.BaseDirectory, "epa2a.dll") }.Concat(arguments).Select(Quote));
        return Start(name, label, "bash", "-c", $"while :; do {command}; echo \"supervisor: exited with $?\"; sleep 0.3; done");
    }

    /// <summary>`epa2a` inside host <paramref name="name"/>.</summary>
    public ChildProcess StartEpa2a(string name, string label, params string[] arguments) =>
        Start(name, label, "dotnet", [Path.Combine(AppContext.BaseDirectory, "epa2a.dll"), .. arguments]);

    /// <summary>Pulls (or plugs back) host <paramref name="name"/>'s cable: its bridge port goes down (or up). Its processes keep running.</summary>
    public void SetLink(string name, bool up) => Ip(bridgeNamespace, "link", "set", hosts[name].BridgePort, up ? "up" : "down");

    public void Dispose()
    {
        foreach (ChildProcess p in processes)
        {
            p.Dispose();
        }

        processes.Clear();
        foreach (string ns in Enumerable.Reverse(namespaces))
        {
            Run("ip", "netns", "del", ns);
        }

        namespaces.Clear();
    }

    private static string Quote(string s) => "'" + s.Replace("'", "'\\''", StringComparison.Ordinal) + "'";

    private void AddHost(string name, string address, int index)
    {
        string ns = $"{prefix}-{name}";
        string port = string.Create(CultureInfo.InvariantCulture, $"{prefix}p{index}");
        AddNamespace(ns);
        Must("ip", "link", "add", port, "netns", bridgeNamespace, "type", "veth", "peer", "name", "eth0", "netns", ns);
        Ip(bridgeNamespace, "link", "set", port, "master", "br0");
        Ip(bridgeNamespace, "link", "set", port, "up");
        Ip(ns, "addr", "add", address + "/24", "dev", "eth0");
        Ip(ns, "link", "set", "eth0", "up");
        Ip(ns, "link", "set", "lo", "up");
        hosts[name] = (ns, address, port);
    }

    private void AddNamespace(string ns)
    {
        Must("ip", "netns", "add", ns);
        namespaces.Add(ns);
    }

    private static void Ip(string ns, params string[] arguments) => Must("ip", ["-n", ns, .. arguments]);

    private static void Must(string file, params string[] arguments)
    {
        (int code, string output) = Run(file, arguments);
        if (code != 0)
        {
            throw new InvalidOperationException($"`{file} {string.Join(' ', arguments)}` failed ({code}): {output.Trim()}");
        }
    }

    private static (int Code, string Output) Run(string file, params string[] arguments)
    {
        ProcessStartInfo start = new(file) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (string a in arguments)
        {
            start.ArgumentList.Add(a);
        }

        using Process p = Process.Start(start)!;
        Task<string> output = p.StandardOutput.ReadToEndAsync();
        Task<string> error = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(20_000))
        {
            p.Kill(entireProcessTree: true);
            return (-1, $"{file} did not finish within 20 s");
        }

        return (p.ExitCode, output.Result + error.Result);
    }
}

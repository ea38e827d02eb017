using System.Net;
using System.Net.NetworkInformation;
using System.Net.Sockets;

namespace EpA2A.Silo.Hosting;

/// <summary>
/// The address a silo tells the cluster it is reachable at (what goes into the membership table). Silos on other
/// hosts dial it, so it must be this host's own address on the network they share, never loopback unless asked.
/// </summary>
public static class AdvertisedAddress
{
    /// <summary>
    /// "auto" (or null / empty): this host's own address (<see cref="OfThisHost"/>); otherwise an IP address, or a host
    /// name that resolves to one (the first IPv4 address it resolves to).
    /// </summary>
    /// <exception cref="ArgumentException">The text is no address and resolves to none, or "auto" finds no address.</exception>
    public static IPAddress Parse(string? text)
    {
        if (string.IsNullOrWhiteSpace(text) || string.Equals(text, "auto", StringComparison.OrdinalIgnoreCase))
        {
            return OfThisHost();
        }

        if (IPAddress.TryParse(text, out IPAddress? ip))
        {
            return ip;
        }

        IPAddress[] resolved;
        try
        {
            resolved = Dns.GetHostAddresses(text);
        }
        catch (SocketException e)
        {
            throw new ArgumentException($"--advertise '{text}' is no IP address and does not resolve: {e.Message}", nameof(text), e);
        }

        return resolved.FirstOrDefault(a => a.AddressFamily == AddressFamily.InterNetwork) ?? resolved.FirstOrDefault()
            ?? throw new ArgumentException($"--advertise '{text}' resolves to no address", nameof(text));
    }

    /// <summary>
    /// This host's own IPv4 address: of the interfaces that are up and not loopback, one with a default gateway first
    /// (the one other hosts route to), else the first; in interface order, so every start picks the same one.
    /// </summary>
    /// <exception cref="ArgumentException">The host has no address but loopback.</exception>
    public static IPAddress OfThisHost()
    {
        var candidates = NetworkInterface.GetAllNetworkInterfaces()
            .Where(n => n.OperationalStatus is OperationalStatus.Up or OperationalStatus.Unknown && n.NetworkInterfaceType != NetworkInterfaceType.Loopback)
            .Select(n => (Properties: n.GetIPProperties(), Interface: n))
            .SelectMany(n => n.Properties.UnicastAddresses
                .Where(a => a.Address.AddressFamily == AddressFamily.InterNetwork && !IPAddress.IsLoopback(a.Address))
                .Select(a => (a.Address, Routed: n.Properties.GatewayAddresses.Count > 0)))
            .ToArray();
        if (candidates.Length == 0)
        {
            throw new ArgumentException("this host has no network address but loopback: pass --advertise 127.0.0.1 to run every silo on this host only, or the address other hosts reach it at");
        }

        return candidates.FirstOrDefault(c => c.Routed).Address ?? candidates[0].Address;
    }
}

using System.Globalization;
using System.Net;
using System.Net.Sockets;

using EpA2A.Grains.Placement;

using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;

using Orleans.Runtime;
using Orleans.Runtime.MembershipService.SiloMetadata;

namespace EpA2A.Silo.Hosting;

/// <summary>
/// What a silo checks around its start, so that a second silo never quietly shares a port or a rank with a live one:
/// its ports must be free (a plain bind, without SO_REUSEPORT, fails on a port another listener holds even when that
/// listener allows sharing), and once joined, no other active silo may serve its group and rank.
/// </summary>
public static class SiloStartChecks
{
    /// <summary>Throws <see cref="IOException"/> naming the first of <paramref name="ports"/> that is already bound.</summary>
    public static void RequireFreePorts(params (int Port, string What)[] ports)
    {
        ArgumentNullException.ThrowIfNull(ports);
        foreach ((int port, string what) in ports)
        {
            using Socket probe = new(AddressFamily.InterNetwork, SocketType.Stream, ProtocolType.Tcp);
            try
            {
                probe.Bind(new IPEndPoint(IPAddress.Any, port));
            }
            catch (SocketException e) when (e.SocketErrorCode is SocketError.AddressAlreadyInUse or SocketError.AccessDenied)
            {
                throw new IOException(string.Create(CultureInfo.InvariantCulture, $"{what} port {port} is already in use (another silo of this rank, or another program): stop it or choose another --port-base"), e);
            }
        }
    }

    /// <summary>
    /// Another active silo that serves <paramref name="group"/> / <paramref name="rank"/> and stays active: looked for
    /// during <paramref name="look"/> after joining (metadata of other silos arrives within a second or two), then
    /// watched for up to <paramref name="deathBound"/>, so that a predecessor that died just before this silo started
    /// (still listed as active until it is declared dead) is not mistaken for a live duplicate. Null when there is none.
    /// </summary>
    public static async Task<string?> FindLiveDuplicateAsync(IHost silo, string group, int rank, TimeSpan look, TimeSpan deathBound, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(silo);
        IClusterMembershipService membership = silo.Services.GetRequiredService<IClusterMembershipService>();
        ISiloMetadataCache metadata = silo.Services.GetRequiredService<ISiloMetadataCache>();
        SiloAddress self = silo.Services.GetRequiredService<ILocalSiloDetails>().SiloAddress;
        string rankText = rank.ToString(CultureInfo.InvariantCulture);
        DateTime start = DateTime.UtcNow;
        ClusterMember? seen = null;
        while (true)
        {
            ClusterMember? now = membership.CurrentSnapshot.Members.Values.FirstOrDefault(m =>
                m.Status == SiloStatus.Active && !m.SiloAddress.Equals(self) && Serves(metadata.GetSiloMetadata(m.SiloAddress).Metadata, group, rankText));
            TimeSpan elapsed = DateTime.UtcNow - start;
            if (now is null && (seen is not null || elapsed >= look))
            {
                return null; // none, or the one seen was declared dead
            }

            seen = now ?? seen;
            if (now is not null && elapsed >= look + deathBound)
            {
                return $"{now.SiloAddress} ({now.Name})";
            }

            await Task.Delay(200, cancellationToken).ConfigureAwait(false);
        }
    }

    private static bool Serves(System.Collections.Immutable.ImmutableDictionary<string, string> md, string group, string rank) =>
        md.TryGetValue(RankMetadata.Group, out string? g) && g == group && md.TryGetValue(RankMetadata.Rank, out string? r) && r == rank;
}

using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;

using Orleans.Clustering.Redis;
using Orleans.Runtime;

namespace EpA2A.Silo.Hosting;

/// <summary>
/// Watches, through the silo's own membership provider, that the cluster's membership table still holds this silo.
/// Orleans does not notice when the table vanishes (Redis restarted without persistence, or its keys deleted): each
/// read fails (the Redis provider finds no version row) and is retried forever, so no dead silo is ever declared dead;
/// and once a new silo re-creates the table, the old members keep a view whose version is ahead of the new table's and
/// ignore it, with no row of their own in it. Only a new host (a fresh membership view, a new row) rejoins.
/// </summary>
public static class MembershipTableWatch
{
    /// <summary>
    /// Completes with what is missing once a read of the table succeeds without this silo's row, or the provider says
    /// the table's version row is gone. A read that fails otherwise (Redis down or restarting) proves nothing: the watch
    /// asks again every <paramref name="period"/>. Cancelled through <paramref name="cancellationToken"/>.
    /// </summary>
    public static async Task<string> WaitUntilGoneAsync(IHost silo, TimeSpan period, CancellationToken cancellationToken)
    {
        ArgumentNullException.ThrowIfNull(silo);
        IMembershipTable table = silo.Services.GetRequiredService<IMembershipTable>();
        SiloAddress self = silo.Services.GetRequiredService<ILocalSiloDetails>().SiloAddress;
        while (true)
        {
            await Task.Delay(period, cancellationToken).ConfigureAwait(false);
            try
            {
                MembershipTableData data = await table.ReadAllAsync(cancellationToken).WaitAsync(period * 5, cancellationToken).ConfigureAwait(false);
                if (!data.Members.Any(m => m.Item1.SiloAddress.Equals(self)))
                {
                    return $"the table holds no row for this silo ({self})";
                }
            }
            catch (RedisClusteringException e)
            {
                return e.Message.ReplaceLineEndings(" ");
            }
            catch (Exception e) when (e is not OperationCanceledException || !cancellationToken.IsCancellationRequested)
            {
                // Unreachable is not gone: ask again.
            }
        }
    }

    /// <summary>
    /// Re-creates the table's version row if it is missing (the provider's own initialisation, a no-op otherwise), so that
    /// the host being stopped can record its departure instead of retrying a table that is not there.
    /// </summary>
    public static async Task RecreateAsync(IHost silo, TimeSpan within)
    {
        ArgumentNullException.ThrowIfNull(silo);
        try
        {
            await silo.Services.GetRequiredService<IMembershipTable>().InitializeMembershipTableAsync(tryInitTableVersion: true).WaitAsync(within).ConfigureAwait(false);
        }
        catch (Exception e) when (e is TimeoutException or RedisClusteringException or StackExchange.Redis.RedisException)
        {
            // The next host initialises the table again as it starts.
        }
    }
}

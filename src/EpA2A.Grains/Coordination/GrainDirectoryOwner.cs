using System.Reflection;

namespace EpA2A.Grains.Coordination;

/// <summary>
/// Which silo holds a grain's grain-directory registration, as this silo's Orleans directory sees it: the same answer
/// Orleans' own management report gives (SiloControl.GetDetailedGrainReport's PrimaryForGrain), read the way that report
/// reads it. Orleans keeps the question internal, so it is asked by reflection; a diagnostic only (it says where a
/// coordinator's registration lies, so a test can kill that silo), and null whenever this Orleans does not answer.
/// </summary>
internal static class GrainDirectoryOwner
{
    private static readonly Assembly OrleansRuntime = typeof(Orleans.Hosting.CoreHostingExtensions).Assembly;

    // The distributed directory first, as the report does: the local directory is registered beside it either way.
    private static readonly (Type? Service, MethodInfo? Owner)[] Directories =
    [
        Lookup("Orleans.Runtime.GrainDirectory.DistributedGrainDirectory", "Orleans.Runtime.GrainDirectory.DistributedGrainDirectory+ITestHooks"),
        Lookup("Orleans.Runtime.GrainDirectory.ILocalGrainDirectory", "Orleans.Runtime.GrainDirectory.ILocalGrainDirectory"),
    ];

    public static string? Find(IServiceProvider services, GrainId grain)
    {
        foreach ((Type? service, MethodInfo? owner) in Directories)
        {
            if (service is null || owner is null || services.GetService(service) is not { } directory)
            {
                continue;
            }

            try
            {
                return owner.Invoke(directory, [grain])?.ToString();
            }
            catch (TargetInvocationException)
            {
                return null;
            }
        }

        return null;
    }

    private static (Type?, MethodInfo?) Lookup(string service, string declaring) =>
        (OrleansRuntime.GetType(service), OrleansRuntime.GetType(declaring)?.GetMethod("GetPrimaryForGrain", [typeof(GrainId)]));
}

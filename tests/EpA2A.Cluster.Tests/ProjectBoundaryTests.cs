using EpA2A.Grains;
using EpA2A.Safetensors;

namespace EpA2A.Cluster.Tests;

/// <summary>The project boundaries the README draws: a cluster client and the safetensors codec get no layer with them.</summary>
public sealed class ProjectBoundaryTests
{
    [Fact]
    public void The_grain_contracts_reference_the_shared_contracts_and_not_the_layer()
    {
        string[] references = ReferencedNames(typeof(IRankGrain));

        Assert.Contains("EpA2A.Contracts", references);
        Assert.DoesNotContain("EpA2A.Gpu", references);
    }

    [Fact]
    public void The_safetensors_codec_references_the_shared_contracts_and_not_the_layer()
    {
        string[] references = ReferencedNames(typeof(SafetensorsFile));

        Assert.Contains("EpA2A.Contracts", references);
        Assert.DoesNotContain("EpA2A.Gpu", references);
    }

    private static string[] ReferencedNames(Type type) => [.. type.Assembly.GetReferencedAssemblies().Select(a => a.Name ?? string.Empty)];
}

using EpA2A.Config;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Transport;

namespace EpA2A.Tests;

/// <summary>
/// The CUDA-only parts of the layer (fixed-capacity buffers, CUDA graph capture of a step) are refused on the CPU
/// backend with an exception that says why, and a refused capture leaves the layer usable.
/// </summary>
public sealed class CudaOnlyFeatureTests
{
    private const int World = 4;
    private const int Hidden = 16;
    private const int TopK = 2;
    private const int MaxTokens = 12;

    [Fact]
    public void A_fixed_capacity_cpu_layer_is_an_ArgumentException_naming_the_option()
    {
        EpConfig config = new(MaxTokens, Hidden, TopK, 8, 0, World, World);
        InProcessFabric fabric = new(World);

        ArgumentException e = Assert.Throws<ArgumentException>(() => EpAll2AllLayer.CreateCpu(config, fabric.TransportFor(0), new EpLayerOptions { FixedCapacity = true }));

        Assert.Equal("options", e.ParamName);
        Assert.Contains("EpLayerOptions.FixedCapacity", e.Message, StringComparison.Ordinal);
        Assert.Contains("CUDA", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Capturing_a_step_graph_on_the_cpu_backend_is_NotSupported_and_the_group_still_steps()
    {
        int seed = Random.Shared.Next();
        EpConfig config = new(MaxTokens, Hidden, TopK, 8, 0, World, World);
        using InProcessGroup group = new(config, new EpLayerOptions { StepTimeout = TimeSpan.FromSeconds(20) });
        // Nothing is launched on the CPU backend, so a made-up device address is enough.
        DeviceTensor<BFloat16> tokens = new(0x1000, [MaxTokens, Hidden]);
        DeviceTensor<int> ids = new(0x2000, [MaxTokens, TopK]);

        foreach (EpAll2AllLayer layer in group.Layers)
        {
            NotSupportedException e = await Assert.ThrowsAsync<NotSupportedException>(async () => await layer.CaptureStepGraphAsync(tokens, ids));
            Assert.Contains("cpu backend cannot capture CUDA graphs", e.Message, StringComparison.Ordinal);
        }

        await GroupStep<BFloat16>.Draw(config, seed, weights: true).RunAsync(group);
        Assert.Equal(0, group.Fabric.PendingMessages);
    }
}

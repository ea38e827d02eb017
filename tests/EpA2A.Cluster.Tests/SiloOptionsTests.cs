using System.Globalization;
using System.Net;
using System.Reflection;
using EpA2A.Grains;
using EpA2A.Grains.Hosting;
using EpA2A.Silo.Hosting;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Hosting;
using Microsoft.Extensions.Options;

namespace EpA2A.Cluster.Tests;

/// <summary>
/// A silo's rank options are bound, not copied: every field arrives in the <see cref="RankSiloOptions"/> the rank
/// runtime reads (from <see cref="SiloSettings"/> or from the EpA2A:Rank section), and a bad one stops the silo at start
/// in one line naming the field.
/// </summary>
public sealed class SiloOptionsTests
{
    [Fact]
    public void Every_rank_field_of_the_silo_settings_arrives_in_the_bound_options()
    {
        SiloSettings settings = Settings(0) with { Group = "carried", Rank = 3, Gpu = 2, Backend = EpBackendKind.Cuda };
        RankSiloOptions bound = Bound(settings);

        PropertyInfo[] twins = [.. typeof(RankSiloOptions).GetProperties().Where(p => typeof(SiloSettings).GetProperty(p.Name) is not null)];
        Assert.NotEmpty(twins);
        RankSiloOptions defaults = new();
        foreach (PropertyInfo p in twins)
        {
            object? given = typeof(SiloSettings).GetProperty(p.Name)!.GetValue(settings);
            Assert.NotEqual(p.GetValue(defaults), given); // the test would prove nothing on a default
            Assert.True(Equals(given, p.GetValue(bound)), $"SiloSettings.{p.Name} = {given} arrived as {p.GetValue(bound)}: the field is not carried into RankSiloOptions");
        }
    }

    [Fact]
    public void A_rank_field_the_silo_settings_do_not_carry_is_set_from_the_EpA2A_Rank_section()
    {
        PropertyInfo[] configOnly = [.. typeof(RankSiloOptions).GetProperties().Where(p => p.CanWrite && typeof(SiloSettings).GetProperty(p.Name) is null)];
        Assert.NotEmpty(configOnly);
        Dictionary<string, string?> configuration = [];
        foreach (PropertyInfo p in configOnly)
        {
            Assert.True(p.PropertyType == typeof(int), $"RankSiloOptions.{p.Name} is a {p.PropertyType.Name}: give this test a value of that type");
            configuration[$"{RankSiloOptions.SectionName}:{p.Name}"] = (12345 + (int)p.GetValue(new RankSiloOptions())!).ToString(CultureInfo.InvariantCulture);
        }

        RankSiloOptions bound = Bound(Settings(0) with { Configuration = configuration });
        foreach (PropertyInfo p in configOnly)
        {
            Assert.Equal(configuration[$"{RankSiloOptions.SectionName}:{p.Name}"], ((int)p.GetValue(bound)!).ToString(CultureInfo.InvariantCulture));
        }
    }

    [Fact]
    public async Task A_bad_field_of_the_EpA2A_Rank_section_stops_the_silo_at_start_naming_it()
    {
        SiloSettings settings = Settings(FreeishPortBase()) with
        {
            Configuration = new Dictionary<string, string?> { [$"{RankSiloOptions.SectionName}:{nameof(RankSiloOptions.ChunkBytes)}"] = "10" },
        };
        await StartFailsAsync(settings, "RankSiloOptions.ChunkBytes = 10 must be at least 1024");
    }

    [Fact]
    public async Task A_bad_rank_field_of_the_silo_settings_stops_the_silo_at_start_naming_it()
    {
        await StartFailsAsync(Settings(FreeishPortBase()) with { Gpu = -3 }, "RankSiloOptions.Gpu = -3 must not be negative");
        await StartFailsAsync(Settings(FreeishPortBase()) with { Group = "a/b" }, "RankSiloOptions.Group = 'a/b' must be a non-empty name without '/'");
    }

    private static int FreeishPortBase() => 40000 + (Random.Shared.Next(0, 100) * 200);

    private static async Task StartFailsAsync(SiloSettings settings, string message)
    {
        using IHost silo = EpA2AHosts.BuildSilo(settings);
        OptionsValidationException e = await Assert.ThrowsAsync<OptionsValidationException>(() => silo.StartAsync(TestContext.Current.CancellationToken));
        Assert.Equal(message, e.Message);
    }

    private static SiloSettings Settings(int portBase) => new()
    {
        Rank = 0,
        SiloPort = portBase,
        GatewayPort = portBase + 100,
        Primary = new IPEndPoint(IPAddress.Loopback, portBase),
        OwnsTelemetry = false,
    };

    private static RankSiloOptions Bound(SiloSettings settings)
    {
        using IHost silo = EpA2AHosts.BuildSilo(settings);
        return silo.Services.GetRequiredService<IOptions<RankSiloOptions>>().Value;
    }
}

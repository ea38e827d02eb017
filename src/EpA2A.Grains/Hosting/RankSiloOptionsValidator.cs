using System.Globalization;
using Microsoft.Extensions.Options;

namespace EpA2A.Grains.Hosting;

/// <summary>Checks <see cref="RankSiloOptions"/> when the silo starts; a failure is one line naming the field and the rule.</summary>
public sealed class RankSiloOptionsValidator : IValidateOptions<RankSiloOptions>
{
    /// <inheritdoc />
    public ValidateOptionsResult Validate(string? name, RankSiloOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        List<string> failures = [];
        if (options.Rank < 0)
        {
            failures.Add(string.Create(CultureInfo.InvariantCulture, $"RankSiloOptions.Rank = {options.Rank} must not be negative"));
        }

        if (string.IsNullOrWhiteSpace(options.Group) || options.Group.Contains('/', StringComparison.Ordinal))
        {
            failures.Add($"RankSiloOptions.Group = '{options.Group}' must be a non-empty name without '/'");
        }

        if (options.Gpu is < 0)
        {
            failures.Add(string.Create(CultureInfo.InvariantCulture, $"RankSiloOptions.Gpu = {options.Gpu} must not be negative"));
        }

        if (!Enum.IsDefined(options.Backend))
        {
            failures.Add(string.Create(CultureInfo.InvariantCulture, $"RankSiloOptions.Backend = {(int)options.Backend} is not a backend: expected one of {string.Join(", ", EpBackendKinds.Names)}"));
        }

        if (options.ChunkBytes < 1024)
        {
            failures.Add(string.Create(CultureInfo.InvariantCulture, $"RankSiloOptions.ChunkBytes = {options.ChunkBytes} must be at least 1024"));
        }

        return failures.Count == 0 ? ValidateOptionsResult.Success : ValidateOptionsResult.Fail(failures);
    }
}

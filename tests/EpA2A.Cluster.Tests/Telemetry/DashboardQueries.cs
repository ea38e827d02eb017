using System.Text.Json;
using System.Text.RegularExpressions;

namespace EpA2A.Cluster.Tests.Telemetry;

/// <summary>Every PromQL expression of the Grafana dashboards, with template variables replaced as Grafana would.</summary>
public static partial class DashboardQueries
{
    /// <summary>What each template variable stands for when a query is evaluated outside Grafana.</summary>
    public static readonly IReadOnlyDictionary<string, string> Variables = new Dictionary<string, string>
    {
        ["rank"] = ".*",
        ["layer"] = ".*",
        ["__rate_interval"] = "30s",
        ["__interval"] = "15s",
        ["__range"] = "5m",
    };

    /// <summary>The dashboards shipped in dashboards/ (copied beside the tests).</summary>
    public static string[] Files() => Directory.GetFiles(Path.Combine(AppContext.BaseDirectory, "dashboards"), "*.json");

    /// <summary>(where, PromQL) for every panel target's expr and every query variable (label_values(m{sel}, l) as count by (l) (m{sel})).</summary>
    public static List<(string Where, string Query)> Read(string file)
    {
        using JsonDocument doc = JsonDocument.Parse(File.ReadAllText(file));
        List<(string, string)> found = [];
        string name = Path.GetFileName(file);
        Walk(doc.RootElement, name, found);
        if (doc.RootElement.TryGetProperty("templating", out JsonElement templating))
        {
            foreach (JsonElement variable in templating.GetProperty("list").EnumerateArray())
            {
                if (variable.GetProperty("type").GetString() != "query")
                {
                    continue;
                }

                JsonElement q = variable.GetProperty("query");
                string text = q.ValueKind == JsonValueKind.Object ? q.GetProperty("query").GetString()! : q.GetString()!;
                Match m = LabelValues().Match(text);
                if (!m.Success)
                {
                    throw new InvalidDataException($"{name}: variable {variable.GetProperty("name")} has a query this check cannot evaluate: {text}");
                }

                found.Add(($"{name} variable ${variable.GetProperty("name").GetString()}", Substitute($"count by ({m.Groups[2].Value}) ({m.Groups[1].Value})", name)));
            }
        }

        return found;
    }

    private static void Walk(JsonElement element, string where, List<(string, string)> found)
    {
        switch (element.ValueKind)
        {
            case JsonValueKind.Object:
                string here = element.TryGetProperty("title", out JsonElement title) && title.ValueKind == JsonValueKind.String ? $"{where} / {title.GetString()}" : where;
                foreach (JsonProperty property in element.EnumerateObject())
                {
                    if (property.Name == "expr" && property.Value.ValueKind == JsonValueKind.String)
                    {
                        found.Add((here, Substitute(property.Value.GetString()!, here)));
                    }
                    else
                    {
                        Walk(property.Value, here, found);
                    }
                }

                break;
            case JsonValueKind.Array:
                foreach (JsonElement item in element.EnumerateArray())
                {
                    Walk(item, where, found);
                }

                break;
            default:
                break;
        }
    }

    private static string Substitute(string query, string where) => Variable().Replace(query, m =>
    {
        string name = m.Groups[1].Success ? m.Groups[1].Value : m.Groups[2].Value;
        return Variables.TryGetValue(name, out string? value) ? value : throw new InvalidDataException($"{where}: unknown template variable ${name} in {query}");
    });

    [GeneratedRegex(@"\$\{(\w+)(?::\w+)?\}|\$(\w+)")]
    private static partial Regex Variable();

    [GeneratedRegex(@"^\s*label_values\((.+),\s*(\w+)\s*\)\s*$")]
    private static partial Regex LabelValues();
}

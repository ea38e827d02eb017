using System.Text.RegularExpressions;

namespace EpA2A.Grains;

/// <summary>
/// The one line of meaning in a failed grain call: what a step failure or a command's error says about a rank. The
/// innermost cause's message, without Orleans' wording of the message that went nowhere (its headers, routing history
/// and help link) and without any stack frame or nested exception a remote message may carry; Orleans' own failures
/// are named by kind (silo lost, call rejected, timeout).
/// </summary>
public static partial class RemoteFailure
{
    /// <summary>The cause of <paramref name="e"/> in one line: its innermost exception's, unless <paramref name="innermost"/> is off.</summary>
    /// <param name="e">A failed call's exception.</param>
    /// <param name="innermost">Whether to describe the innermost exception (a task's, through its wrappers) or <paramref name="e"/> itself.</param>
    public static string Describe(Exception e, bool innermost = true)
    {
        ArgumentNullException.ThrowIfNull(e);
        Exception cause = innermost ? e.GetBaseException() : e;
        string text = Clean(cause.Message);
        return cause switch
        {
            SiloUnavailableException => "silo lost: the silo serving the call became unavailable",
            OrleansMessageRejectionException => text.Length > 0 ? $"call rejected by the cluster (its silo is shutting down or lost): {text}" : "call rejected by the cluster (its silo is shutting down or lost)",
            TimeoutException when text.Length == 0 => "timeout: no answer in time",
            TimeoutException when !text.Contains("within", StringComparison.Ordinal) && !text.StartsWith("timeout", StringComparison.OrdinalIgnoreCase) => $"timeout: {text}",
            _ => text.Length > 0 ? text : cause.GetType().Name,
        };
    }

    /// <summary>One line of <paramref name="message"/>: no stack frames, nested exceptions, Orleans request dumps or help links.</summary>
    public static string Clean(string? message)
    {
        if (string.IsNullOrWhiteSpace(message))
        {
            return string.Empty;
        }

        IEnumerable<string> lines = message.ReplaceLineEndings("\n").Split('\n')
            .TakeWhile(l => !l.TrimStart().StartsWith("at ", StringComparison.Ordinal) && !l.Contains("--- End of", StringComparison.Ordinal))
            .Select(l => l.Trim())
            .Where(l => l.Length > 0);
        string text = string.Join(" ", lines);
        int nested = text.IndexOf(" ---> ", StringComparison.Ordinal);
        text = nested >= 0 ? text[..nested] : text;
        text = OrleansRequest().Replace(text, string.Empty);
        text = OrleansHistory().Replace(text, string.Empty);
        text = OrleansHelp().Replace(text, string.Empty);
        return Spaces().Replace(text, " ").Trim().TrimEnd(':', ' ', ';').Trim();
    }

    // "for message: Request [S127.0.0.1:1:2 grain]->[S127.0.0.1:3:4 grain] Interface.Method(args) #1A2B." (the id ends it).
    [GeneratedRegex(@"(?:\s*for message)?:?\s*Request \[[^\]]*\]->\[[^\]]*\].*?#[0-9A-Fa-f]+\.?")]
    private static partial Regex OrleansRequest();

    [GeneratedRegex(@"\s*Target History(?: is)?:.*?(?:\.(?=\s)|$)")]
    private static partial Regex OrleansHistory();

    [GeneratedRegex(@"\s*See https?://aka\.ms/\S+ for troubleshooting help\.?")]
    private static partial Regex OrleansHelp();

    [GeneratedRegex(@"\s{2,}")]
    private static partial Regex Spaces();
}

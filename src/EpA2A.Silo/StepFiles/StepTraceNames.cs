using System.Globalization;

namespace EpA2A.Silo.StepFiles;

/// <summary>
/// How `epa2a step` names tensors in its safetensors files: "rank{r}.{field}", r a decimal rank without
/// leading zeros. Inputs: tokens, expert_ids, weights, scatter_indices. Dispatch outputs: output, weights,
/// rows_per_local_expert, padded_rows_per_local_expert, expert_row_starts, scatter_indices,
/// tokens_per_source_rank. Combine outputs: combined, expert_output.
/// </summary>
internal static class StepTraceNames
{
    public const string Tokens = "tokens";
    public const string ExpertIds = "expert_ids";
    public const string Weights = "weights";
    public const string ScatterIndices = "scatter_indices";

    public const string Output = "output";
    public const string RowsPerLocalExpert = "rows_per_local_expert";
    public const string PaddedRowsPerLocalExpert = "padded_rows_per_local_expert";
    public const string ExpertRowStarts = "expert_row_starts";
    public const string TokensPerSourceRank = "tokens_per_source_rank";

    public const string Combined = "combined";
    public const string ExpertOutput = "expert_output";

    /// <summary>The metadata key that gives the number of experts (when --experts does not).</summary>
    public const string NumExpertsKey = "num_experts";

    private const string Prefix = "rank";

    /// <summary>"rank{rank}.{field}".</summary>
    public static string Of(int rank, string field) => string.Create(CultureInfo.InvariantCulture, $"{Prefix}{rank}.{field}");

    /// <summary>Splits "rank{r}.{field}"; false for any other name (leading zeros and signs included).</summary>
    public static bool TryParse(string name, out int rank, out string field)
    {
        rank = -1;
        field = string.Empty;
        if (!name.StartsWith(Prefix, StringComparison.Ordinal))
        {
            return false;
        }

        int dot = name.IndexOf('.', StringComparison.Ordinal);
        if (dot < 0)
        {
            return false;
        }

        ReadOnlySpan<char> digits = name.AsSpan(Prefix.Length, dot - Prefix.Length);
        if (digits.IsEmpty || (digits.Length > 1 && digits[0] == '0')
            || !int.TryParse(digits, NumberStyles.None, CultureInfo.InvariantCulture, out rank))
        {
            rank = -1;
            return false;
        }

        field = name[(dot + 1)..];
        return true;
    }
}

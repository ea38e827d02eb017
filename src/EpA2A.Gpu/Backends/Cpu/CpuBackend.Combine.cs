using System.Runtime.InteropServices;
using EpA2A.Config;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Transport;

namespace EpA2A.Backends.Cpu;

/// <summary>The combine half of the CPU backend.</summary>
internal sealed partial class CpuBackend
{
    /// <summary>Intra-node without local combine: the rows of source s's tokens, in (token, k) order, in the token type.</summary>
    private byte[] BuildRowsFor(CombineStep step, int source)
    {
        RowOrigins o = step.Layout.Origins;
        List<(int Key, int Row)> rows = [];
        for (int row = 0; row < o.Source.Length; row++)
        {
            if (o.Source[row] == source)
            {
                rows.Add(((o.Token[row] * config.TopK) + o.K[row], row));
            }
        }

        rows.Sort((a, b) => a.Key.CompareTo(b.Key));
        byte[] packet = new byte[8 + (rows.Count * RowBytes)];
        MessageWriter w = new(packet);
        w.WriteInt(MessageStatus.Ok);
        w.WriteInt(rows.Count);
        foreach ((_, int row) in rows)
        {
            w.WriteBytes(step.ExpertOutput.AsSpan(row * RowBytes, RowBytes));
        }

        return packet;
    }

    /// <summary>Sums the returned rows per token in k order, exactly as a plain top-k sum would.</summary>
    private void SumRowsIntra(CombineStep step, byte[][] back)
    {
        int n = step.Layout.NumDispatchTokens;
        int k = config.TopK;
        int h = config.Hidden;
        int[] ids = step.Layout.TopKIdsArray;
        int[] cursor = new int[config.WorldSize];
        int[] remaining = new int[config.WorldSize];
        for (int d = 0; d < config.WorldSize; d++)
        {
            MessageReader r = new(back[d], d);
            ThrowIfAborted(ref r, d);
            remaining[d] = r.ReadInt();
            cursor[d] = 8;
        }

        for (int t = 0; t < n; t++)
        {
            Span<float> acc = step.Accumulator.AsSpan(t * h, h);
            for (int j = 0; j < k; j++)
            {
                int e = ids[(t * k) + j];
                if (e == config.NumExperts)
                {
                    continue;
                }

                int d = config.RankOfExpert(e);
                if (remaining[d]-- <= 0 || cursor[d] + RowBytes > back[d].Length)
                {
                    throw new InvalidDataException($"rank {d} returned fewer combine rows than rank {Rank} dispatched to it");
                }

                float scale = step.Weighted ? step.SourceWeights![(t * k) + j] : 1f;
                AccumulateRow(back[d].AsSpan(cursor[d], RowBytes), acc, scale);
                cursor[d] += RowBytes;
            }
        }
    }

    /// <summary>
    /// fp32 partial sums, one per (source, token) with rows here, for the given sources: the local pre-sum.
    /// Each row of a token is a different expert's output, so every row is summed (not the first one copied).
    /// </summary>
    private byte[] BuildPartialsFor(CombineStep step, int[] sources)
    {
        RowOrigins o = step.Layout.Origins;
        int h = config.Hidden;
        HashSet<int> wanted = [.. sources];
        List<(int Source, int Token, int K, int Row)> rows = [];
        for (int row = 0; row < o.Source.Length; row++)
        {
            if (o.Source[row] >= 0 && wanted.Contains(o.Source[row]))
            {
                rows.Add((o.Source[row], o.Token[row], o.K[row], row));
            }
        }

        rows.Sort((a, b) => (a.Source, a.Token, a.K).CompareTo((b.Source, b.Token, b.K)));
        int tokens = 0;
        for (int i = 0; i < rows.Count; i++)
        {
            if (i == 0 || rows[i].Source != rows[i - 1].Source || rows[i].Token != rows[i - 1].Token)
            {
                tokens++;
            }
        }

        byte[] packet = new byte[8 + (tokens * (8 + (4 * h)))];
        MessageWriter w = new(packet);
        w.WriteInt(MessageStatus.Ok);
        w.WriteInt(tokens);
        float[] partial = new float[h];
        for (int i = 0; i < rows.Count;)
        {
            (int s, int t, _, _) = rows[i];
            Array.Clear(partial);
            for (; i < rows.Count && rows[i].Source == s && rows[i].Token == t; i++)
            {
                int row = rows[i].Row;
                float scale = step.Weighted ? step.RowWeights![row] : 1f;
                AccumulateRow(step.ExpertOutput.AsSpan(row * RowBytes, RowBytes), partial, scale);
            }

            w.WriteInt(s);
            w.WriteInt(t);
            w.WriteFloats(partial);
        }

        return packet;
    }

    private void SumPartialsIntra(CombineStep step, byte[][] back)
    {
        int h = config.Hidden;
        for (int d = 0; d < back.Length; d++)
        {
            MessageReader r = new(back[d], d);
            ThrowIfAborted(ref r, d);
            int count = r.ReadInt();
            for (int i = 0; i < count; i++)
            {
                int s = r.ReadInt();
                int t = CheckedToken(r.ReadInt(), step.Layout.NumDispatchTokens, d);
                if (s != Rank)
                {
                    throw new InvalidDataException($"rank {d} sent rank {Rank} a partial for rank {s}");
                }

                ReadOnlySpan<float> partial = MemoryMarshal.Cast<byte, float>(r.ReadBytes(4 * h));
                Span<float> acc = step.Accumulator.AsSpan(t * h, h);
                for (int x = 0; x < h; x++)
                {
                    acc[x] += partial[x];
                }
            }
        }
    }

    /// <summary>Inter-node: sums the node's partials per (source, token) and sends one fp32 row per token to each source.</summary>
    private async ValueTask ReduceNodeAndSendAsync(OperationContext op, CombineStep step, int[] node, byte[][] partials)
    {
        int h = config.Hidden;
        int[] sources = SameLocalRankPeers();
        MessageTag tag = op.Tag(ExchangePhase.CombineCrossNode);
        await ForwardAbortAsync(op, tag, sources, node, partials).ConfigureAwait(false);
        var sums = new SortedDictionary<(int Source, int Token), float[]>();
        for (int i = 0; i < node.Length; i++)
        {
            MessageReader r = new(partials[i], node[i]);
            ThrowIfAborted(ref r, node[i]);
            int count = r.ReadInt();
            for (int x = 0; x < count; x++)
            {
                int s = r.ReadInt();
                int t = r.ReadInt();
                if (Array.IndexOf(sources, s) < 0 || t < 0)
                {
                    throw new InvalidDataException($"rank {node[i]} sent gateway rank {Rank} a partial for rank {s} token {t}");
                }

                ReadOnlySpan<float> partial = MemoryMarshal.Cast<byte, float>(r.ReadBytes(4 * h));
                if (!sums.TryGetValue((s, t), out float[]? sum))
                {
                    sum = new float[h];
                    sums.Add((s, t), sum);
                }

                for (int y = 0; y < h; y++)
                {
                    sum[y] += partial[y];
                }
            }
        }

        List<Task> sends = [];
        foreach (int s in sources)
        {
            var mine = sums.Where(kv => kv.Key.Source == s).ToArray();
            byte[] packet = new byte[8 + (mine.Length * (4 + (4 * h)))];
            MessageWriter w = new(packet);
            w.WriteInt(MessageStatus.Ok);
            w.WriteInt(mine.Length);
            foreach (var kv in mine)
            {
                w.WriteInt(kv.Key.Token);
                w.WriteFloats(kv.Value);
            }

            sends.Add(transport.SendAsync(s, tag, packet, op.Token).AsTask());
        }

        await Task.WhenAll(sends).ConfigureAwait(false);
    }

    /// <summary>
    /// A rank of this node aborted its combine (it rejected its input): the sources this gateway owes partials to wait
    /// for them, not for that rank, so they get the abort from here, naming it; then this rank fails the same way.
    /// </summary>
    private async ValueTask ForwardAbortAsync(OperationContext op, MessageTag tag, int[] sources, int[] node, byte[][] partials)
    {
        for (int i = 0; i < node.Length; i++)
        {
            MessageReader r = new(partials[i], node[i]);
            if (r.ReadInt() != MessageStatus.Aborted)
            {
                continue;
            }

            int culprit = r.ReadInt();
            string reason = r.ReadString();
            Task[] sends = [.. sources.Where(s => s != Rank).Select(s => transport.SendAsync(s, tag, MessageStatus.Abort(culprit, reason), op.Token).AsTask())];
            await Task.WhenAll(sends).ConfigureAwait(false);
            MessageReader again = new(partials[i], node[i]);
            ThrowIfAborted(ref again, node[i]);
        }
    }

    private void AccumulateRow(ReadOnlySpan<byte> row, Span<float> acc, float scale)
    {
        switch (config.TokenType)
        {
            case TokenType.BFloat16:
                TokenConvert.Accumulate(MemoryMarshal.Cast<byte, BFloat16>(row), acc, scale);
                break;
            case TokenType.Float16:
                TokenConvert.Accumulate(MemoryMarshal.Cast<byte, Half>(row), acc, scale);
                break;
            default:
                TokenConvert.Accumulate(MemoryMarshal.Cast<byte, float>(row), acc, scale);
                break;
        }
    }
}

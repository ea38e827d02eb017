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
    private TransportBuffer BuildRowsFor(CombineStep step, int source)
    {
        RowOrigins o = step.Layout.Origins;
        int count = o.Source.AsSpan().Count(source);
        long[] keys = new long[count];
        int[] rows = new int[count];
        for (int row = 0, i = 0; row < o.Source.Length; row++)
        {
            if (o.Source[row] == source)
            {
                keys[i] = ((long)o.Token[row] * config.TopK) + o.K[row];
                rows[i++] = row;
            }
        }

        Array.Sort(keys, rows);
        TransportBuffer packet = TransportBuffer.Rent(8 + (count * RowBytes)); // every byte is written below
        MessageWriter w = new(packet.Span);
        w.WriteInt(MessageStatus.Ok);
        w.WriteInt(count);
        foreach (int row in rows)
        {
            w.WriteBytes(step.Host.ExpertOutput.AsSpan(row * RowBytes, RowBytes));
        }

        return packet;
    }

    /// <summary>Sums the returned rows per token in k order, exactly as a plain top-k sum would.</summary>
    private void SumRowsIntra(CombineStep step, TransportBuffer[] back)
    {
        int n = step.Layout.NumDispatchTokens;
        int k = config.TopK;
        int h = config.Hidden;
        int[] ids = step.Layout.TopKIdsArray;
        int[] cursor = new int[config.WorldSize];
        int[] remaining = new int[config.WorldSize];
        for (int d = 0; d < config.WorldSize; d++)
        {
            MessageReader r = new(back[d].Span, d);
            ThrowIfAborted(ref r, d);
            remaining[d] = r.ReadInt();
            cursor[d] = 8;
        }

        for (int t = 0; t < n; t++)
        {
            Span<float> acc = step.Accumulator.Span.Slice(t * h, h);
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
                AccumulateRow(back[d].Span.Slice(cursor[d], RowBytes), acc, scale);
                cursor[d] += RowBytes;
            }
        }
    }

    /// <summary>
    /// fp32 partial sums, one per (source, token) with rows here, for the given sources: the local pre-sum.
    /// Each row of a token is a different expert's output, so every row is summed (not the first one copied).
    /// </summary>
    private TransportBuffer BuildPartialsFor(CombineStep step, int[] sources)
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

        TransportBuffer packet = TransportBuffer.Rent(8 + (tokens * (8 + (4 * h)))); // every byte is written below
        MessageWriter w = new(packet.Span);
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
                float scale = step.Weighted ? step.Host.RowWeights[row] : 1f;
                AccumulateRow(step.Host.ExpertOutput.AsSpan(row * RowBytes, RowBytes), partial, scale);
            }

            w.WriteInt(s);
            w.WriteInt(t);
            w.WriteFloats(partial);
        }

        return packet;
    }

    private void SumPartialsIntra(CombineStep step, TransportBuffer[] back)
    {
        int h = config.Hidden;
        for (int d = 0; d < back.Length; d++)
        {
            MessageReader r = new(back[d].Span, d);
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

                TokenRows.Add(MemoryMarshal.Cast<byte, float>(r.ReadBytes(4 * h)), step.Accumulator.Span.Slice(t * h, h));
            }
        }
    }

    /// <summary>
    /// Inter-node: sums the node's partials per (source, token) and sends one fp32 row per token to each source. The
    /// sums live in one buffer (a slot per distinct token, numbered in a first pass), not an array per token.
    /// </summary>
    private async ValueTask ReduceNodeAndSendAsync(OperationContext op, CombineStep step, int[] node, TransportBuffer[] partials)
    {
        int h = config.Hidden;
        int[] sources = SameLocalRankPeers();
        MessageTag tag = op.Tag(ExchangePhase.CombineCrossNode);
        await ForwardAbortAsync(op, tag, sources, node, partials).ConfigureAwait(false);
        Dictionary<(int Source, int Token), int> slotOf = [];
        for (int i = 0; i < node.Length; i++)
        {
            MessageReader r = new(partials[i].Span, node[i]);
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

                r.ReadBytes(4 * h);
                slotOf.TryAdd((s, t), slotOf.Count);
            }
        }

        float[] sums = new float[slotOf.Count * h];
        for (int i = 0; i < node.Length; i++)
        {
            MessageReader r = new(partials[i].Span, node[i]);
            ThrowIfAborted(ref r, node[i]);
            int count = r.ReadInt();
            for (int x = 0; x < count; x++)
            {
                int slot = slotOf[(r.ReadInt(), r.ReadInt())];
                TokenRows.Add(MemoryMarshal.Cast<byte, float>(r.ReadBytes(4 * h)), sums.AsSpan(slot * h, h));
            }
        }

        // Each source's tokens in ascending order.
        (int Source, int Token, int Slot)[] order = [.. slotOf.Select(kv => (kv.Key.Source, kv.Key.Token, kv.Value))];
        Array.Sort(order);
        List<Task> sends = [];
        foreach (int s in sources)
        {
            int mine = order.Count(e => e.Source == s);
            TransportBuffer packet = TransportBuffer.Rent(8 + (mine * (4 + (4 * h)))); // every byte is written below
            MessageWriter w = new(packet.Span);
            w.WriteInt(MessageStatus.Ok);
            w.WriteInt(mine);
            foreach ((int source, int token, int slot) in order)
            {
                if (source == s)
                {
                    w.WriteInt(token);
                    w.WriteFloats(sums.AsSpan(slot * h, h));
                }
            }

            sends.Add(transport.SendAsync(s, tag, packet, op.Token).AsTask());
        }

        await Task.WhenAll(sends).ConfigureAwait(false);
    }

    /// <summary>
    /// A rank of this node aborted its combine (it rejected its input): the sources this gateway owes partials to wait
    /// for them, not for that rank, so they get the abort from here, naming it; then this rank fails the same way.
    /// </summary>
    private async ValueTask ForwardAbortAsync(OperationContext op, MessageTag tag, int[] sources, int[] node, TransportBuffer[] partials)
    {
        for (int i = 0; i < node.Length; i++)
        {
            MessageReader r = new(partials[i].Span, node[i]);
            if (r.ReadInt() != MessageStatus.Aborted)
            {
                continue;
            }

            int culprit = r.ReadInt();
            string reason = r.ReadString();
            Task[] sends = [.. sources.Where(s => s != Rank).Select(s => transport.SendAsync(s, tag, MessageStatus.Abort(culprit, reason), op.Token).AsTask())];
            await Task.WhenAll(sends).ConfigureAwait(false);
            MessageReader again = new(partials[i].Span, node[i]);
            ThrowIfAborted(ref again, node[i]);
        }
    }

    private void AccumulateRow(ReadOnlySpan<byte> row, Span<float> acc, float scale)
    {
        switch (config.TokenType)
        {
            case TokenType.BFloat16:
                TokenRows.Accumulate(MemoryMarshal.Cast<byte, BFloat16>(row), acc, scale);
                break;
            case TokenType.Float16:
                TokenRows.Accumulate(MemoryMarshal.Cast<byte, Half>(row), acc, scale);
                break;
            default:
                TokenRows.Accumulate(MemoryMarshal.Cast<byte, float>(row), acc, scale);
                break;
        }
    }
}

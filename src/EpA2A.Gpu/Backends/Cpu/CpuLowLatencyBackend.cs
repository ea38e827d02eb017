using System.Runtime.InteropServices;
using EpA2A.Config;
using EpA2A.Errors;
using EpA2A.Layer;
using EpA2A.LowLatency;
using EpA2A.Numerics;
using EpA2A.Transport;

namespace EpA2A.Backends.Cpu;

/// <summary>
/// The managed low-latency backend: the same placement and numerics as the CUDA one, over an
/// <see cref="IRankTransport"/>. Dispatch send writes one message per destination holding its per-expert counts and,
/// expert by expert, the rows of its (token, k) entries in (token, k) order, so the receiver places each source's rows
/// for an expert with one copy at the prefix of the earlier sources' counts. Combine sends each source its rows back
/// in the order it sent them; the source sums them per token in k order. All buffers are sized at creation.
/// </summary>
internal sealed class CpuLowLatencyBackend : ILowLatencyBackend
{
    private const int HeaderWords = 6;

    private readonly EpConfig config;
    private readonly IRankTransport transport;
    private readonly bool poisonReceiveBuffers;
    private readonly int hidden;
    private readonly int groups;
    private readonly int epr;
    private readonly int blockRows;
    private readonly int[] allRanks;

    private readonly BFloat16[] receivedBf16;
    private readonly byte[]? receivedFp8;
    private readonly float[]? receivedScales;
    private readonly int[] rowsPerExpert;
    private readonly BFloat16[] combineBuffer;

    // FP8 send staging, [MaxTokens, Hidden] codes and [MaxTokens, Hidden/128] scales.
    private readonly byte[]? sendCodes;
    private readonly float[]? sendScales;

    // The current step, source side: inputs, and where each (t, k) entry sits in its destination's message.
    private readonly int[] entryIndex;
    private readonly int[] destinationEntries;
    private readonly int[] perExpertCounts;

    // The current step, destination side: per source and local expert, rows received and where they start.
    private readonly int[] sourceCounts;
    private readonly int[] sourceStarts;
    private readonly float[] accumulator;

    private HostDispatchInput? input;
    private LowLatencyDispatchOptions format = LowLatencyDispatchOptions.Bf16;
    private bool weighted;

    public CpuLowLatencyBackend(EpConfig config, IRankTransport transport, bool poisonReceiveBuffers)
    {
        this.config = config;
        this.transport = transport;
        this.poisonReceiveBuffers = poisonReceiveBuffers;
        hidden = config.Hidden;
        groups = hidden / Fp8E4M3.GroupSize;
        epr = config.ExpertsPerRank;
        blockRows = config.WorldSize * config.MaxTokens;
        allRanks = [.. Enumerable.Range(0, config.WorldSize)];
        long elements = (long)epr * blockRows * hidden;
        receivedBf16 = new BFloat16[elements];
        combineBuffer = new BFloat16[elements];
        if (hidden % Fp8E4M3.GroupSize == 0)
        {
            receivedFp8 = new byte[elements];
            receivedScales = new float[(long)epr * blockRows * groups];
            sendCodes = new byte[config.MaxTokens * hidden];
            sendScales = new float[config.MaxTokens * groups];
        }

        rowsPerExpert = new int[epr];
        entryIndex = new int[config.MaxTokens * config.TopK];
        destinationEntries = new int[config.WorldSize];
        perExpertCounts = new int[config.WorldSize * epr];
        sourceCounts = new int[config.WorldSize * epr];
        sourceStarts = new int[config.WorldSize * epr];
        accumulator = new float[hidden];
    }

    public string Name => "cpu";

    public bool HasDeviceBuffers => false;

    public BFloat16[]? HostCombineBuffer => combineBuffer;

    public nint DeviceCombineBuffer => 0;

    /// <summary>
    /// <see cref="EpLowLatencyOptions.PoisonReceiveBuffers"/>, as the CUDA backend's PoisonReceiveBuffersAsync: fills the
    /// receive buffers with NaN (fp8: 0x7F, a NaN code) so that a check can tell what a step wrote from what it left.
    /// </summary>
    private void PoisonReceiveBuffers()
    {
        Array.Fill(receivedBf16, BFloat16.FromSingle(float.NaN));
        if (receivedFp8 is not null)
        {
            Array.Fill(receivedFp8, (byte)0x7F);
            Array.Fill(receivedScales!, float.NaN);
        }
    }

    private bool Fp8 => format.Format == LowLatencyFormat.Fp8;

    /// <summary>Bytes of one row on the wire: bf16, or e4m3 codes plus their scales.</summary>
    private int WireRowBytes => Fp8 ? hidden + (4 * groups) : 2 * hidden;

    public async ValueTask<long> DispatchSendAsync(LowLatencyDispatchInput dispatch, LowLatencyDispatchOptions options, OperationContext operation)
    {
        HostDispatchInput host = dispatch as HostDispatchInput
            ?? throw new NotSupportedException("the cpu backend has no device buffers");
        if (poisonReceiveBuffers)
        {
            PoisonReceiveBuffers(); // only this rank writes them (at receive), and the last step's views end here
        }

        input = host;
        format = options;
        int n = host.TokenCount;
        int k = config.TopK;
        int[] ids = host.ExpertIds;
        if (Fp8)
        {
            for (int t = 0; t < n; t++)
            {
                Fp8E4M3.QuantizeRow(
                    host.Tokens.AsSpan(t * hidden, hidden),
                    sendCodes.AsSpan(t * hidden, hidden),
                    sendScales.AsSpan(t * groups, groups),
                    options.PowerOfTwoScales);
            }
        }

        // Each entry's rank among its expert's entries, in (t, k) order; then experts laid out in order per destination.
        Array.Clear(perExpertCounts);
        for (int i = 0; i < n * k; i++)
        {
            int e = ids[i];
            entryIndex[i] = e == config.NumExperts ? -1 : perExpertCounts[e]++;
        }

        Span<int> expertStart = perExpertCounts.Length <= 1024 ? stackalloc int[perExpertCounts.Length] : new int[perExpertCounts.Length];
        for (int d = 0; d < config.WorldSize; d++)
        {
            int total = 0;
            for (int j = 0; j < epr; j++)
            {
                expertStart[(d * epr) + j] = total;
                total += perExpertCounts[(d * epr) + j];
            }

            destinationEntries[d] = total;
        }

        for (int i = 0; i < n * k; i++)
        {
            if (entryIndex[i] >= 0)
            {
                entryIndex[i] += expertStart[ids[i]];
            }
        }

        MessageTag tag = operation.Tag(ExchangePhase.LowLatencyDispatch);
        List<Task>? pending = null;
        long bytes = 0;
        int wireRow = WireRowBytes;
        for (int d = 0; d < config.WorldSize; d++)
        {
            int entries = destinationEntries[d];
            TransportBuffer message = TransportBuffer.Rent((4 * (HeaderWords + epr)) + (entries * wireRow)); // FillRows writes every row
            MessageWriter w = new(message.Span);
            w.WriteInt(MessageStatus.Ok);
            w.WriteInt((int)options.Format);
            w.WriteInt(config.MaxTokens);
            w.WriteInt(config.Hidden);
            w.WriteInt(config.NumExperts);
            w.WriteInt(config.WorldSize);
            for (int j = 0; j < epr; j++)
            {
                w.WriteInt(perExpertCounts[(d * epr) + j]);
            }

            Span<byte> rows = message.Span[w.Position..];
            FillRows(host, d, entries, rows);
            bytes += entries * wireRow;
            Post(d, tag, message, operation, ref pending);
        }

        if (pending is not null)
        {
            await Task.WhenAll(pending).ConfigureAwait(false);
        }

        return bytes;
    }

    public async ValueTask<LowLatencyReceived> DispatchReceiveAsync(LowLatencyPlace place, OperationContext operation)
    {
        RequireHost(place);
        TransportBuffer[] messages = await operation.ReceiveAllAsync(transport, allRanks, ExchangePhase.LowLatencyDispatch).ConfigureAwait(false);
        Array.Clear(rowsPerExpert);
        List<string>? mismatches = null;
        for (int s = 0; s < messages.Length; s++)
        {
            MessageReader r = new(messages[s].Span, s);
            if (r.ReadInt() != MessageStatus.Ok)
            {
                throw new InvalidDataException($"rank {s} sent a low-latency dispatch with an unknown status");
            }

            int theirFormat = r.ReadInt();
            (int MaxTokens, int Hidden, int NumExperts, int WorldSize) theirs = (r.ReadInt(), r.ReadInt(), r.ReadInt(), r.ReadInt());
            (int, int, int, int) mine = (config.MaxTokens, config.Hidden, config.NumExperts, config.WorldSize);
            if (theirs != mine)
            {
                (mismatches ??= []).Add($"rank {s} has (MaxTokens, Hidden, NumExperts, WorldSize) = {theirs}, rank {config.Rank} has {mine}");
                continue;
            }

            if (theirFormat != (int)format.Format)
            {
                (mismatches ??= []).Add($"rank {s} dispatched {(LowLatencyFormat)theirFormat}, rank {config.Rank} {format.Format}");
                continue;
            }

            int total = 0;
            for (int j = 0; j < epr; j++)
            {
                int count = r.ReadInt();
                if ((uint)count > (uint)config.MaxTokens)
                {
                    throw new InvalidDataException($"rank {s} announced {count} rows for local expert {j}, outside [0, MaxTokens = {config.MaxTokens}]");
                }

                sourceCounts[(s * epr) + j] = count;
                sourceStarts[(s * epr) + j] = rowsPerExpert[j];
                rowsPerExpert[j] += count;
                total += count;
            }

            int wireRow = WireRowBytes;
            ReadOnlySpan<byte> rows = r.ReadBytes(total * wireRow);
            if (!r.AtEnd)
            {
                throw new InvalidDataException($"rank {s}'s low-latency dispatch is longer than its {total} rows");
            }

            PlaceRows(s, total, rows);
        }

        TransportBuffer.ReleaseAll(messages); // every row is placed (a malformed message above leaves them to the GC)
        if (mismatches is not null)
        {
            throw new EpConfigMismatchException($"ranks disagree: {string.Join("; ", mismatches)}");
        }

        return Fp8
            ? new HostReceived(null, receivedFp8, receivedScales, rowsPerExpert)
            : new HostReceived(receivedBf16, null, null, rowsPerExpert);
    }

    public async ValueTask<long> CombineSendAsync(LowLatencyExpertOutput output, bool weightedSum, OperationContext operation)
    {
        ReadOnlySpan<BFloat16> rows = ExpertRows(output);
        weighted = weightedSum;
        MessageTag tag = operation.Tag(ExchangePhase.LowLatencyCombine);
        List<Task>? pending = null;
        long bytes = 0;
        int rowElements = hidden;
        for (int s = 0; s < config.WorldSize; s++)
        {
            int total = 0;
            for (int j = 0; j < epr; j++)
            {
                total += sourceCounts[(s * epr) + j];
            }

            TransportBuffer message = TransportBuffer.Rent(8 + (total * 2 * rowElements)); // every row is copied in below
            MessageWriter w = new(message.Span);
            w.WriteInt(MessageStatus.Ok);
            w.WriteInt(total);
            Span<BFloat16> to = MemoryMarshal.Cast<byte, BFloat16>(message.Span[8..]);
            int at = 0;
            for (int j = 0; j < epr; j++)
            {
                int count = sourceCounts[(s * epr) + j];
                long from = (((long)j * blockRows) + sourceStarts[(s * epr) + j]) * rowElements;
                rows.Slice((int)from, count * rowElements).CopyTo(to.Slice(at, count * rowElements));
                at += count * rowElements;
            }

            bytes += (long)total * 2 * rowElements;
            Post(s, tag, message, operation, ref pending);
        }

        if (pending is not null)
        {
            await Task.WhenAll(pending).ConfigureAwait(false);
        }

        return bytes;
    }

    public async ValueTask<LowLatencyCombined> CombineReceiveAsync(LowLatencyPlace place, OperationContext operation)
    {
        RequireHost(place);
        HostDispatchInput host = input ?? throw new InvalidOperationException("combine before dispatch");
        TransportBuffer[] messages = await operation.ReceiveAllAsync(transport, allRanks, ExchangePhase.LowLatencyCombine).ConfigureAwait(false);
        for (int d = 0; d < messages.Length; d++)
        {
            MessageReader r = new(messages[d].Span, d);
            if (r.ReadInt() != MessageStatus.Ok)
            {
                throw new InvalidDataException($"rank {d} sent a low-latency combine with an unknown status");
            }

            int total = r.ReadInt();
            if (total != destinationEntries[d] || messages[d].Length != 8 + (total * 2 * hidden))
            {
                throw new InvalidDataException($"rank {d} sent back {total} rows ({messages[d].Length} bytes); rank {config.Rank} dispatched {destinationEntries[d]} to it");
            }
        }

        int n = host.TokenCount;
        int k = config.TopK;
        BFloat16[] result = new BFloat16[n * hidden];
        Span<float> acc = accumulator;
        for (int t = 0; t < n; t++)
        {
            acc.Clear();
            for (int kk = 0; kk < k; kk++)
            {
                int i = (t * k) + kk;
                int e = host.ExpertIds[i];
                if (e == config.NumExperts)
                {
                    continue;
                }

                ReadOnlySpan<BFloat16> row = MemoryMarshal.Cast<byte, BFloat16>(messages[e / epr].Span.Slice(8 + (entryIndex[i] * 2 * hidden), 2 * hidden));
                if (weighted)
                {
                    float w = host.Weights![i];
                    for (int x = 0; x < row.Length; x++)
                    {
                        acc[x] += w * row[x].ToSingle();
                    }
                }
                else
                {
                    for (int x = 0; x < row.Length; x++)
                    {
                        acc[x] += row[x].ToSingle();
                    }
                }
            }

            Span<BFloat16> destination = result.AsSpan(t * hidden, hidden);
            for (int x = 0; x < acc.Length; x++)
            {
                destination[x] = BFloat16.FromSingle(acc[x]);
            }
        }

        TransportBuffer.ReleaseAll(messages);
        return new HostCombined(result);
    }

    public void Reset(long epoch, long sequence) => transport.DiscardBefore(epoch, sequence);

    public void Dispose()
    {
    }

    private static void RequireHost(LowLatencyPlace place)
    {
        if (place != LowLatencyPlace.Host)
        {
            throw new NotSupportedException("the cpu backend has no device buffers");
        }
    }

    /// <summary>Sends without waiting; a send that does not complete at once is awaited after every destination has its message.</summary>
    private void Post(int destination, MessageTag tag, TransportBuffer message, OperationContext operation, ref List<Task>? pending)
    {
        ValueTask send = transport.SendAsync(destination, tag, message, operation.Token);
        if (send.IsCompletedSuccessfully)
        {
            send.GetAwaiter().GetResult();
        }
        else
        {
            (pending ??= []).Add(send.AsTask());
        }
    }

    /// <summary>The rows section of the message to <paramref name="destination"/>: entry by entry at its index (bf16 rows, or codes then scales).</summary>
    private void FillRows(HostDispatchInput host, int destination, int entries, Span<byte> rows)
    {
        int k = config.TopK;
        int[] ids = host.ExpertIds;
        Span<byte> codes = rows[..(entries * (Fp8 ? hidden : 2 * hidden))];
        Span<float> scales = Fp8 ? MemoryMarshal.Cast<byte, float>(rows[(entries * hidden)..]) : [];
        ReadOnlySpan<byte> tokens = MemoryMarshal.AsBytes(host.Tokens.AsSpan());
        for (int i = 0; i < host.TokenCount * k; i++)
        {
            int e = ids[i];
            if (e == config.NumExperts || e / epr != destination)
            {
                continue;
            }

            int t = i / k;
            int at = entryIndex[i];
            if (Fp8)
            {
                sendCodes.AsSpan(t * hidden, hidden).CopyTo(codes.Slice(at * hidden, hidden));
                sendScales.AsSpan(t * groups, groups).CopyTo(scales.Slice(at * groups, groups));
            }
            else
            {
                tokens.Slice(t * 2 * hidden, 2 * hidden).CopyTo(codes.Slice(at * 2 * hidden, 2 * hidden));
            }
        }
    }

    /// <summary>Copies source <paramref name="source"/>'s rows, expert by expert, to the prefix the earlier sources left.</summary>
    private void PlaceRows(int source, int total, ReadOnlySpan<byte> rows)
    {
        int at = 0;
        for (int j = 0; j < epr; j++)
        {
            int count = sourceCounts[(source * epr) + j];
            long row = ((long)j * blockRows) + sourceStarts[(source * epr) + j];
            if (Fp8)
            {
                rows.Slice(at * hidden, count * hidden).CopyTo(receivedFp8.AsSpan((int)(row * hidden), count * hidden));
                ReadOnlySpan<byte> scaleBytes = rows.Slice((total * hidden) + (at * 4 * groups), count * 4 * groups);
                scaleBytes.CopyTo(MemoryMarshal.AsBytes(receivedScales.AsSpan((int)(row * groups), count * groups)));
            }
            else
            {
                rows.Slice(at * 2 * hidden, count * 2 * hidden).CopyTo(MemoryMarshal.AsBytes(receivedBf16.AsSpan((int)(row * hidden), count * hidden)));
            }

            at += count;
        }
    }

    private ReadOnlySpan<BFloat16> ExpertRows(LowLatencyExpertOutput output) => output switch
    {
        ZeroCopyExpertOutput => combineBuffer,
        HostExpertOutput host => MemoryMarshal.CreateReadOnlySpan(ref host.Rows.GetPinnableReference(), (int)host.Rows.FlattenedLength), // dense (the layer made sure)
        _ => throw new NotSupportedException("the cpu backend has no device buffers"),
    };
}

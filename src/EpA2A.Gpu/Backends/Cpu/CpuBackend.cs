using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using EpA2A.Config;
using EpA2A.Errors;
using EpA2A.Layer;
using EpA2A.Numerics;
using EpA2A.Transport;

namespace EpA2A.Backends.Cpu;

/// <summary>
/// The managed backend: the same flow and results as the CUDA backend, with ranks exchanging messages over
/// an <see cref="IRankTransport"/> (shared memory in one process, grain calls across silos). A token
/// crosses to a rank once however many of its experts live there; the receiver expands it into rows.
/// </summary>
internal sealed partial class CpuBackend(EpConfig config, IRankTransport transport) : IDispatchCombineBackend
{
    private const int ConfigWords = 9;
    private const int FlagWeights = 1;
    private const int FlagScatter = 2;

    public string Name => "cpu";

    private int Rank => config.Rank;

    private int RowBytes => config.Hidden * config.TokenBytes;

    public ValueTask CopyInAsync(DispatchStep step) => ValueTask.CompletedTask;

    public ValueTask CopyInAsync(CombineStep step) => ValueTask.CompletedTask;

    /// <summary>The CPU backend receives into the layer's host buffers, which the layer grows: it has none of its own.</summary>
    public ValueTask GrowOutputAsync(DispatchStep step, int rows) => ValueTask.CompletedTask;

    /// <summary>
    /// Every rank reports its output size with its counts, so every rank learns the group's smallest alike even when
    /// their sizes differ (a deadline that passed after an earlier confirmation can leave some ranks grown and others
    /// not; the next step that needs rows brings them all to one size).
    /// </summary>
    public async ValueTask<ExchangedCounts> ExchangeCountsAsync(DispatchStep step)
    {
        OperationContext op = step.Operation;
        int e = config.NumExperts;
        int[] counts = new int[e];
        foreach (int id in step.Host.ExpertIds)
        {
            if (id != e)
            {
                counts[id]++;
            }
        }

        int flags = (step.Inputs.HasWeights ? FlagWeights : 0) | (step.Inputs.HasScatterIndices ? FlagScatter : 0);
        TransportBuffer message = TransportBuffer.Rent(4 * (4 + ConfigWords + e));
        MessageWriter w = new(message.Span);
        w.WriteInt(MessageStatus.Ok);
        foreach (int word in ConfigFingerprint(config))
        {
            w.WriteInt(word);
        }

        w.WriteInt(step.TokenCount);
        w.WriteInt(flags);
        w.WriteInt(step.Context.OutputRows);
        foreach (int c in counts)
        {
            w.WriteInt(c);
        }

        // Here and below, sends go to every destination at once: a dead or slow peer delays nobody else's message.
        MessageTag tag = op.Tag(ExchangePhase.Counts);
        List<Task> sends = [];
        for (int d = 0; d < config.WorldSize; d++)
        {
            sends.Add(transport.SendAsync(d, tag, d == config.WorldSize - 1 ? message : TransportBuffer.CopyOf(message.Span), op.Token).AsTask());
        }

        await Task.WhenAll(sends).ConfigureAwait(false);

        TransportBuffer[] received = await op.ReceiveAllAsync(transport, AllRanks(), ExchangePhase.Counts).ConfigureAwait(false);
        int[] table = new int[config.WorldSize * e];
        int[] tokensPerRank = new int[config.WorldSize];
        int smallestOutput = int.MaxValue;
        int[] mine = ConfigFingerprint(config);
        List<string> problems = [];
        for (int s = 0; s < config.WorldSize; s++)
        {
            MessageReader r = new(received[s].Span, s);
            ThrowIfAborted(ref r, s);
            bool agrees = true;
            for (int i = 0; i < ConfigWords; i++)
            {
                int theirs = r.ReadInt();
                if (theirs != mine[i])
                {
                    problems.Add($"rank {s} has {FingerprintNames[i]} = {theirs}, rank {Rank} has {mine[i]}");
                    agrees = false;
                }
            }

            if (!agrees)
            {
                continue; // the rest is laid out by their config (NumExperts counts), not ours: don't read it
            }

            tokensPerRank[s] = r.ReadInt();
            int theirFlags = r.ReadInt();
            if ((theirFlags & FlagWeights) != (flags & FlagWeights))
            {
                problems.Add($"rank {s} {((theirFlags & FlagWeights) != 0 ? "gave" : "did not give")} weights, rank {Rank} {((flags & FlagWeights) != 0 ? "did" : "did not")}");
            }

            if ((theirFlags & FlagScatter) != (flags & FlagScatter))
            {
                problems.Add($"rank {s} {((theirFlags & FlagScatter) != 0 ? "gave" : "did not give")} scatter indices, rank {Rank} {((flags & FlagScatter) != 0 ? "did" : "did not")}");
            }

            int theirOutput = r.ReadInt();
            if (theirOutput < 0)
            {
                throw new InvalidDataException($"rank {s} reports {theirOutput} dispatch output rows");
            }

            smallestOutput = Math.Min(smallestOutput, theirOutput);
            for (int x = 0; x < e; x++)
            {
                table[(s * e) + x] = r.ReadInt();
            }
        }

        TransportBuffer.ReleaseAll(received); // read to the end above (an abort or a malformed message leaves them to the GC)
        if (problems.Count > 0)
        {
            throw new EpConfigMismatchException($"ranks disagree: {string.Join("; ", problems.Distinct())}");
        }

        return new ExchangedCounts(RoutingPlan.FromCounts(config, table, tokensPerRank, packed: step.Inputs.HasScatterIndices), smallestOutput);
    }

    public async ValueTask<DispatchedRows> DispatchTokensAsync(DispatchStep step, IRoutingPlan routing)
    {
        OperationContext op = step.Operation;
        RoutingPlan plan = routing as RoutingPlan ?? throw new InvalidOperationException($"rank {Rank}: the CPU backend dispatches by its own plan, not {routing.GetType().Name}");
        int n = step.TokenCount;
        int k = config.TopK;
        (int[] rows, int[] global, string? abort) = AssignRows(step, plan);

        // First hop: straight to each rank (one node), or to this rank's peer on each node (several).
        int[] firstHop = config.IsIntraNode ? AllRanks() : Gateways();
        int[] hops = abort is null ? FirstHops(step.Host.ExpertIds) : [];
        MessageTag tokensTag = op.Tag(ExchangePhase.DispatchTokens);
        List<Task> sends = [];
        for (int i = 0; i < firstHop.Length; i++)
        {
            TransportBuffer packet = abort is not null
                ? MessageStatus.Abort(Rank, abort)
                : BuildTokenPacket(step, rows, hops, i);
            sends.Add(transport.SendAsync(firstHop[i], tokensTag, packet, op.Token).AsTask());
        }

        await Task.WhenAll(sends).ConfigureAwait(false);

        TransportBuffer[] incoming;
        int[] incomingSources;
        if (config.IsIntraNode)
        {
            incomingSources = AllRanks();
            incoming = await op.ReceiveAllAsync(transport, incomingSources, ExchangePhase.DispatchTokens).ConfigureAwait(false);
        }
        else
        {
            // This rank is the gateway of its node for every source with the same local rank: forward.
            int[] sources = SameLocalRankPeers();
            TransportBuffer[] toForward = await op.ReceiveAllAsync(transport, sources, ExchangePhase.DispatchTokens).ConfigureAwait(false);
            await ForwardInsideNodeAsync(op, sources, toForward).ConfigureAwait(false);
            TransportBuffer.ReleaseAll(toForward);
            incomingSources = NodeRanks();
            incoming = await op.ReceiveAllAsync(transport, incomingSources, ExchangePhase.DispatchForward).ConfigureAwait(false);
        }

        if (abort is not null)
        {
            throw new ArgumentException(abort);
        }

        RowOrigins origins = ReceiveRows(step, plan, incomingSources, incoming);
        TransportBuffer.ReleaseAll(incoming); // every row is in the layer's output now
        return new DispatchedRows(global, origins);
    }

    public async ValueTask<CombinedRows> CombineWithinNodeAsync(CombineStep step)
    {
        OperationContext op = step.Operation;
        if (config.IsIntraNode)
        {
            MessageTag tag = op.Tag(ExchangePhase.CombineRows);
            List<Task> rowSends = [];
            for (int s = 0; s < config.WorldSize; s++)
            {
                TransportBuffer packet = config.EnableLocalCombine ? BuildPartialsFor(step, [s]) : BuildRowsFor(step, s);
                rowSends.Add(transport.SendAsync(s, tag, packet, op.Token).AsTask());
            }

            await Task.WhenAll(rowSends).ConfigureAwait(false);

            TransportBuffer[] back = await op.ReceiveAllAsync(transport, AllRanks(), ExchangePhase.CombineRows).ConfigureAwait(false);
            if (config.EnableLocalCombine)
            {
                SumPartialsIntra(step, back);
            }
            else
            {
                SumRowsIntra(step, back);
            }

            TransportBuffer.ReleaseAll(back);

            return new CombinedRows.HostSums(step.Accumulator);
        }

        // Inter-node: partials of each source's tokens go to the rank of this node that shares the source's
        // local rank; it reduces them across the node and sends one fp32 row per token across nodes.
        MessageTag rowsTag = op.Tag(ExchangePhase.CombineRows);
        int[] node = NodeRanks();
        List<Task> sends = [];
        for (int l = 0; l < config.LocalWorldSize; l++)
        {
            int[] sources = [.. Enumerable.Range(0, config.NumNodes).Select(b => (b * config.LocalWorldSize) + l)];
            sends.Add(transport.SendAsync(node[l], rowsTag, BuildPartialsFor(step, sources), op.Token).AsTask());
        }

        await Task.WhenAll(sends).ConfigureAwait(false);

        TransportBuffer[] partials = await op.ReceiveAllAsync(transport, node, ExchangePhase.CombineRows).ConfigureAwait(false);
        await ReduceNodeAndSendAsync(op, step, node, partials).ConfigureAwait(false);
        TransportBuffer.ReleaseAll(partials);
        return new CombinedRows.HostSums(step.Accumulator); // this rank's own sums arrive across nodes
    }

    public async ValueTask<CombinedRows> CombineAcrossNodesAsync(CombineStep step, CombinedRows withinNode)
    {
        if (config.IsIntraNode)
        {
            return withinNode;
        }

        OperationContext op = step.Operation;
        int[] gateways = Gateways();
        TransportBuffer[] fromNodes = await op.ReceiveAllAsync(transport, gateways, ExchangePhase.CombineCrossNode).ConfigureAwait(false);
        int h = config.Hidden;
        for (int b = 0; b < gateways.Length; b++)
        {
            MessageReader r = new(fromNodes[b].Span, gateways[b]);
            ThrowIfAborted(ref r, gateways[b]);
            int count = r.ReadInt();
            for (int i = 0; i < count; i++)
            {
                int t = CheckedToken(r.ReadInt(), step.Layout.NumDispatchTokens, gateways[b]);
                TokenRows.Add(MemoryMarshal.Cast<byte, float>(r.ReadBytes(h * 4)), step.Accumulator.Span.Slice(t * h, h));
            }
        }

        TransportBuffer.ReleaseAll(fromNodes);
        return withinNode;
    }

    public ValueTask BarrierAsync(OperationContext operation, bool intraNodeOnly) =>
        AllArriveAsync(operation, intraNodeOnly ? NodeRanks() : AllRanks(), ExchangePhase.Barrier);

    public void Reset(long epoch, long sequence) => transport.DiscardBefore(epoch, sequence);

    /// <summary>
    /// An abort naming this rank, sent where the peers first wait for this rank in the operation: the counts of a
    /// dispatch (every rank waits for every rank's), the rows of a combine (its node, or every rank on one node) and,
    /// inter-node, the cross-node partials this rank owes the ranks it is the gateway for (the rest of the node
    /// forwards the abort, see <see cref="ReduceNodeAndSendAsync"/>).
    /// </summary>
    public async ValueTask RejectAsync(OperationContext operation, bool dispatch, string reason)
    {
        List<(int Rank, ExchangePhase Phase)> targets = [];
        if (dispatch)
        {
            targets.AddRange(AllRanks().Select(d => (d, ExchangePhase.Counts)));
        }
        else if (config.IsIntraNode)
        {
            targets.AddRange(AllRanks().Select(d => (d, ExchangePhase.CombineRows)));
        }
        else
        {
            targets.AddRange(NodeRanks().Select(d => (d, ExchangePhase.CombineRows)));
            targets.AddRange(Gateways().Select(d => (d, ExchangePhase.CombineCrossNode)));
        }

        Task[] sends = [.. targets.Where(t => t.Rank != Rank).Select(t => transport.SendAsync(t.Rank, operation.Tag(t.Phase), MessageStatus.Abort(Rank, reason), operation.Token).AsTask())];
        await Task.WhenAll(sends).ConfigureAwait(false);
    }

    public void Dispose()
    {
    }

    internal static int[] ConfigFingerprint(EpConfig c) =>
        [c.MaxTokens, c.Hidden, c.TopK, c.NumExperts, c.WorldSize, c.LocalWorldSize, (int)c.TokenType, c.EnableLocalCombine ? 1 : 0, c.ExpertAlignment];

    private static readonly string[] FingerprintNames =
        ["MaxTokens", "Hidden", "TopK", "NumExperts", "WorldSize", "LocalWorldSize", "TokenType", "EnableLocalCombine", "ExpertAlignment"];

    private static void ThrowIfAborted(ref MessageReader reader, int source)
    {
        int status = reader.ReadInt();
        if (status == MessageStatus.Aborted)
        {
            int culprit = reader.ReadInt();
            string reason = reader.ReadString();
            string via = culprit == source ? string.Empty : $" (forwarded by rank {source})";
            throw new EpStepAbortedException($"rank {culprit} aborted the operation{via}: {reason}", culprit);
        }

        if (status != MessageStatus.Ok)
        {
            throw new InvalidDataException($"message from rank {source} has unknown status {status}");
        }
    }

    /// <summary>Sends an empty ok message of <paramref name="phase"/> to every peer and waits for theirs.</summary>
    private async ValueTask AllArriveAsync(OperationContext operation, int[] peers, ExchangePhase phase)
    {
        MessageTag tag = operation.Tag(phase);
        List<Task> sends = [];
        foreach (int p in peers)
        {
            sends.Add(transport.SendAsync(p, tag, MessageStatus.Empty(), operation.Token).AsTask());
        }

        await Task.WhenAll(sends).ConfigureAwait(false);

        TransportBuffer[] arrived = await operation.ReceiveAllAsync(transport, peers, phase).ConfigureAwait(false);
        for (int i = 0; i < peers.Length; i++)
        {
            MessageReader r = new(arrived[i].Span, peers[i]);
            ThrowIfAborted(ref r, peers[i]);
        }

        TransportBuffer.ReleaseAll(arrived);
    }

    private static int CheckedToken(int token, int count, int source) =>
        (uint)token < (uint)count ? token : throw new InvalidDataException($"rank {source} sent token index {token}, this rank dispatched {count}");

    private int[] AllRanks() => [.. Enumerable.Range(0, config.WorldSize)];

    private int[] NodeRanks() => [.. Enumerable.Range(config.Node * config.LocalWorldSize, config.LocalWorldSize)];

    /// <summary>The rank with this rank's local index on each node, in node order (itself on its own node).</summary>
    private int[] Gateways() => [.. Enumerable.Range(0, config.NumNodes).Select(b => (b * config.LocalWorldSize) + config.LocalRank)];

    private int[] SameLocalRankPeers() => Gateways();

    /// <summary>The first-hop target of every (token, k) slot: a rank, or a node for the inter-node algorithm; -1 dropped.</summary>
    private int[] FirstHops(int[] ids)
    {
        int[] hops = new int[ids.Length];
        for (int i = 0; i < ids.Length; i++)
        {
            int e = ids[i];
            int d = e == config.NumExperts ? -1 : config.RankOfExpert(e);
            hops[i] = d < 0 || config.IsIntraNode ? d : d / config.LocalWorldSize;
        }

        return hops;
    }

    /// <summary>Destination row (inside the destination's output) and global row of every (token, k).</summary>
    private (int[] Rows, int[] Global, string? Abort) AssignRows(DispatchStep step, RoutingPlan plan)
    {
        int k = config.TopK;
        int[] ids = step.Host.ExpertIds;
        int[] rows = new int[ids.Length];
        int[] global = new int[ids.Length];
        int[] next = new int[config.NumExperts];
        int[] bases = [.. Enumerable.Range(0, config.WorldSize).Select(plan.GlobalBase)];
        for (int i = 0; i < ids.Length; i++)
        {
            int e = ids[i];
            if (e == config.NumExperts)
            {
                rows[i] = -1;
                global[i] = -1;
                continue;
            }

            int d = config.RankOfExpert(e);
            if (step.Host.ScatterIndices is { } scatter)
            {
                int row = scatter[i] - bases[d];
                if (row < 0 || row >= plan.RecvRows(d))
                {
                    return (rows, global, $"scatterIndices[{i / k}, {i % k}] = {scatter[i]} is outside rank {d}'s rows [{bases[d]}, {bases[d] + plan.RecvRows(d)}) for expert {e}");
                }

                rows[i] = row;
            }
            else
            {
                rows[i] = plan.BlockStart(e, Rank) + next[e]++;
            }

            global[i] = bases[d] + rows[i];
        }

        return (rows, global, null);
    }

    /// <summary>
    /// A token packet for first-hop <paramref name="target"/>: per token with slots there, its slots (k, expert, row,
    /// weight) and its row once. Sized in a first pass, written in a second: no allocation per token.
    /// </summary>
    private TransportBuffer BuildTokenPacket(DispatchStep step, int[] rows, int[] hops, int target)
    {
        int k = config.TopK;
        int entries = 0;
        int slots = 0;
        for (int t = 0; t < step.TokenCount; t++)
        {
            int here = hops.AsSpan(t * k, k).Count(target);
            entries += here > 0 ? 1 : 0;
            slots += here;
        }

        TransportBuffer packet = TransportBuffer.Rent(8 + (entries * (12 + RowBytes)) + (16 * slots)); // sized exactly, every byte written below
        MessageWriter w = new(packet.Span);
        w.WriteInt(MessageStatus.Ok);
        w.WriteInt(entries);
        ReadOnlySpan<byte> tokens = step.Host.Tokens.Span;
        for (int t = 0; t < step.TokenCount; t++)
        {
            ReadOnlySpan<int> tokenHops = hops.AsSpan(t * k, k);
            int here = tokenHops.Count(target);
            if (here == 0)
            {
                continue;
            }

            w.WriteInt(Rank);
            w.WriteInt(t);
            w.WriteInt(here);
            for (int j = 0; j < k; j++)
            {
                if (tokenHops[j] == target)
                {
                    int i = (t * k) + j;
                    w.WriteInt(j);
                    w.WriteInt(step.Host.ExpertIds[i]);
                    w.WriteInt(rows[i]);
                    w.WriteFloat(step.Host.Weights?[i] ?? 0f);
                }
            }

            w.WriteBytes(tokens.Slice(t * RowBytes, RowBytes));
        }

        return packet;
    }

    /// <summary>
    /// The gateway's second hop: each received token goes on to the ranks of this node that hold some of its experts,
    /// with only their slots. Two passes over the received packets (sizes, then bytes), no allocation per token.
    /// </summary>
    private async ValueTask ForwardInsideNodeAsync(OperationContext op, int[] sources, TransportBuffer[] packets)
    {
        int[] node = NodeRanks();
        MessageTag tag = op.Tag(ExchangePhase.DispatchForward);
        (int culprit, string? abort) = (-1, null);
        int[] entries = new int[node.Length];
        int[] slots = new int[node.Length];
        for (int i = 0; i < sources.Length && abort is null; i++)
        {
            (culprit, abort) = ForwardPass(packets[i].Span, sources[i], node[0], entries, slots, null);
        }

        List<Task> sends = [];
        TransportBuffer[] forwarded = new TransportBuffer[node.Length];
        for (int l = 0; l < node.Length; l++)
        {
            // Sized exactly: the second pass below writes every byte.
            forwarded[l] = abort is not null ? MessageStatus.Abort(culprit, abort) : TransportBuffer.Rent(8 + (entries[l] * (12 + RowBytes)) + (16 * slots[l]));
        }

        if (abort is null)
        {
            int[] positions = new int[node.Length];
            for (int l = 0; l < node.Length; l++)
            {
                MessageWriter w = new(forwarded[l].Span);
                w.WriteInt(MessageStatus.Ok);
                w.WriteInt(entries[l]);
                positions[l] = w.Position;
            }

            for (int i = 0; i < sources.Length; i++)
            {
                ForwardPass(packets[i].Span, sources[i], node[0], null, null, (forwarded, positions));
            }
        }

        for (int l = 0; l < node.Length; l++)
        {
            sends.Add(transport.SendAsync(node[l], tag, forwarded[l], op.Token).AsTask());
        }

        await Task.WhenAll(sends).ConfigureAwait(false);
    }

    /// <summary>
    /// One pass over a packet a gateway received: counts the entries and slots for each rank of the node, or (with
    /// <paramref name="write"/>) writes them at each rank's position. Returns the abort the packet carries, if any.
    /// </summary>
    private (int Culprit, string? Abort) ForwardPass(ReadOnlySpan<byte> packet, int source, int firstOfNode, int[]? entries, int[]? slots, (TransportBuffer[] Packets, int[] Positions)? write)
    {
        MessageReader r = new(packet, source);
        if (r.ReadInt() == MessageStatus.Aborted)
        {
            int culprit = r.ReadInt();
            return (culprit, r.ReadString());
        }

        int local = config.LocalWorldSize;
        Span<int> rankOfSlot = stackalloc int[config.TopK];
        Span<int> slotsFor = stackalloc int[local];
        int count = r.ReadInt();
        for (int x = 0; x < count; x++)
        {
            int src = r.ReadInt();
            int t = r.ReadInt();
            int nk = r.ReadInt();
            if (nk < 0 || nk > config.TopK)
            {
                throw new InvalidDataException($"rank {source} sent a malformed token entry (source {src}, {nk} slots)");
            }

            MessageReader slotReader = r;
            slotsFor.Clear();
            for (int j = 0; j < nk; j++)
            {
                r.ReadInt();
                int l = CheckedRankOfExpert(r.ReadInt(), source) - firstOfNode;
                r.ReadInt();
                r.ReadFloat();
                rankOfSlot[j] = l;
                if ((uint)l < (uint)local)
                {
                    slotsFor[l]++; // a slot for a rank of another node is not this gateway's to forward
                }
            }

            ReadOnlySpan<byte> data = r.ReadBytes(RowBytes);
            for (int l = 0; l < local; l++)
            {
                if (slotsFor[l] == 0)
                {
                    continue;
                }

                if (write is not { } target)
                {
                    entries![l]++;
                    slots![l] += slotsFor[l];
                    continue;
                }

                MessageWriter w = new(target.Packets[l].Span, target.Positions[l]);
                w.WriteInt(src);
                w.WriteInt(t);
                w.WriteInt(slotsFor[l]);
                MessageReader again = slotReader;
                for (int j = 0; j < nk; j++)
                {
                    (int kk, int expert, int row, float weight) = (again.ReadInt(), again.ReadInt(), again.ReadInt(), again.ReadFloat());
                    if (rankOfSlot[j] == l)
                    {
                        w.WriteInt(kk);
                        w.WriteInt(expert);
                        w.WriteInt(row);
                        w.WriteFloat(weight);
                    }
                }

                w.WriteBytes(data);
                target.Positions[l] = w.Position;
            }
        }

        return (-1, null);
    }

    private int CheckedRankOfExpert(int expert, int source) =>
        (uint)expert < (uint)config.NumExperts
            ? config.RankOfExpert(expert)
            : throw new InvalidDataException($"rank {source} sent expert id {expert}, outside [0, {config.NumExperts})");

    /// <summary>Writes received tokens into their rows, zero-fills padding, and records where every row came from.</summary>
    private RowOrigins ReceiveRows(DispatchStep step, RoutingPlan plan, int[] sources, TransportBuffer[] packets)
    {
        int recv = plan.RecvRows(Rank);
        DispatchCombineContext ctx = step.Context;
        Span<byte> output = OutputBytes(ctx);
        float[] weights = ctx.WeightBuffer;
        RowOrigins origins = new(recv);
        int written = 0;
        int firstExpert = Rank * config.ExpertsPerRank;
        int[] rowsOfEntry = new int[config.TopK];
        for (int i = 0; i < sources.Length; i++)
        {
            MessageReader r = new(packets[i].Span, sources[i]);
            ThrowIfAborted(ref r, sources[i]);
            int count = r.ReadInt();
            for (int x = 0; x < count; x++)
            {
                int src = r.ReadInt();
                int t = r.ReadInt();
                int nk = r.ReadInt();
                if ((uint)src >= (uint)config.WorldSize || nk < 1 || nk > config.TopK)
                {
                    throw new InvalidDataException($"rank {sources[i]} sent a malformed token entry (source {src}, {nk} slots)");
                }

                for (int j = 0; j < nk; j++)
                {
                    int kk = r.ReadInt();
                    int expert = r.ReadInt();
                    int row = r.ReadInt();
                    float weight = r.ReadFloat();
                    if (expert < firstExpert || expert >= firstExpert + config.ExpertsPerRank)
                    {
                        throw new InvalidDataException($"rank {src} sent a row for expert {expert}, which rank {Rank} does not hold");
                    }

                    if ((uint)row >= (uint)recv)
                    {
                        throw new EpStepFailedException($"rank {src} token {t} slot {kk} targets row {row} of rank {Rank}, which receives {recv} rows", src);
                    }

                    if (origins.Source[row] >= 0)
                    {
                        throw new EpStepFailedException(
                            $"row {row} of rank {Rank} is claimed twice: by rank {origins.Source[row]} token {origins.Token[row]} slot {origins.K[row]} and by rank {src} token {t} slot {kk} (duplicate scatter indices)",
                            src);
                    }

                    origins.Source[row] = src;
                    origins.Token[row] = t;
                    origins.K[row] = kk;
                    weights[row] = weight;
                    rowsOfEntry[j] = row;
                }

                ReadOnlySpan<byte> data = r.ReadBytes(RowBytes);
                foreach (int row in rowsOfEntry.AsSpan(0, nk))
                {
                    data.CopyTo(output.Slice(row * RowBytes, RowBytes));
                }

                written += nk;
            }
        }

        int expected = 0;
        for (int j = 0; j < config.ExpertsPerRank; j++)
        {
            expected += plan.ExpertRows(Rank, j);
        }

        if (written != expected)
        {
            throw new EpStepFailedException($"rank {Rank} received {written} rows, the counts announced {expected}");
        }

        // Padding rows (alignment) are zero with weight zero; origins stay -1 so combine ignores them.
        for (int row = 0; row < recv; row++)
        {
            if (origins.Source[row] < 0)
            {
                output.Slice(row * RowBytes, RowBytes).Clear();
                weights[row] = 0f;
            }
        }

        return origins;
    }

    private static Span<byte> OutputBytes(DispatchCombineContext ctx)
    {
        Array buffer = ctx.OutputBuffer;
        int bytes = checked(buffer.Length * ctx.Config.TokenBytes);
        return MemoryMarshal.CreateSpan(ref MemoryMarshal.GetArrayDataReference(buffer), bytes);
    }
}

using System.Collections.Concurrent;
using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using EpA2A.Config;
using Orleans.Concurrency;

namespace EpA2A.Grains;

/// <summary>One rank's inputs to a step through the grains (flat, row-major).</summary>
/// <typeparam name="T">The token element type.</typeparam>
/// <param name="Tokens">[Count, Hidden].</param>
/// <param name="Count">Tokens this rank dispatches.</param>
/// <param name="ExpertIds">[Count, TopK].</param>
/// <param name="Weights">[Count, TopK] or null.</param>
/// <param name="ScatterIndices">[Count, TopK] or null.</param>
public sealed record RankStepInput<T>(T[] Tokens, int Count, int[] ExpertIds, float[]? Weights = null, int[]? ScatterIndices = null)
    where T : unmanaged;

/// <summary>What a step through the grains returned: each rank's combined output, and how it went.</summary>
/// <typeparam name="T">The token element type.</typeparam>
/// <param name="Outputs">[Count, Hidden] per rank of the group; empty for a rank the step masked (see <see cref="StepReport.MaskedRanks"/>).</param>
/// <param name="Report">Per-rank phase times and receive sizes.</param>
public sealed record StepOutcome<T>(T[][] Outputs, StepReport Report)
    where T : unmanaged;

/// <summary>
/// Runs steps of one layer through the grains from a cluster client (or a silo): stages each rank's inputs
/// on its rank grain in chunks below the message size limit, has the coordinator run the step, and reads
/// each rank's combined output back the same way.
/// </summary>
public sealed class ExpertLayerClient
{
    private readonly IGrainFactory grains;
    private readonly ConcurrentDictionary<int, IRankStaging> staging = new();
    private readonly int chunkBytes;
    private static readonly TimeSpan DefaultCallBound = TimeSpan.FromSeconds(30);

    /// <summary>How often a step in flight probes its coordinator (and how long after the step is handed over the first probe goes).</summary>
    internal static readonly TimeSpan ProbeEvery = TimeSpan.FromMilliseconds(250);

    /// <summary>How long a probe of the coordinator may take before it counts as missed.</summary>
    internal static readonly TimeSpan ProbeTimeout = TimeSpan.FromSeconds(1);

    /// <summary>Probes in a row with no answer that lose the coordinator (see <see cref="ProbeCoordinatorAsync"/>).</summary>
    internal const int ProbeTimeoutsLost = 3;

    /// <summary>Marks (in <see cref="Exception.Data"/>) a step failure that the coordinator's probe raised.</summary>
    private const string LostByProbe = "epa2a.coordinator-lost-by-probe";
    private static int clients;
    private LayerSpec? configured;
    private CoordinatorPlace coordinatorSilo = CoordinatorPlace.Unknown;
    private int busy;

    /// <summary>Creates a client for layer <paramref name="layer"/> of group <paramref name="group"/>.</summary>
    /// <param name="grains">The cluster client (or a silo's grain factory).</param>
    /// <param name="group">The group.</param>
    /// <param name="layer">The layer.</param>
    /// <param name="chunkBytes">Largest chunk of a staged input or a read output.</param>
    /// <param name="clientName">How other clients' errors name this one (default: host, process id and a serial number).</param>
    public ExpertLayerClient(IGrainFactory grains, string group, string layer, int chunkBytes = 1 << 20, string? clientName = null)
    {
        ArgumentNullException.ThrowIfNull(grains);
        ArgumentOutOfRangeException.ThrowIfLessThan(chunkBytes, 1024);
        this.grains = grains;
        this.chunkBytes = chunkBytes;
        Group = group;
        Layer = layer;
        Coordinator = grains.GetGrain<IExpertLayerGrain>(GrainKeys.Layer(group, layer));
        Name = string.IsNullOrWhiteSpace(clientName)
            ? $"client {Interlocked.Increment(ref clients)} of process {Environment.ProcessId} on {Environment.MachineName}"
            : clientName;
    }

    /// <summary>How the coordinator names this client to others (who configured a layer, who is stepping it).</summary>
    public string Name { get; }

    /// <summary>
    /// The spec this client's steps run under: the one it configured, or the layer's spec when its first step adopted
    /// it. A step under any other spec is refused by the coordinator (<see cref="LayerSpecConflictException"/>).
    /// </summary>
    public LayerSpec? Spec => configured;

    /// <summary>The group.</summary>
    public string Group { get; }

    /// <summary>The layer.</summary>
    public string Layer { get; }

    /// <summary>The layer's coordinator.</summary>
    public IExpertLayerGrain Coordinator { get; }

    /// <summary>
    /// Forms the group and configures every rank; from now on this client steps only under <paramref name="spec"/>.
    /// Re-configuring a layer that another client is stepping is refused (<see cref="LayerSpecConflictException"/>)
    /// unless <paramref name="takeOver"/> is set.
    /// </summary>
    public async Task ConfigureAsync(LayerSpec spec, bool takeOver = false)
    {
        ArgumentNullException.ThrowIfNull(spec);
        await Coordinator.ConfigureAsync(spec.Validated(), Name, takeOver).ConfigureAwait(false);
        configured = spec;
        await LocateCoordinatorAsync().ConfigureAwait(false);
    }

    /// <summary>
    /// One step: dispatch, experts, combine on every rank. Inputs are checked here against the layer's
    /// configuration before anything is sent; the ranks check the rest before anything moves between them.
    /// Steps of one layer do not overlap: a second step on this client while one is in flight is an
    /// <see cref="InvalidOperationException"/>, and so is a step while another caller's step is in progress.
    /// </summary>
    public async Task<StepOutcome<T>> StepAsync<T>(IReadOnlyList<RankStepInput<T>> inputs, bool weighted = false, CancellationToken cancellationToken = default)
        where T : unmanaged
    {
        ArgumentNullException.ThrowIfNull(inputs);
        if (Interlocked.CompareExchange(ref busy, 1, 0) != 0)
        {
            throw new InvalidOperationException($"a step of layer '{Layer}' is already in flight on this client; steps of one layer must not overlap");
        }

        try
        {
            return await StepCoreAsync(inputs, weighted, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            Volatile.Write(ref busy, 0);
        }
    }

    private async Task<StepOutcome<T>> StepCoreAsync<T>(IReadOnlyList<RankStepInput<T>> inputs, bool weighted, CancellationToken cancellationToken)
        where T : unmanaged
    {
        // Every call below has a deadline: a grain on a dead silo would otherwise hold the caller until
        // Orleans' response timeout, and a client must never wait longer than the step's own bound.
        TimeSpan callBound = (configured?.StepTimeout ?? DefaultCallBound) + TimeSpan.FromSeconds(1);
        // The read may go out through a gateway whose silo was just cut off: it is asked again until the client has
        // dropped that gateway (declared dead in about 3 s), so it gets twice the call bound.
        LayerSpec? spec = await CoordinatorReadAsync(Coordinator.GetSpecAsync, "GetSpecAsync", callBound * 2, cancellationToken).ConfigureAwait(false);
        if (spec is null && configured is not null)
        {
            // The coordinator's silo (or the silo holding its directory entry) went away and it was activated anew
            // without its state: give it back what this client set up. Beginning the step forms the group, so a masking
            // layer masks a rank lost with that silo in this step. Where the coordinator now runs is looked up beside
            // the step: describing the group waits on every rank, a stalled one included.
            await CoordinatorCallAsync(Coordinator.RestoreAsync(configured, Name), "RestoreAsync", callBound, cancellationToken).ConfigureAwait(false);
            spec = configured;
            _ = LocateCoordinatorAsync();
        }

        if (spec is null)
        {
            throw new InvalidOperationException($"layer '{Layer}' of group '{Group}' is not configured: call ConfigureAsync first");
        }

        // A client that did not configure the layer adopts the spec it first sees, and keeps it: a later
        // re-configuration by anyone else fails this client's steps by name instead of changing what they mean.
        configured ??= spec;
        spec = configured;
        CheckInputs(spec, inputs);
        callBound = spec.StepTimeout + TimeSpan.FromSeconds(1);

        // Beginning a step may re-form the group (a bounded wait for every rank inside the coordinator).
        StepTicket ticket = await CoordinatorCallAsync(Coordinator.BeginStepAsync(spec, Name), "BeginStepAsync", callBound * 2, cancellationToken).ConfigureAwait(false);
        // A masking layer serving without some ranks: their inputs are not sent (their silos may be gone). A rank call with
        // no answer is asked again (RankCallAsync) until the step gives up on it.
        using CancellationTokenSource asking = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        Task[] staging = [.. inputs.Select((input, r) => ticket.Runs(r) ? StageAsync(r, ticket, input, callBound, asking.Token) : Task.CompletedTask)];
        try
        {
            await Task.WhenAll(staging).WaitAsync(callBound, cancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is not OperationCanceledException || !cancellationToken.IsCancellationRequested)
        {
            // A rank that cannot take its input in time (its silo is gone, or restarted without the layer)
            // fails the step; the coordinator re-forms the group before the next one.
            int[] failed = [.. staging.Select((t, r) => (t, r)).Where(x => !x.t.IsCompletedSuccessfully).Select(x => x.r)];
            string why = string.Join("; ", failed.Select(r => $"rank {r}: {(Refused(staging[r]) ? RemoteFailure.Describe(staging[r].Exception!) : $"no answer within {callBound.TotalSeconds:0.#} s")}"));
            string message = $"step {ticket.Step} of layer '{Layer}': staging the input failed on {why}";
            await asking.CancelAsync().ConfigureAwait(false);

            // Ranks that gave no answer at all (as opposed to refusing the input) are reported as unreachable: a masking
            // layer masks them when the step is given up.
            int[] unreachable = [.. failed.Where(r => !staging[r].IsCompleted || staging[r].Exception?.GetBaseException() is TimeoutException or OrleansException or NoSiloForRankException)];
            await ThrowIfReconfiguredAsync(spec, ticket, callBound, cancellationToken).ConfigureAwait(false);
            try
            {
                await Coordinator.AbandonStepAsync(ticket, message, unreachable).WaitAsync(callBound * 2, cancellationToken).ConfigureAwait(false);
            }
            catch (Exception abandon) when (abandon is TimeoutException or OrleansException)
            {
                // The coordinator is unreachable too; it re-forms the group when it is next activated.
            }

            throw new GroupStepFailedException(message, ticket.Step, failed);
        }

        // The coordinator bounds the step itself (twice the step deadline plus a second); this is its backstop.
        StepReport report;
        try
        {
            report = await RunOnCoordinatorAsync(ticket, weighted, (spec.StepTimeout * 2) + TimeSpan.FromSeconds(5), cancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when ((e is GroupStepFailedException or InvalidOperationException) && !e.Data.Contains(LostByProbe))
        {
            // (A coordinator its probe lost cannot be asked what it now has: that would wait for its silo to be declared dead.)
            await ThrowIfReconfiguredAsync(spec, ticket, callBound, cancellationToken).ConfigureAwait(false);
            throw;
        }

        // One output per rank of the group; a masked rank's is empty (its tokens were not served).
        Task<T[]>[] reads = [.. Enumerable.Range(0, spec.WorldSize).Select(r => report.Ranks.FirstOrDefault(x => x.Rank == r) is { } ran ? ReadAsync<T>(r, ticket.Step, ran.OutputBytes, callBound, asking.Token) : Task.FromResult(Array.Empty<T>()))];
        try
        {
            return new StepOutcome<T>(await Task.WhenAll(reads).WaitAsync(callBound, cancellationToken).ConfigureAwait(false), report);
        }
        catch (Exception e) when (e is not OperationCanceledException || !cancellationToken.IsCancellationRequested)
        {
            // The step ran, but a rank's silo went away before its output was read, or a client took the layer over.
            int[] failed = [.. reads.Select((t, r) => (t, r)).Where(x => !x.t.IsCompletedSuccessfully).Select(x => x.r)];
            string why = string.Join("; ", failed.Select(r => $"rank {r}: {(Refused(reads[r]) ? RemoteFailure.Describe(reads[r].Exception!) : $"no answer within {callBound.TotalSeconds:0.#} s")}"));
            await asking.CancelAsync().ConfigureAwait(false);
            await ThrowIfReconfiguredAsync(spec, ticket, callBound, cancellationToken).ConfigureAwait(false);
            throw new GroupStepFailedException($"step {ticket.Step} of layer '{Layer}': reading the combined output failed on {why}", ticket.Step, failed);
        }
    }

    /// <summary>
    /// A call to the coordinator with a deadline. When the coordinator cannot be reached or does not answer, the
    /// error names the silo it was last seen on and the ranks that silo serves (that silo going away is the usual
    /// cause); the next step activates a new coordinator and configures it again.
    /// </summary>
    private async Task CoordinatorCallAsync(Task call, string what, TimeSpan bound, CancellationToken cancellationToken)
    {
        try
        {
            await call.WaitAsync(bound, cancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is TimeoutException or OrleansException)
        {
            throw CoordinatorFailed(e, what, bound);
        }
    }

    /// <inheritdoc cref="CoordinatorCallAsync(Task, string, TimeSpan, CancellationToken)"/>
    private async Task<TResult> CoordinatorCallAsync<TResult>(Task<TResult> call, string what, TimeSpan bound, CancellationToken cancellationToken)
    {
        try
        {
            return await call.WaitAsync(bound, cancellationToken).ConfigureAwait(false);
        }
        catch (Exception e) when (e is TimeoutException or OrleansException)
        {
            throw CoordinatorFailed(e, what, bound);
        }
    }

    /// <summary>
    /// Runs the step on the coordinator within <paramref name="bound"/>. An answer is lost when it was to come back
    /// through a gateway silo that died mid-step (a rank's silo being killed is exactly when a step fails), so with no
    /// answer the step is asked for again every second: the coordinator answers a repeated ticket with the outcome of
    /// the run it already has (or runs it, when the first ask never arrived), and the answer comes back through a live
    /// gateway once the client has dropped the dead one. The asks do not back off: a stalled gateway silo is declared
    /// dead and dropped about 3 s in, and asks doubling their gap (1 s, 3 s, 7 s) could get through only at 7 s. Only a
    /// coordinator that answers no ask is blamed, or one its probe loses (<see cref="ProbeCoordinatorAsync"/>): Orleans does
    /// not fail a call whose target silo died, so without the probe a lost coordinator was learnt only at the bound.
    /// </summary>
    private async Task<StepReport> RunOnCoordinatorAsync(StepTicket ticket, bool weighted, TimeSpan bound, CancellationToken cancellationToken)
    {
        Stopwatch clock = Stopwatch.StartNew();
        using CancellationTokenSource probing = new();
        Task<GroupStepFailedException?> probe = ProbeCoordinatorAsync(ticket, probing.Token);
        try
        {
            return await AskCoordinatorAsync(ticket, weighted, bound, clock, probe, cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            await probing.CancelAsync().ConfigureAwait(false);
        }
    }

    private async Task<StepReport> AskCoordinatorAsync(StepTicket ticket, bool weighted, TimeSpan bound, Stopwatch clock, Task<GroupStepFailedException?> probe, CancellationToken cancellationToken)
    {
        List<Task<StepReport>> asks = [];
        Task<StepReport>? firstAsk = null;
        Exception? lost = null;
        TimeSpan gap = TimeSpan.FromSeconds(1);
        TimeSpan nextAsk = TimeSpan.Zero;
        while (true)
        {
            if (clock.Elapsed >= nextAsk)
            {
                Task<StepReport> ask = Coordinator.RunStepAsync(ticket, weighted);
                _ = ask.ContinueWith(static t => _ = t.Exception, CancellationToken.None, TaskContinuationOptions.OnlyOnFaulted, TaskScheduler.Default);
                firstAsk ??= ask;
                asks.Add(ask);
                nextAsk = clock.Elapsed + gap;
            }

            TimeSpan left = bound - clock.Elapsed;
            if (left <= TimeSpan.Zero)
            {
                throw CoordinatorFailed(lost ?? new TimeoutException(), "RunStepAsync", bound);
            }

            TimeSpan wait = nextAsk - clock.Elapsed;
            using CancellationTokenSource tick = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            Task delay = Task.Delay(wait < left ? wait : left, tick.Token);
            Task first = await Task.WhenAny(probe.IsCompleted ? [.. asks, delay] : [.. asks, delay, probe]).ConfigureAwait(false);
            await tick.CancelAsync().ConfigureAwait(false);
            cancellationToken.ThrowIfCancellationRequested();
            if (first == probe && await probe.ConfigureAwait(false) is { } lostCoordinator)
            {
                // The probe lost the coordinator; an answer that made it back all the same wins.
                Task<StepReport>? done = asks.FirstOrDefault(a => a.IsCompletedSuccessfully);
                lostCoordinator.Data[LostByProbe] = true;
                return done is not null ? await done.ConfigureAwait(false) : throw lostCoordinator;
            }

            if (first is Task<StepReport> answered)
            {
                asks.Remove(answered);
                Exception? error = answered.Exception?.GetBaseException();
                if (answered != firstAsk && error is InvalidOperationException)
                {
                    // A second ask reached an activation that knows no such step: the one that ran it is gone with its silo.
                    throw CoordinatorFailed(error, "RunStepAsync", bound, $"lost step {ticket.Step} with its silo (asked again, a new activation knows no such step)");
                }

                if (answered.IsCompletedSuccessfully || error is not (TimeoutException or OrleansException))
                {
                    return await answered.ConfigureAwait(false); // the coordinator's answer, a failure included
                }

                lost = error; // the message went nowhere: ask again at the next tick
                nextAsk = clock.Elapsed + TimeSpan.FromMilliseconds(100) < nextAsk ? clock.Elapsed + TimeSpan.FromMilliseconds(100) : nextAsk;
            }
        }
    }

    /// <summary>The failure a coordinator call ends in: it names the silo the coordinator was last seen on and its ranks.</summary>
    private GroupStepFailedException CoordinatorFailed(Exception e, string what, TimeSpan bound, string? why = null, long step = 0)
    {
        why ??= e is TimeoutException ? $"did not answer {what} within {bound.TotalSeconds:0.#} s" : $"could not be reached for {what}: {RemoteFailure.Describe(e)}";
        return new GroupStepFailedException($"the coordinator of layer '{Layer}'{coordinatorSilo.Description} {why}", step, coordinatorSilo.Ranks, e);
    }

    /// <summary>
    /// Watches the coordinator while it runs <paramref name="ticket"/>: from <see cref="ProbeEvery"/> in, a
    /// <see cref="IExpertLayerGrain.DescribeAsync"/> (it interleaves with the running step) every <see cref="ProbeEvery"/>,
    /// each within <see cref="ProbeTimeout"/>. Returns the step's failure, naming the coordinator, when its silo refuses
    /// two probes in a row (asked again 100 ms after the first), when <see cref="ProbeTimeoutsLost"/> probes in a row get
    /// no answer, or when the activation that answers never issued the ticket (the one that ran it was lost with its silo
    /// and the coordinator was activated anew); null once stopped. The client's own gateway dying must not fail a step
    /// that would succeed: a refusal that does not name the coordinator's silo (the gateway's connection) is not counted,
    /// only asked again 100 ms later (the client sends it through another gateway), and silence needs three probes, past
    /// the 2 s in which the cluster declares a silent gateway silo dead and the client's 1 s gateway refresh.
    /// </summary>
    private async Task<GroupStepFailedException?> ProbeCoordinatorAsync(StepTicket ticket, CancellationToken stop)
    {
        try
        {
            // Most steps end before the first probe: stopped then, the probe returns without throwing (one exception a step).
            await Task.Delay(ProbeEvery, stop).ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
            if (stop.IsCancellationRequested)
            {
                return null;
            }

            string? silo = coordinatorSilo.Silo;
            Exception? refused = null;
            int silent = 0;
            while (true)
            {
                Stopwatch sent = Stopwatch.StartNew();
                try
                {
                    CoordinatorInfo info = await Coordinator.DescribeAsync().WaitAsync(ProbeTimeout, stop).ConfigureAwait(false);
                    if (info.LastStep < ticket.Step)
                    {
                        return CoordinatorFailed(
                            new InvalidOperationException($"no step {ticket.Step}"),
                            "RunStepAsync",
                            ProbeTimeout,
                            $"was lost with its silo during step {ticket.Step}: its probe reached a new activation (silo {info.Silo}, process {info.ProcessId}) that never began that step",
                            ticket.Step);
                    }

                    silo = info.Silo;
                    (refused, silent) = (null, 0);
                }
                catch (TimeoutException e) when (!stop.IsCancellationRequested)
                {
                    refused = null;
                    if (++silent >= ProbeTimeoutsLost)
                    {
                        return CoordinatorFailed(e, "RunStepAsync", ProbeTimeout, $"was lost during step {ticket.Step}: {silent} probes in a row got no answer within {ProbeTimeout.TotalSeconds:0.#} s each", ticket.Step);
                    }
                }
                catch (OrleansException e) when (!stop.IsCancellationRequested)
                {
                    silent = 0;
                    bool coordinatorsSilo = silo is null || e.ToString().Contains(silo, StringComparison.Ordinal);
                    if (coordinatorsSilo && refused is not null)
                    {
                        return CoordinatorFailed(e, "RunStepAsync", ProbeTimeout, $"was lost during step {ticket.Step}: its silo refused two probes in a row ({RemoteFailure.Describe(e)})", ticket.Step);
                    }

                    refused = coordinatorsSilo ? e : null;
                    await Task.Delay(TimeSpan.FromMilliseconds(100), stop).ConfigureAwait(false);
                    continue;
                }

                TimeSpan rest = ProbeEvery - sent.Elapsed;
                if (rest > TimeSpan.Zero)
                {
                    await Task.Delay(rest, stop).ConfigureAwait(false);
                }
            }
        }
        catch (OperationCanceledException) when (stop.IsCancellationRequested)
        {
            return null;
        }
    }

    /// <summary>
    /// A read of the coordinator (it changes nothing, so asking again is safe) with a deadline. A message can be lost
    /// without an answer when it went out through a silo that has just died (the client's gateway for the coordinator,
    /// or the owner of its directory entry); the client notices that silo is gone within a second or two and routes the
    /// next message around it. So the read is asked again every second until <paramref name="bound"/>, and only a
    /// coordinator that misses every attempt is blamed. The attempts do not grow: a stalled gateway silo is dropped
    /// about 3 s in, and attempts of 1 s, 2 s, 4 s could send the third at 3 s through it and lose the whole bound.
    /// </summary>
    private async Task<TResult> CoordinatorReadAsync<TResult>(Func<Task<TResult>> read, string what, TimeSpan bound, CancellationToken cancellationToken)
    {
        Stopwatch clock = Stopwatch.StartNew();
        TimeSpan attempt = TimeSpan.FromSeconds(1);
        while (true)
        {
            TimeSpan left = bound - clock.Elapsed;
            TimeSpan thisAttempt = attempt < left ? attempt : left;
            try
            {
                return await read().WaitAsync(thisAttempt, cancellationToken).ConfigureAwait(false);
            }
            catch (Exception e) when ((e is TimeoutException or OrleansException) && clock.Elapsed + TimeSpan.FromMilliseconds(200) < bound)
            {
                // Not blamed yet: a quick failure (the gateway's connection closed) waits a moment before asking again.
                if (e is OrleansException)
                {
                    await Task.Delay(TimeSpan.FromMilliseconds(100), cancellationToken).ConfigureAwait(false);
                }
            }
            catch (Exception e) when (e is TimeoutException or OrleansException)
            {
                throw CoordinatorFailed(e, what, bound);
            }
        }
    }

    /// <summary>
    /// After a failed step: when the layer now has another spec (a client took it over mid-step), that is the cause to
    /// report, not the ranks' view of it. Best effort: an unreachable coordinator leaves the original failure standing.
    /// </summary>
    private async Task ThrowIfReconfiguredAsync(LayerSpec mine, StepTicket ticket, TimeSpan bound, CancellationToken cancellationToken)
    {
        LayerSpec? now;
        CoordinatorInfo info;
        try
        {
            now = await CoordinatorReadAsync(Coordinator.GetSpecAsync, "GetSpecAsync", bound, cancellationToken).ConfigureAwait(false);
            info = await CoordinatorReadAsync(Coordinator.DescribeAsync, "DescribeAsync", bound, cancellationToken).ConfigureAwait(false);
        }
        catch (GroupStepFailedException)
        {
            return;
        }

        if (now is not null && !now.Equals(mine))
        {
            throw new LayerSpecConflictException(
                $"step {ticket.Step} of layer '{Layer}' was cut short: the layer was re-configured by {info.ConfiguredBy ?? "another client"} ({mine.DescribeChanges(now)}). Configure the layer again to step with the new spec",
                info.ConfiguredBy);
        }
    }

    /// <summary>Remembers where the coordinator runs (best effort), so a coordinator that stops answering can be named.</summary>
    private async Task LocateCoordinatorAsync()
    {
        try
        {
            CoordinatorInfo where = await Coordinator.DescribeAsync().WaitAsync(DefaultCallBound).ConfigureAwait(false);
            IReadOnlyList<RankInfo> ranks = await Coordinator.DescribeGroupAsync().WaitAsync(DefaultCallBound).ConfigureAwait(false);
            int[] served = [.. ranks.Where(r => r.Silo == where.Silo).Select(r => r.Rank)];
            coordinatorSilo = new($" (on silo {where.Silo}, process {where.ProcessId}{(served.Length > 0 ? $", which serves rank {string.Join(", ", served)}" : string.Empty)})", served, where.Silo);
        }
        catch (Exception e) when (e is TimeoutException or OrleansException or GroupStepFailedException or NoSiloForRankException)
        {
            coordinatorSilo = CoordinatorPlace.Unknown;
        }
    }

    /// <summary>Where the coordinator was last seen, for its errors; a reference, so a lookup beside a step publishes it whole.</summary>
    private sealed record CoordinatorPlace(string Description, int[] Ranks, string? Silo = null)
    {
        public static CoordinatorPlace Unknown { get; } = new(string.Empty, []);
    }

    private static void CheckInputs<T>(LayerSpec spec, IReadOnlyList<RankStepInput<T>> inputs)
        where T : unmanaged
    {
        EpConfig config = spec.ToConfig(0);
        if (inputs.Count != spec.WorldSize)
        {
            throw new ArgumentException($"{inputs.Count} rank inputs given; the layer has WorldSize = {spec.WorldSize}", nameof(inputs));
        }

        if (TokenTypeInfo.Of<T>() != spec.TokenType)
        {
            throw new ArgumentException($"inputs have elements of {typeof(T).Name}; the layer's TokenType is {spec.TokenType}", nameof(inputs));
        }

        bool weights = inputs[0]?.Weights is not null;
        bool scatter = inputs[0]?.ScatterIndices is not null;
        for (int r = 0; r < inputs.Count; r++)
        {
            RankStepInput<T> i = inputs[r] ?? throw new ArgumentException($"input of rank {r} is null", nameof(inputs));
            if (i.Tokens is null || i.ExpertIds is null)
            {
                throw new ArgumentException($"rank {r}: Tokens and ExpertIds must not be null", nameof(inputs));
            }

            Require(i.Count >= 0 && i.Count <= spec.MaxTokens, r, $"Count = {i.Count} must be in [0, MaxTokens = {spec.MaxTokens}]", nameof(inputs));
            int slots = i.Count * spec.TopK;
            Require(i.Tokens.Length == (long)i.Count * spec.Hidden, r, $"Tokens has {i.Tokens.Length} elements, expected Count*Hidden = {(long)i.Count * spec.Hidden}", nameof(inputs));
            Require(i.ExpertIds.Length == slots, r, $"ExpertIds has {i.ExpertIds.Length} elements, expected Count*TopK = {slots}", nameof(inputs));
            Require((i.Weights is not null) == weights, r, "weights must be given for every rank or for none", nameof(inputs));
            Require((i.ScatterIndices is not null) == scatter, r, "scatter indices must be given for every rank or for none", nameof(inputs));
            Require(i.Weights is null || i.Weights.Length == slots, r, $"Weights has {i.Weights?.Length} elements, expected Count*TopK = {slots}", nameof(inputs));
            Require(i.ScatterIndices is null || i.ScatterIndices.Length == slots, r, $"ScatterIndices has {i.ScatterIndices?.Length} elements, expected Count*TopK = {slots}", nameof(inputs));
            for (int x = 0; x < i.ExpertIds.Length; x++)
            {
                Require((uint)i.ExpertIds[x] <= (uint)config.NumExperts, r, $"ExpertIds[{x / spec.TopK}, {x % spec.TopK}] = {i.ExpertIds[x]} is outside [0, NumExperts = {config.NumExperts}]", nameof(inputs));
            }
        }
    }

    private static void Require(bool ok, int rank, string rule, string argument)
    {
        if (!ok)
        {
            throw new ArgumentException($"rank {rank}: {rule}", argument);
        }
    }

    /// <summary>The staging grain of <paramref name="rank"/>, made once: GetGrain resolves the interface type through its attributes every time.</summary>
    private IRankStaging Staging(int rank) => staging.GetOrAdd(rank, static (r, c) => c.grains.GetGrain<IRankStaging>(GrainKeys.Rank(c.Group, r)), this);

    /// <summary>Whether a rank call ended in an answer of its own (a refusal or an error), not in silence up to its bound.</summary>
    private static bool Refused(Task call) => call.IsFaulted && call.Exception!.GetBaseException() is not TimeoutException;

    /// <summary>
    /// A call to a rank (staging, reading an output) within <paramref name="bound"/>, returning the ask that answered.
    /// Orleans does not fail a call whose request or answer went through a gateway silo that died, so a call with no
    /// answer is asked again every <see cref="RankAskEvery"/> until the bound, the same as the coordinator's, and the
    /// first ask to answer wins. Asking again is safe: a read changes nothing, and a rank takes a staging call repeated
    /// for the same step as the input it already has (<c>HostedLayer.BeginInput</c>, <c>StagedInput.Add</c>). A refusal
    /// (the connection to a gateway that just died) is asked again 100 ms later, when the client sends through another
    /// gateway; a second refusal is the rank's own (its silo is gone) and fails the call at once, as any error the rank
    /// answers with does. No answer to any ask ends it in a <see cref="TimeoutException"/> at the bound.
    /// </summary>
    private static async Task<TAsk> RankCallAsync<TAsk>(Func<TAsk> call, TimeSpan bound, CancellationToken cancellationToken)
        where TAsk : Task
    {
        Stopwatch clock = Stopwatch.StartNew();
        List<TAsk> asks = [];
        bool refused = false;
        TimeSpan nextAsk = TimeSpan.Zero;
        while (true)
        {
            cancellationToken.ThrowIfCancellationRequested();
            if (clock.Elapsed >= nextAsk)
            {
                TAsk ask = call();
                _ = ask.ContinueWith(static t => _ = t.Exception, CancellationToken.None, TaskContinuationOptions.OnlyOnFaulted, TaskScheduler.Default);
                asks.Add(ask);
                nextAsk = clock.Elapsed + RankAskEvery;
            }

            TimeSpan left = bound - clock.Elapsed;
            if (left <= TimeSpan.Zero)
            {
                throw new TimeoutException($"no answer within {bound.TotalSeconds:0.#} s ({asks.Count} asks)");
            }

            TimeSpan wait = nextAsk - clock.Elapsed;
            using CancellationTokenSource tick = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
            Task delay = Task.Delay(wait < left ? wait : left, tick.Token);
            Task first = await Task.WhenAny([.. asks, delay]).ConfigureAwait(false);
            await tick.CancelAsync().ConfigureAwait(false);
            if (first == delay)
            {
                continue; // (compared by reference: for a call that returns a bare Task, the delay is a TAsk too)
            }

            TAsk answered = (TAsk)first;
            asks.Remove(answered);
            if (answered.IsCompletedSuccessfully || answered.Exception?.GetBaseException() is not OrleansException || refused)
            {
                return answered; // the rank's answer, an error of its own or a second refusal included
            }

            refused = true;
            TimeSpan soon = clock.Elapsed + TimeSpan.FromMilliseconds(100);
            nextAsk = soon < nextAsk ? soon : nextAsk;
        }
    }

    /// <summary>How often a rank call with no answer is asked again (see <see cref="RankCallAsync{TAsk}"/>).</summary>
    internal static readonly TimeSpan RankAskEvery = TimeSpan.FromSeconds(1);

    private async Task StageAsync<T>(int rank, StepTicket ticket, RankStepInput<T> input, TimeSpan bound, CancellationToken asking)
        where T : unmanaged
    {
        IRankStaging grain = Staging(rank);
        long step = ticket.Step;
        StepInputHeader header = new(step, input.Count, input.Weights is not null, input.ScatterIndices is not null, ticket.Epoch);
        long bytes = ((long)input.Tokens.Length * Unsafe.SizeOf<T>()) + (4L * (input.ExpertIds.Length + (input.Weights?.Length ?? 0) + (input.ScatterIndices?.Length ?? 0)));
        if (bytes <= chunkBytes)
        {
            // One message, its parts serialized straight from the caller's arrays (each ask serializes them again).
            StepInput whole = new(
                header,
                ByteView<T>.Of(input.Tokens),
                ByteView<int>.Of(input.ExpertIds),
                input.Weights is { } weights ? ByteView<float>.Of(weights) : ReadOnlyMemory<byte>.Empty,
                input.ScatterIndices is { } scatter ? ByteView<int>.Of(scatter) : ReadOnlyMemory<byte>.Empty);
            await await RankCallAsync(() => grain.StageStepInputAsync(Layer, whole), bound, asking).ConfigureAwait(false);
            return;
        }

        await await RankCallAsync(() => grain.BeginInputAsync(Layer, header), bound, asking).ConfigureAwait(false);
        // Each chunk is copied once from the caller's array into its own (Immutable: Orleans copies no more).
        List<Task> sends = [];
        Chunks(sends, grain, step, InputPart.Tokens, MemoryMarshal.AsBytes(input.Tokens.AsSpan()), bound, asking);
        Chunks(sends, grain, step, InputPart.ExpertIds, MemoryMarshal.AsBytes(input.ExpertIds.AsSpan()), bound, asking);
        if (input.Weights is { } w)
        {
            Chunks(sends, grain, step, InputPart.Weights, MemoryMarshal.AsBytes(w.AsSpan()), bound, asking);
        }

        if (input.ScatterIndices is { } s)
        {
            Chunks(sends, grain, step, InputPart.ScatterIndices, MemoryMarshal.AsBytes(s.AsSpan()), bound, asking);
        }

        await Task.WhenAll(sends).ConfigureAwait(false);
    }

    private void Chunks(List<Task> sends, IRankStaging grain, long step, InputPart part, ReadOnlySpan<byte> bytes, TimeSpan bound, CancellationToken asking)
    {
        for (int offset = 0; offset < bytes.Length; offset += chunkBytes)
        {
            int at = offset;
            Immutable<byte[]> piece = new(bytes[offset..Math.Min(bytes.Length, offset + chunkBytes)].ToArray());
            sends.Add(RankCallAsync(() => grain.StageInputAsync(Layer, step, part, at, piece), bound, asking).Unwrap());
        }
    }

    private async Task<T[]> ReadAsync<T>(int rank, long step, int totalBytes, TimeSpan bound, CancellationToken asking)
        where T : unmanaged
    {
        IRankStaging grain = Staging(rank);
        // The chunks land straight in the result's bytes.
        T[] result = GC.AllocateUninitializedArray<T>(totalBytes / Unsafe.SizeOf<T>()); // returned only once every chunk is in
        List<Task> reads = [];
        for (int offset = 0; offset < totalBytes; offset += chunkBytes)
        {
            int at = offset;
            int count = Math.Min(chunkBytes, totalBytes - offset);
            reads.Add(RankCallAsync(() => grain.ReadOutputAsync(Layer, step, at, count), bound, asking).Unwrap().ContinueWith(t => t.Result.Value.CopyTo(MemoryMarshal.AsBytes(result.AsSpan())[at..]), TaskScheduler.Default));
        }

        await Task.WhenAll(reads).ConfigureAwait(false);
        return result;
    }
}

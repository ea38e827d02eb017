using System.Diagnostics;
using System.Globalization;
using EpA2A.Grains.Placement;
using EpA2A.Telemetry;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Orleans.Placement;
using Orleans.Runtime.MembershipService.SiloMetadata;

namespace EpA2A.Grains.Coordination;

/// <summary>
/// Coordinates one layer of a group. Forms the group by creating the layer on every rank (each pinned to its
/// silo), then runs steps: every rank enters the step, and the whole step must finish within a bound of
/// twice the step deadline plus a second (and at most 3 s more to abort the others and collect their reports).
/// A rank that fails, does not answer, or is blamed by the others fails the step on every rank (the others are
/// aborted at once), the error names it (a rank whose silo is gone before the ranks that waited on it), and the
/// next step re-forms the group under a new epoch, so a restarted silo comes back by itself.
/// Coordinators are placed at random: the layers of a model spread over the silos instead of piling onto the
/// gateway a client happens to use, so one silo's death costs a few coordinators, not all of them.
/// </summary>
[RandomPlacement]
internal sealed partial class ExpertLayerGrain(ILogger<ExpertLayerGrain> logger) : Grain, IExpertLayerGrain
{
    private LayerSpec? spec;
    private long epoch;
    private long nextStep;
    private bool formed;
    private (StepTicket Ticket, long Began)? pending;

    /// <summary>The last step run and its outcome: asked again for the same ticket, the coordinator answers with it.</summary>
    private (StepTicket Ticket, Task<StepReport> Run)? lastRun;
    private string? configuredBy;
    private (LayerSpec Old, long Epoch, string By, DateTime At)? reconfigured;
    private readonly Dictionary<string, long> steppedBy = new(StringComparer.Ordinal);

    /// <summary>Ranks a masking layer serves without (lost, not yet back); empty for the whole group.</summary>
    private int[] masked = [];

    /// <summary>Calls that ask the masked ranks whether they are back; looked at when a step begins, never waited for.</summary>
    private (Task<RankInfo>[] Calls, int[] Ranks, long Started)? probe;

    /// <summary>A masking layer's liveness watch over the serving ranks while a client steps it (see <see cref="WatchAsync"/>).</summary>
    private IGrainTimer? watchTimer;
    private (Task<RankInfo>[] Calls, int[] Ranks, long Epoch)? watch;
    private readonly Dictionary<int, int> missedProbes = [];
    private (int Rank, IRankControl Grain)[] rankGrains = [];

    private (string Group, string Layer) Key => GrainKeys.ParseLayer(this.GetPrimaryKeyString());

    /// <summary>
    /// The same spec from another client leaves a formed group alone (adopting the layer must not cost the first client
    /// its step in progress); from the client that configured it, it re-forms the group. A new spec re-forms the group; it is refused while another client steps the layer, unless
    /// <paramref name="takeOver"/> is set, so no client ever runs a step under a spec it did not configure by accident.
    /// </summary>
    public async Task ConfigureAsync(LayerSpec newSpec, string client, bool takeOver)
    {
        ArgumentNullException.ThrowIfNull(newSpec);
        client = string.IsNullOrWhiteSpace(client) ? "an unnamed client" : client;
        LayerSpec validated = newSpec.Validated();
        if (spec is { } current && current.Equals(validated) && client != configuredBy && formed)
        {
            return; // another client adopting the layer as it is
        }

        if (spec is { } same && same.Equals(validated))
        {
            // The owner configuring again re-forms the group (a fresh layer on every rank), as it always has.
            formed = false;
            pending = null;
            await FormAsync().ConfigureAwait(true);
            return;
        }

        if (spec is { } old && !takeOver && ActiveClients(old).FirstOrDefault(c => c.Client != client) is { Client: not null } other)
        {
            throw new LayerSpecConflictException(
                $"layer '{Key.Layer}' of group '{Key.Group}' is being stepped by {other.Client} (last step begun {other.Age.TotalSeconds:0.0} s ago) under {Describe(old)}; {client} asked for {old.DescribeChanges(validated)}: refused, so that client does not fail mid-run. Take the layer over explicitly (drive --take-over, ExpertLayerClient.ConfigureAsync(spec, takeOver: true)) or wait until it stops",
                configuredBy);
        }

        if (spec is { } replaced)
        {
            reconfigured = (replaced, epoch, client, DateTime.UtcNow);
        }

        spec = validated;
        configuredBy = client;
        steppedBy.Clear();
        formed = false;
        masked = [];
        probe = null;
        pending = null;
        await FormAsync().ConfigureAwait(true);
    }

    public Task RestoreAsync(LayerSpec restored, string client)
    {
        ArgumentNullException.ThrowIfNull(restored);
        if (spec is null)
        {
            spec = restored.Validated();
            configuredBy = string.IsNullOrWhiteSpace(client) ? "an unnamed client" : client;
            formed = false;
        }

        return Task.CompletedTask;
    }

    public Task<LayerSpec?> GetSpecAsync() => Task.FromResult(spec);

    public Task<CoordinatorInfo> DescribeAsync() => Task.FromResult(new CoordinatorInfo(
        Key.Group,
        Key.Layer,
        RuntimeIdentity,
        Environment.ProcessId,
        epoch,
        nextStep,
        formed,
        pending?.Ticket.Step,
        configuredBy,
        GrainDirectoryOwner.Find(ServiceProvider, this.GetGrainId())));

    /// <summary>
    /// Says when and why a coordinator goes away: its step in flight goes with it, and the client's probe then finds a
    /// new activation that never began the step (a deactivation for a lost directory registration is "DirectoryFailure").
    /// </summary>
    public override Task OnDeactivateAsync(DeactivationReason reason, CancellationToken cancellationToken)
    {
        LogDeactivated(logger, this.GetPrimaryKeyString(), pending?.Ticket.Step, reason.ReasonCode.ToString(), reason.Description);
        return Task.CompletedTask;
    }

    public async Task<IReadOnlyList<RankInfo>> DescribeGroupAsync()
    {
        LayerSpec s = RequireSpec();
        Task<RankInfo>[] calls = [.. Ranks(s).Select(r => r.Grain.DescribeAsync())];
        await Task.WhenAny(Task.WhenAll(calls), Task.Delay(s.StepTimeout)).ConfigureAwait(true);
        return [.. calls.Where(c => c.IsCompletedSuccessfully).Select(c => c.Result)];
    }

    /// <summary>
    /// Steps of a layer do not overlap: while one is begun and not yet run or abandoned, another caller's begin is
    /// refused (before anything is staged). A begun step that is never run is given up after its bound.
    /// </summary>
    public async Task<StepTicket> BeginStepAsync(LayerSpec expected, string client)
    {
        ArgumentNullException.ThrowIfNull(expected);
        LayerSpec s = RequireSpec();
        if (!s.Equals(expected))
        {
            throw new LayerSpecConflictException(
                $"layer '{Key.Layer}' of group '{Key.Group}' was re-configured by {configuredBy ?? "another client"}{(reconfigured is { } r ? $" at {r.At:HH:mm:ss} UTC" : string.Empty)}: {expected.DescribeChanges(s)} since this client configured it; its steps would run under a spec it did not check. Configure the layer again to step with the new spec",
                configuredBy);
        }

        steppedBy[string.IsNullOrWhiteSpace(client) ? "an unnamed client" : client] = Stopwatch.GetTimestamp();
        if (pending is { } p)
        {
            TimeSpan age = Stopwatch.GetElapsedTime(p.Began);
            TimeSpan bound = (s.StepTimeout * 2) + TimeSpan.FromSeconds(1);
            if (age < bound)
            {
                throw new InvalidOperationException(
                    $"step {p.Ticket.Step} of layer '{Key.Layer}' is in progress (begun {age.TotalSeconds:0.0} s ago): steps of one layer must not overlap; a begun step that is never run is given up after {bound.TotalSeconds:0.#} s");
            }

            pending = null;
        }

        if (masked.Length > 0 && formed)
        {
            await ReadmitReturnedRanksAsync(s).ConfigureAwait(true);
        }

        if (!formed && s.OnLostRank == LostRankPolicy.Mask && Serving(s).Where(r => !ServedByActiveSilo(r.Rank)).Select(r => r.Rank).ToArray() is { Length: > 0 } gone && gone.Length < Serving(s).Length)
        {
            // A rank whose silo was declared dead is masked before forming: creating its layer would only wait out the
            // placement's grace (a second) to fail. The background probe re-admits it once a silo serves it again.
            LogStepFailed(logger, $"layer '{Key.Layer}': no active silo serves ranks {string.Join(", ", gone)}{await MaskAsync(s, gone).ConfigureAwait(true)}");
        }

        if (!formed)
        {
            try
            {
                await FormAsync().ConfigureAwait(true);
            }
            catch (GroupStepFailedException e) when (s.OnLostRank == LostRankPolicy.Mask && e.BlamedRanks.Length > 0 && e.BlamedRanks.Length < s.WorldSize)
            {
                // A rank lost between steps (its silo gone, or cut off) is found here, when the group re-forms.
                string how = await MaskAsync(s, e.BlamedRanks).ConfigureAwait(true);
                if (!formed)
                {
                    throw new GroupStepFailedException(e.Message + how, e.Step, e.BlamedRanks);
                }
            }
        }

        StepTicket ticket = new(++nextStep, epoch, masked.Length > 0 ? [.. masked] : null);
        pending = (ticket, Stopwatch.GetTimestamp());
        return ticket;
    }

    public async Task AbandonStepAsync(StepTicket ticket, string reason, IReadOnlyList<int>? unreachable = null)
    {
        ArgumentNullException.ThrowIfNull(ticket);
        if (pending?.Ticket == ticket)
        {
            pending = null;
        }

        if (ticket.Epoch != epoch)
        {
            return;
        }

        formed = false;
        LogStepFailed(logger, reason);

        // A rank cut off or stalled between steps is first seen by the client, whose staging to it found no answer
        // within T + 1 s. A masking layer masks it now (the background probe re-admits it once it answers), so the
        // next step is served by the survivors instead of waiting on it again while the group re-forms. When every
        // serving rank is unreachable the client is the one cut off: nothing is masked.
        // The client's word is checked first: its messages to a healthy rank are lost too when they were routed through
        // the cut host's gateway, so only a rank that also misses this coordinator's own probe (1 s) is masked.
        if (spec is { OnLostRank: LostRankPolicy.Mask } s && unreachable is { Count: > 0 })
        {
            (int Rank, IRankControl Grain)[] serving = Serving(s);
            int[] suspects = [.. unreachable.Where(r => serving.Any(x => x.Rank == r)).Distinct().Order()];
            int[] lost = suspects.Length > 0 ? await ConfirmByProbeAsync([.. serving.Where(x => suspects.Contains(x.Rank))], suspects, [], keepWhenAllAnswer: false).ConfigureAwait(true) : [];
            if (lost.Length > 0 && lost.Length < serving.Length)
            {
                LogStepFailed(logger, $"layer '{Key.Layer}': ranks {string.Join(", ", lost)} did not answer the client's staging{await MaskAsync(s, lost).ConfigureAwait(true)}");
            }
        }
    }

    /// <summary>
    /// Runs a step on every rank. Traced as "epa2a.step" (the parent of every rank's "epa2a.rank.step", through
    /// Orleans activity propagation) and timed on the epa2a.step.duration histogram.
    /// </summary>
    public async Task<StepReport> RunStepAsync(StepTicket ticket, bool weighted)
    {
        ArgumentNullException.ThrowIfNull(ticket);
        if (lastRun is { } last && last.Ticket == ticket)
        {
            // Asked again: the client's answer was lost with a gateway silo that died mid-step. Same outcome, no second run.
            return await last.Run.ConfigureAwait(true);
        }

        if (pending?.Ticket != ticket && reconfigured is { } r && ticket.Epoch <= r.Epoch)
        {
            throw new LayerSpecConflictException(
                $"step {ticket.Step} of layer '{Key.Layer}' was begun under a spec that was re-configured by {r.By} at {r.At:HH:mm:ss} UTC ({r.Old.DescribeChanges(RequireSpec())}): the step is not run. Configure the layer again to step with the new spec",
                configuredBy);
        }

        if (pending?.Ticket != ticket)
        {
            throw new InvalidOperationException(
                $"step {ticket.Step} (epoch {ticket.Epoch}) of layer '{Key.Layer}' is not the step in progress ({(pending is { } p ? $"step {p.Ticket.Step}" : "none")}): a step runs once, after BeginStepAsync");
        }

        pending = null;
        Task<StepReport> run = RunTracedAsync(ticket, weighted);
        lastRun = (ticket, run);
        return await run.ConfigureAwait(true);
    }

    private async Task<StepReport> RunTracedAsync(StepTicket ticket, bool weighted)
    {
        using Activity? span = EpTelemetry.Source.StartActivity("epa2a.step");
        span?.SetTag(EpTelemetry.Tags.SpanGroup, Key.Group);
        span?.SetTag(EpTelemetry.Tags.SpanLayer, Key.Layer);
        span?.SetTag(EpTelemetry.Tags.SpanStep, ticket.Step);
        span?.SetTag(EpTelemetry.Tags.SpanEpoch, ticket.Epoch);
        long start = Stopwatch.GetTimestamp();
        string outcome = "failed";
        try
        {
            StepReport report = await RunStepCoreAsync(ticket, weighted).ConfigureAwait(true);
            outcome = "ok";
            return report;
        }
        catch (Exception e) when (span is not null)
        {
            span.SetStatus(ActivityStatusCode.Error, e.Message);
            span.AddException(e);
            throw;
        }
        finally
        {
            if (EpTelemetry.StepDuration.Enabled)
            {
                EpTelemetry.StepDuration.Record(
                    Stopwatch.GetElapsedTime(start).TotalSeconds,
                    new KeyValuePair<string, object?>(EpTelemetry.Tags.Layer, Key.Layer),
                    new KeyValuePair<string, object?>(EpTelemetry.Tags.Outcome, outcome));
            }
        }
    }

    private async Task<StepReport> RunStepCoreAsync(StepTicket ticket, bool weighted)
    {
        ArgumentNullException.ThrowIfNull(ticket);
        LayerSpec s = RequireSpec();
        if (!formed || ticket.Epoch != epoch)
        {
            throw new GroupStepFailedException($"step {ticket.Step} belongs to epoch {ticket.Epoch}, the group is at epoch {epoch} (formed: {formed}); begin a new step", ticket.Step, []);
        }

        long start = Stopwatch.GetTimestamp();
        (int Rank, IRankControl Grain)[] ranks = Serving(s);
        Task<RankStepReport>[] calls = [.. ranks.Select(r => r.Grain.RunStepAsync(Key.Layer, ticket, weighted))];
        TimeSpan bound = (s.StepTimeout * 2) + TimeSpan.FromSeconds(1);
        List<int> blamed = [];
        List<int> unreachable = [];
        List<string> errors = [];
        Dictionary<int, Task<RankInfo>> early = [];
        long? failureSeen = null;
        Task all = Task.WhenAll(calls);
        using CancellationTokenSource stepDone = new();
        Task<int[]> lostInStep = WhenLostDuringStepAsync(ranks, all, watching: s.OnLostRank == LostRankPolicy.Mask, stepDone.Token);
        // The bound's timer is stopped with the step: a step's 2T + 1 s timer would otherwise outlive it by about a minute.
        Task first = await Task.WhenAny(all, WhenFirstFailure(calls), lostInStep, Task.Delay(bound, stepDone.Token)).ConfigureAwait(true);
        await stepDone.CancelAsync().ConfigureAwait(true);
        int[] foundLost = lostInStep.IsCompletedSuccessfully ? lostInStep.Result : [];
        if (first != all)
        {
            // Someone failed (or nobody finished in time): stop every rank's waits now rather than at their deadlines.
            // Aborted ranks answer at once; what the bound has left (at least a second) is all a rank is given.
            // An aborted rank runs no further step on this incarnation, so the next step re-forms the group even
            // if every report comes back a success after all.
            formed = false;
            failureSeen = Stopwatch.GetTimestamp();

            // Every rank still inside the step is probed together with the abort, so telling a lost rank (no answer)
            // from a busy one (a straggler in its experts answers: DescribeAsync interleaves with its step) costs no
            // second after the grace: the grace and the probe run at once.
            for (int i = 0; i < calls.Length; i++)
            {
                if (!calls[i].IsCompleted)
                {
                    early[ranks[i].Rank] = Probe(ranks[i].Grain);
                }
            }

            // A masking layer does not wait up to 2 s for an abort that a lost rank cannot take: the grace below covers it.
            Task aborts = AbortAllAsync(ranks, $"step {ticket.Step} failed");
            if (s.OnLostRank != LostRankPolicy.Mask)
            {
                await aborts.ConfigureAwait(true);
            }

            TimeSpan left = bound - Stopwatch.GetElapsedTime(start);

            // A masking layer does not wait for a lost rank: the aborted ranks answer at once, and one that does not
            // answer within a second of the abort is lost (dead, stalled or cut off), so the survivors re-form now.
            TimeSpan grace = s.OnLostRank == LostRankPolicy.Mask ? TimeSpan.FromSeconds(1) : left;
            // A rank the in-step watch already found lost will not answer: the grace waits for the others only.
            Task others = Task.WhenAll(calls.Where((_, i) => !foundLost.Contains(ranks[i].Rank)));
            await Task.WhenAny(others, Task.Delay(grace > TimeSpan.FromSeconds(1) ? (grace < left ? grace : left) : TimeSpan.FromSeconds(1))).ConfigureAwait(true);
        }

        List<RankStepReport> reports = [];
        for (int i = 0; i < calls.Length; i++)
        {
            Task<RankStepReport> call = calls[i];
            if (call.IsCompletedSuccessfully)
            {
                RankStepReport report = call.Result;
                reports.Add(report);
                if (!report.Succeeded)
                {
                    errors.Add(report.Error is { } error ? RemoteFailure.Clean(error) : $"rank {report.Rank} failed");
                    if (report.BlamedRank is int b)
                    {
                        blamed.Add(b);
                    }
                }
            }
            else if (foundLost.Contains(ranks[i].Rank) && !call.IsFaulted)
            {
                errors.Add($"rank {ranks[i].Rank}: lost during the step (its liveness probes failed: its silo is gone, stalled or cut off)");
                blamed.Add(ranks[i].Rank);
                unreachable.Add(ranks[i].Rank);
            }
            else
            {
                Exception? cause = call.IsFaulted ? call.Exception!.GetBaseException() : null;
                errors.Add($"rank {ranks[i].Rank}: {(cause is null ? $"no answer within {bound.TotalSeconds:0.#} s" : RemoteFailure.Describe(cause))}");
                blamed.Add(ranks[i].Rank);
                if (cause is null or OrleansException or TimeoutException or NoSiloForRankException)
                {
                    unreachable.Add(ranks[i].Rank);
                }
            }
        }

        if (errors.Count > 0)
        {
            formed = false;

            // A rank whose silo is gone (or silent) explains the others' waits on it and on each other: it is the culprit.
            // A call that could not reach its rank is certain; a rank that only had not answered within the grace may
            // just be slow to take the abort (a loaded machine), so it is a suspect only when no call failed outright.
            int[] failedCalls = [.. unreachable.Where(r => calls[Array.FindIndex(ranks, x => x.Rank == r)].IsFaulted)];
            if (failedCalls.Length > 0)
            {
                unreachable = [.. failedCalls];
            }

            int[] culprits = [.. (unreachable.Count > 0 ? unreachable : blamed).Distinct().Order()];
            if (culprits.Length > 1)
            {
                int[] selfReported = [.. reports.Where(r => !r.Succeeded && r.BlamedRank == r.Rank).Select(r => r.Rank)];
                culprits = await ConfirmByProbeAsync(ranks, culprits, selfReported, early: early).ConfigureAwait(true);
            }

            string who = culprits.Length == 0 ? "unknown rank" : culprits.Length == 1 ? $"rank {culprits[0]}" : $"ranks {string.Join(", ", culprits)}";
            string message = $"step {ticket.Step} of layer '{Key.Layer}' failed because of {who}: {string.Join("; ", errors.Distinct())}";
            if (s.OnLostRank == LostRankPolicy.Mask && unreachable.Count > 0)
            {
                // A rank that only had not answered within the grace may be slow, not lost (still in its experts): it
                // answers a probe (DescribeAsync interleaves with its step), so only ranks that answer neither are masked.
                int[] lost = await ConfirmLostAsync(ranks, calls, [.. unreachable.Distinct()], early).ConfigureAwait(true);
                if (lost.Length > 0)
                {
                    long confirmed = Stopwatch.GetTimestamp();
                    message += await MaskAsync(s, lost).ConfigureAwait(true);
                    LogMaskTiming(logger, Key.Layer, ticket.Step, Ms(start, failureSeen ?? confirmed), Ms(start, confirmed), Ms(start, Stopwatch.GetTimestamp()));
                }
            }

            LogStepFailed(logger, message);
            throw new GroupStepFailedException(message, ticket.Step, culprits);
        }

        return new StepReport(ticket.Step, epoch, reports, Stopwatch.GetElapsedTime(start).TotalMicroseconds, masked.Length > 0 ? [.. masked] : null, reports.Sum(r => r.MaskedSlots));
    }

    /// <summary>
    /// Several ranks blamed at once are mostly ranks that waited on the one that stalled: a rank blamed only by others'
    /// waits stays blamed when it also fails a direct probe (no answer within a second). A rank that reported its own
    /// failure (bad input) stays blamed. When every suspect answers, the blame stands as it was. A suspect that no active
    /// silo serves (its silo was declared dead) is not probed: a probe of it would only wait out the placement's grace.
    /// </summary>
    private async Task<int[]> ConfirmByProbeAsync((int Rank, IRankControl Grain)[] ranks, int[] suspects, int[] selfReported, bool keepWhenAllAnswer = true, Dictionary<int, Task<RankInfo>>? early = null)
    {
        selfReported = [.. selfReported.Intersect(suspects)];
        int[] gone = [.. suspects.Except(selfReported).Where(r => !ServedByActiveSilo(r))];
        int[] probed = [.. suspects.Except(selfReported).Except(gone)];

        // A probe sent when the step failed is reused (it has had its second, or has what is left of it); the others start now.
        Task<RankInfo>[] probes = [.. probed.Select(r => early is not null && early.TryGetValue(r, out Task<RankInfo>? sent) ? sent : Probe(ranks.First(x => x.Rank == r).Grain))];
        if (probes.Length > 0)
        {
            await ((Task)Task.WhenAll(probes)).ConfigureAwait(ConfigureAwaitOptions.ContinueOnCapturedContext | ConfigureAwaitOptions.SuppressThrowing);
        }

        int[] confirmed = [.. selfReported.Concat(gone).Concat(probed.Where((_, i) => !probes[i].IsCompletedSuccessfully)).Distinct().Order()];
        return confirmed.Length > 0 || !keepWhenAllAnswer ? confirmed : suspects;
    }

    /// <summary>Whether this silo's view of the cluster has an active silo serving <paramref name="rank"/> (true when it cannot tell).</summary>
    private bool ServedByActiveSilo(int rank)
    {
        IClusterMembershipService? membership = ServiceProvider.GetService<IClusterMembershipService>();
        ISiloMetadataCache? metadata = ServiceProvider.GetService<ISiloMetadataCache>();
        if (membership is null || metadata is null)
        {
            return true;
        }

        string rankText = rank.ToString(CultureInfo.InvariantCulture);
        return membership.CurrentSnapshot.Members.Values.Any(m => m.Status == SiloStatus.Active
            && metadata.GetSiloMetadata(m.SiloAddress).Metadata is { } md
            && md.TryGetValue(RankMetadata.Group, out string? g) && g == Key.Group
            && md.TryGetValue(RankMetadata.Rank, out string? r) && r == rankText);
    }

    /// <summary>Of ranks that did not answer a step: those whose call failed to reach them, and those that also miss a probe.</summary>
    private async Task<int[]> ConfirmLostAsync((int Rank, IRankControl Grain)[] ranks, Task<RankStepReport>[] calls, int[] unanswered, Dictionary<int, Task<RankInfo>> early)
    {
        int[] unreachable = [.. unanswered.Where(r => calls[Array.FindIndex(ranks, x => x.Rank == r)].IsFaulted)];
        int[] silent = [.. unanswered.Except(unreachable)];
        int[] stillSilent = silent.Length > 0 ? await ConfirmByProbeAsync(ranks, silent, [], keepWhenAllAnswer: false, early).ConfigureAwait(true) : [];
        return [.. unreachable.Concat(stillSilent).Order()];
    }

    /// <summary>
    /// A masking layer's liveness watch inside a step (the grain timer's watch does not run while a step does): from
    /// <see cref="WatchPeriod"/> into the step on, every rank still inside it is probed back to back. A rank whose probe
    /// cannot reach it (a SIGKILLed silo refuses the connection at once), or that misses two probes (1 s each), is lost:
    /// the step fails then, instead of when the survivors' waits on it end at their deadline T (measured: a SIGKILL
    /// landing inside a step was re-formed around 4.2 s after it with T = 3 s: T of waiting, then a 1 s grace and probe).
    /// Completes with the lost ranks; never while none is, nor without <paramref name="watching"/> (ends with the step).
    /// </summary>
    private static async Task<int[]> WhenLostDuringStepAsync((int Rank, IRankControl Grain)[] ranks, Task all, bool watching, CancellationToken stepDone)
    {
        Dictionary<int, int> missed = [];
        try
        {
            // Not watching (the usual layer, which fails and re-forms) goes straight to the wait below: no exception
            // thrown and caught in every step.
            if (watching)
            {
                stepDone.ThrowIfCancellationRequested();
                await Task.Delay(WatchPeriod, stepDone).ConfigureAwait(true);
            }

            while (watching && !all.IsCompleted)
            {
                (int Rank, IRankControl Grain)[] watched = [.. ranks];
                Task<RankInfo>[] probes = [.. watched.Select(r => Probe(r.Grain))];
                await ((Task)Task.WhenAll(probes)).ConfigureAwait(ConfigureAwaitOptions.ContinueOnCapturedContext | ConfigureAwaitOptions.SuppressThrowing);
                stepDone.ThrowIfCancellationRequested();
                List<int> lost = [];
                for (int i = 0; i < watched.Length; i++)
                {
                    if (probes[i].IsCompletedSuccessfully)
                    {
                        missed.Remove(watched[i].Rank);
                        continue;
                    }

                    missed[watched[i].Rank] = missed.GetValueOrDefault(watched[i].Rank) + 1;
                    if (probes[i].Exception?.GetBaseException() is not TimeoutException || missed[watched[i].Rank] >= 2)
                    {
                        lost.Add(watched[i].Rank);
                    }
                }

                if (lost.Count > 0 && lost.Count < ranks.Length)
                {
                    return [.. lost];
                }

                await Task.Delay(WatchPeriod, stepDone).ConfigureAwait(true);
            }
        }
        catch (OperationCanceledException)
        {
        }

        await Task.Delay(Timeout.Infinite, stepDone).ConfigureAwait(ConfigureAwaitOptions.ContinueOnCapturedContext | ConfigureAwaitOptions.SuppressThrowing);
        return [];
    }

    /// <summary>A liveness probe: the rank's description within a second (it interleaves with a step in progress), else a timeout.</summary>
    private static Task<RankInfo> Probe(IRankControl rank) => rank.DescribeAsync().WaitAsync(TimeSpan.FromSeconds(1));

    private static long Ms(long from, long to) => (long)Stopwatch.GetElapsedTime(from, to).TotalMilliseconds;

    private static async Task WhenFirstFailure(Task<RankStepReport>[] calls)
    {
        HashSet<Task<RankStepReport>> pending = [.. calls];
        while (pending.Count > 0)
        {
            Task<RankStepReport> done = await Task.WhenAny(pending).ConfigureAwait(true);
            if (!done.IsCompletedSuccessfully || !done.Result.Succeeded)
            {
                return;
            }

            pending.Remove(done);
        }

        await Task.Delay(Timeout.Infinite).ConfigureAwait(true); // all succeeded: let WhenAll win
    }

    private async Task FormAsync()
    {
        LayerSpec s = RequireSpec();
        long newEpoch = epoch + 1;
        (int Rank, IRankControl Grain)[] ranks = Serving(s);
        int[] mask = masked;
        if (mask.Length == 0)
        {
            await BootstrapGpusAsync(s, ranks).ConfigureAwait(true);
        }

        Task[] creates = [.. ranks.Select(r => mask.Length == 0 ? r.Grain.CreateLayerAsync(Key.Layer, s, newEpoch) : r.Grain.CreateMaskedLayerAsync(Key.Layer, s, newEpoch, mask))];
        Task all = Task.WhenAll(creates);
        await Task.WhenAny(all, Task.Delay(s.StepTimeout)).ConfigureAwait(true);
        List<string> errors = [];
        List<int> missing = [];
        for (int i = 0; i < creates.Length; i++)
        {
            if (!creates[i].IsCompletedSuccessfully)
            {
                missing.Add(ranks[i].Rank);
                errors.Add($"rank {ranks[i].Rank}: {(creates[i].IsFaulted ? RemoteFailure.Describe(creates[i].Exception!) : $"did not answer within {s.StepTimeout.TotalSeconds:0.#} s")}");
            }
        }

        epoch = newEpoch;
        if (errors.Count > 0)
        {
            formed = false;
            throw new GroupStepFailedException($"group '{Key.Group}' could not form layer '{Key.Layer}': {string.Join("; ", errors)}", nextStep + 1, [.. missing]);
        }

        formed = true;
        LogFormed(logger, Key.Layer, Key.Group, ranks.Length, epoch);
        if (s.OnLostRank == LostRankPolicy.Mask)
        {
            watchTimer ??= this.RegisterGrainTimer(WatchAsync, new GrainTimerCreationOptions(WatchPeriod, WatchPeriod) { Interleave = false, KeepAlive = false });
        }
    }

    private static readonly TimeSpan WatchPeriod = TimeSpan.FromMilliseconds(250);

    /// <summary>
    /// A masking layer does not wait for a step to find a lost rank: while a client steps it (a step begun within the
    /// step bound), every serving rank is probed back to back (1 s a probe; DescribeAsync interleaves with a step, so a
    /// busy rank answers). A rank that could not be reached, or that missed two probes in a row, is lost: the layer
    /// re-forms on the survivors at once (a new epoch), whether or not a step is begun. A rank cut off or stalled between
    /// steps is so masked within about 3 s of the loss, while the client's staging to it is still waiting (before, it was
    /// masked only once that staging gave up, T + 1 s, and a probe confirmed it, 1 s more); a client whose messages to the
    /// coordinator went through the lost rank's silo (its gateway) finds the layer re-formed once it gets through. The
    /// timer does not interleave: it never runs inside a step, whose own failure path masks a rank lost mid-step.
    /// </summary>
    private async Task WatchAsync(CancellationToken cancellationToken)
    {
        if (spec is not { OnLostRank: LostRankPolicy.Mask } s || !formed || !ActiveClients(s).Any())
        {
            watch = null;
            missedProbes.Clear();
            return;
        }

        if (watch is { } w)
        {
            if (!w.Calls.All(c => c.IsCompleted))
            {
                return;
            }

            watch = null;
            if (w.Epoch != epoch)
            {
                missedProbes.Clear();
            }
            else
            {
                List<int> lost = [];
                for (int i = 0; i < w.Ranks.Length; i++)
                {
                    int rank = w.Ranks[i];
                    if (w.Calls[i].IsCompletedSuccessfully)
                    {
                        missedProbes.Remove(rank);
                        continue;
                    }

                    bool silent = w.Calls[i].Exception?.GetBaseException() is TimeoutException;
                    missedProbes[rank] = missedProbes.GetValueOrDefault(rank) + 1;
                    if (!silent || missedProbes[rank] >= 2)
                    {
                        lost.Add(rank);
                    }
                }

                (int Rank, IRankControl Grain)[] serving = Serving(s);
                int[] confirmed = [.. lost.Where(r => serving.Any(x => x.Rank == r)).Order()];
                if (confirmed.Length > 0 && confirmed.Length < serving.Length)
                {
                    // A step begun on the old group is refused by its epoch when it is run; abandoning it changes nothing.
                    missedProbes.Clear();
                    LogStepFailed(logger, $"layer '{Key.Layer}': ranks {string.Join(", ", confirmed)} could not be reached or missed two liveness probes (1 s each){await MaskAsync(s, confirmed).ConfigureAwait(true)}");
                    return;
                }
            }
        }

        (int Rank, IRankControl Grain)[] watched = Serving(s);
        watch = ([.. watched.Select(r => Probe(r.Grain))], [.. watched.Select(r => r.Rank)], epoch);
    }

    /// <summary>
    /// Masks <paramref name="lost"/> and re-forms the layer on the survivors at once (a rank that cannot take its layer
    /// either is masked too). Returns what to add to the step's error: which ranks are masked now, or why not.
    /// </summary>
    private async Task<string> MaskAsync(LayerSpec s, int[] lost)
    {
        masked = [.. masked.Union(lost).Order()];
        probe = null;
        for (int attempt = 0; attempt < s.WorldSize; attempt++)
        {
            if (masked.Length >= s.WorldSize)
            {
                masked = [];
                return "; every rank is lost: nothing left to mask, the next step re-forms the whole group";
            }

            try
            {
                await FormAsync().ConfigureAwait(true);
                LogMasked(logger, Key.Layer, string.Join(", ", masked));
                return $"; masking ranks {string.Join(", ", masked)}: the layer re-formed on ranks {string.Join(", ", Serving(s).Select(r => r.Rank))} (epoch {epoch}), their slots count as dropped until they are back";
            }
            catch (GroupStepFailedException e) when (e.BlamedRanks.Length > 0)
            {
                masked = [.. masked.Union(e.BlamedRanks).Order()];
            }
        }

        return "; the survivors could not re-form: the next step tries again";
    }

    /// <summary>
    /// At a step boundary: a masked rank that answered the last probe is back, and the layer re-forms with it (the
    /// whole group once none is left out). A rank that answers but cannot take its layer stays masked. Probes run in
    /// the background, one at a time, so a rank that is still cut off costs no step any time.
    /// </summary>
    private async Task ReadmitReturnedRanksAsync(LayerSpec s)
    {
        if (probe is { } p && p.Calls.All(c => c.IsCompleted))
        {
            int[] back = [.. p.Ranks.Where((_, i) => p.Calls[i].IsCompletedSuccessfully)];
            probe = null;
            if (back.Length > 0)
            {
                int[] before = masked;
                masked = [.. masked.Except(back)];
                try
                {
                    await FormAsync().ConfigureAwait(true);
                    LogReadmitted(logger, Key.Layer, string.Join(", ", back), epoch);
                    return;
                }
                catch (GroupStepFailedException e)
                {
                    // Those that could not take their layer stay masked (and any other rank that failed to).
                    masked = [.. before.Except(back).Union(e.BlamedRanks).Order()];
                    if (masked.Length == 0)
                    {
                        masked = before;
                    }

                    await MaskAsync(s, []).ConfigureAwait(true);
                    return;
                }
            }
        }

        if (probe is null || Stopwatch.GetElapsedTime(probe.Value.Started) > TimeSpan.FromSeconds(2))
        {
            int[] which = masked;
            Task<RankInfo>[] calls = [.. which.Select(r => GrainFactory.GetGrain<IRankControl>(GrainKeys.Rank(Key.Group, r)).DescribeAsync().WaitAsync(TimeSpan.FromSeconds(1)))];
            probe = (calls, which, Stopwatch.GetTimestamp());
        }
    }

    /// <summary>
    /// On the CUDA backend every rank must join one NVSHMEM job before layers (symmetric buffers) exist:
    /// rank 0 makes the unique id, this grain hands it to every rank, and all initialize together.
    /// </summary>
    private async Task BootstrapGpusAsync(LayerSpec s, (int Rank, IRankControl Grain)[] ranks)
    {
        Task<RankInfo>[] describe = [.. ranks.Select(r => r.Grain.DescribeAsync())];
        await Task.WhenAny(Task.WhenAll(describe), Task.Delay(s.StepTimeout)).ConfigureAwait(true);
        int[] silent = [.. ranks.Where((_, i) => !describe[i].IsCompletedSuccessfully).Select(r => r.Rank)];
        if (silent.Length > 0)
        {
            string why = string.Join("; ", silent.Select(r => $"rank {r}: {(describe[r].IsFaulted ? RemoteFailure.Describe(describe[r].Exception!) : "no answer")}"));
            throw new GroupStepFailedException($"group '{Key.Group}' could not form layer '{Key.Layer}': {why}", nextStep + 1, silent);
        }

        RankInfo[] infos = [.. describe.Select(d => d.Result)];
        int[] cuda = [.. infos.Where(i => i.Backend == EpBackendKind.Cuda).Select(i => i.Rank)];
        if (cuda.Length == 0)
        {
            return;
        }

        if (s.OnLostRank == LostRankPolicy.Mask)
        {
            throw new GroupStepFailedException(
                $"layer '{Key.Layer}' asks to mask lost ranks, but group '{Key.Group}' runs the cuda backend: a CUDA group is one NVSHMEM job whose symmetric buffers span every rank, so it cannot re-form on a part of them (use LostRankPolicy.FailAndReform)",
                nextStep + 1,
                []);
        }

        if (cuda.Length != infos.Length)
        {
            int[] cpu = [.. infos.Select(i => i.Rank).Except(cuda)];
            throw new GroupStepFailedException($"group '{Key.Group}' mixes backends: ranks {string.Join(", ", cuda)} run cuda, ranks {string.Join(", ", cpu)} do not", nextStep + 1, cpu);
        }

        if (StaleGpuJobs(infos) is (int[] stale, string reason))
        {
            Task[] restarts = [.. ranks.Where(r => stale.Contains(r.Rank)).Select(r => r.Grain.RestartForFreshGpuJobAsync(reason))];
            try
            {
                await Task.WhenAll(restarts).WaitAsync(TimeSpan.FromSeconds(5)).ConfigureAwait(true);
            }
            catch (Exception e) when (e is TimeoutException or OrleansException or NoSiloForRankException)
            {
                // A rank that cannot be told is gone already; it comes back fresh.
            }

            LogRestarting(logger, Key.Group, string.Join(", ", stale), reason);
            throw new GroupStepFailedException(
                $"group '{Key.Group}' needs a fresh NVSHMEM job ({reason}): ranks {string.Join(", ", stale)} are restarting their processes (exit code 75 for their supervisor); retry once they are back",
                nextStep + 1,
                stale);
        }

        if (infos.All(i => i.GpuInitialized))
        {
            return; // one job, every rank in it
        }

        byte[] uid = await ranks[0].Grain.CreateUniqueIdAsync().WaitAsync(s.StepTimeout).ConfigureAwait(true);
        Task[] joins = [.. ranks.Select(r => r.Grain.InitializeGpuAsync(uid, s.WorldSize))];
        await Task.WhenAny(Task.WhenAll(joins), Task.Delay(TimeSpan.FromSeconds(90))).ConfigureAwait(true);
        int[] failed = [.. ranks.Where((_, i) => !joins[i].IsCompletedSuccessfully).Select(r => r.Rank)];
        if (failed.Length > 0)
        {
            string why = string.Join("; ", failed.Select(r => $"rank {r}: {(joins[r].IsFaulted ? RemoteFailure.Describe(joins[r].Exception!) : "did not join within 90 s")}"));
            throw new GroupStepFailedException($"group '{Key.Group}' could not bootstrap NVSHMEM: {why}", nextStep + 1, failed);
        }

        LogBootstrapped(logger, Key.Group, s.WorldSize);
    }

    [LoggerMessage(Level = LogLevel.Warning, Message = "group {Group}: ranks {Ranks} restart for a fresh NVSHMEM job: {Reason}")]
    private static partial void LogRestarting(ILogger logger, string group, string ranks, string reason);

    [LoggerMessage(Level = LogLevel.Information, Message = "group {Group}: {World} ranks joined NVSHMEM")]
    private static partial void LogBootstrapped(ILogger logger, string group, int world);

    /// <summary>
    /// Ranks that joined an NVSHMEM job while others have not (a process restarted), or that joined different jobs,
    /// hold a job that lost members. NVSHMEM cannot be initialized twice in a process: those ranks must restart (their
    /// supervisor starts them again) so that every rank joins one fresh job at the next try. Null when the ranks are
    /// all in one job, or none is in any.
    /// </summary>
    internal static (int[] Stale, string Reason)? StaleGpuJobs(IReadOnlyList<RankInfo> infos)
    {
        string?[] jobs = [.. infos.Where(i => i.GpuInitialized).Select(i => i.GpuJob).Distinct()];
        if (!infos.Any(i => i.GpuInitialized) || (jobs.Length == 1 && infos.All(i => i.GpuInitialized)))
        {
            return null;
        }

        int[] stale = [.. infos.Where(i => i.GpuInitialized).Select(i => i.Rank)];
        int[] fresh = [.. infos.Where(i => !i.GpuInitialized).Select(i => i.Rank)];
        string reason = fresh.Length > 0
            ? $"ranks {string.Join(", ", fresh)} restarted and hold no NVSHMEM job"
            : $"the ranks hold {jobs.Length} different NVSHMEM jobs";
        return (stale, reason);
    }

    private async Task AbortAllAsync((int Rank, IRankControl Grain)[] ranks, string reason)
    {
        Task[] aborts = [.. ranks.Select(r => r.Grain.AbortAsync(Key.Layer, epoch, reason))];
        try
        {
            await Task.WhenAll(aborts).WaitAsync(TimeSpan.FromSeconds(2)).ConfigureAwait(true);
        }
        catch (Exception e) when (e is TimeoutException or OrleansException or NoSiloForRankException or InvalidOperationException)
        {
            // A rank that cannot be reached is the one that failed; the others were told.
        }
    }

    /// <summary>Clients that began a step within the step bound of <paramref name="s"/>, most recent first.</summary>
    private IEnumerable<(string Client, TimeSpan Age)> ActiveClients(LayerSpec s)
    {
        TimeSpan bound = (s.StepTimeout * 2) + TimeSpan.FromSeconds(1);
        return steppedBy
            .Select(c => (c.Key, Stopwatch.GetElapsedTime(c.Value)))
            .Where(c => c.Item2 < bound)
            .OrderBy(c => c.Item2);
    }

    private static string Describe(LayerSpec s) =>
        $"NumExperts {s.NumExperts}, Hidden {s.Hidden}, TopK {s.TopK}, MaxTokens {s.MaxTokens}, WorldSize {s.WorldSize}, {s.TokenType}";

    /// <summary>The ranks that run steps now: every rank, or the survivors while ranks are masked.</summary>
    private (int Rank, IRankControl Grain)[] Serving(LayerSpec s) => [.. Ranks(s).Where(r => !masked.Contains(r.Rank))];

    /// <summary>
    /// Every rank of the group and its grain. The references are made once per world size: Orleans resolves a grain
    /// interface's type through its attributes on every GetGrain, which showed in a profile of the step path.
    /// </summary>
    private (int Rank, IRankControl Grain)[] Ranks(LayerSpec s)
    {
        if (rankGrains.Length != s.WorldSize)
        {
            rankGrains = [.. Enumerable.Range(0, s.WorldSize).Select(r => (r, GrainFactory.GetGrain<IRankControl>(GrainKeys.Rank(Key.Group, r))))];
        }

        return [.. rankGrains];
    }

    private LayerSpec RequireSpec() =>
        spec ?? throw new InvalidOperationException($"layer '{this.GetPrimaryKeyString()}' is not configured: call ConfigureAsync first");

    [LoggerMessage(Level = LogLevel.Information, Message = "layer {Layer} of group {Group} formed over {World} ranks, epoch {Epoch}")]
    private static partial void LogFormed(ILogger logger, string layer, string group, int world, long epoch);

    [LoggerMessage(Level = LogLevel.Warning, Message = "layer {Layer}: masking lost ranks {Ranks}")]
    private static partial void LogMasked(ILogger logger, string layer, string ranks);

    [LoggerMessage(Level = LogLevel.Information, Message = "layer {Layer}: ranks {Ranks} are back and re-admitted (epoch {Epoch})")]
    private static partial void LogReadmitted(ILogger logger, string layer, string ranks, long epoch);

    [LoggerMessage(Level = LogLevel.Warning, Message = "layer {Layer}: step {Step} masked its lost ranks: first failure {Failed} ms into the step, lost ranks confirmed at {Confirmed} ms, re-formed on the survivors at {Reformed} ms")]
    private static partial void LogMaskTiming(ILogger logger, string layer, long step, long failed, long confirmed, long reformed);

    [LoggerMessage(Level = LogLevel.Warning, Message = "coordinator {Key} deactivated on this silo, step in progress {Step} ({Code}: {Description})")]
    private static partial void LogDeactivated(ILogger logger, string key, long? step, string code, string description);

    [LoggerMessage(Level = LogLevel.Warning, Message = "{Message}")]
    private static partial void LogStepFailed(ILogger logger, string message);
}

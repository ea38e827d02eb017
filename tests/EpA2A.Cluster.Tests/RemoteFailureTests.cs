using EpA2A.Grains;

namespace EpA2A.Cluster.Tests;

/// <summary>The one line a failed grain call is reported in (issue 18): the cause, named by kind, without Orleans' request dumps.</summary>
public sealed class RemoteFailureTests
{
    private const string Request = "Request [S127.0.0.1:22768:155548657 expertlayer/g/layer]->[S127.0.0.1:28810:155548655 rank/g/2] EpA2A.Grains.IRankGrain.RunStepAsync(System.String, EpA2A.Grains.StepTicket, System.Boolean) #126E5EC9FCCDAB2C";

    [Fact]
    public void A_lost_silo_is_named_as_such_without_the_request_or_the_help_link()
    {
        SiloUnavailableException e = new($"The target silo became unavailable for message: {Request}. See https://aka.ms/orleans-troubleshooting for troubleshooting help.");
        Assert.Equal("silo lost: the silo serving the call became unavailable", RemoteFailure.Describe(new AggregateException(e)));
    }

    [Fact]
    public void An_orleans_timeout_keeps_its_bound_and_drops_the_request()
    {
        TimeoutException e = new($"Response did not arrive on time in 00:00:10 for message: {Request}. Target History is: <S127.0.0.1:28810:155548655:*grn/rank/g/2>. About to break its promise.");
        string line = RemoteFailure.Describe(e);
        Assert.StartsWith("timeout: Response did not arrive on time in 00:00:10", line, StringComparison.Ordinal);
        Assert.DoesNotContain("Request [", line, StringComparison.Ordinal);
        Assert.DoesNotContain("Target History", line, StringComparison.Ordinal);
    }

    [Fact]
    public void A_message_carrying_a_stack_trace_or_a_nested_exception_keeps_only_its_meaning()
    {
        string dump = "rank 3: bad input: expertIds[0, 1] = 99 is outside [0, 8] ---> System.ArgumentException: inner\n   at EpA2A.Layer.EpAll2AllLayer.Dispatch()\n--- End of stack trace from previous location ---\n   at Orleans.Runtime.GrainMethodInvoker.Invoke()";
        Assert.Equal("rank 3: bad input: expertIds[0, 1] = 99 is outside [0, 8]", RemoteFailure.Clean(dump));
    }

    [Fact]
    public void A_message_of_meaning_passes_unchanged()
    {
        const string Meaning = "rank 1 did not deliver CombineRows for operation 2 within 2 s";
        Assert.Equal(Meaning, RemoteFailure.Describe(new InvalidOperationException(Meaning)));
    }
}

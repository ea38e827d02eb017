using EpA2A.Backends.Cuda;

namespace EpA2A.Cuda;

/// <summary>A libepa2a call failed; the message names the call, the status and the library's explanation.</summary>
public sealed class NativeCallException : Exception
{
    internal NativeCallException(string call, NativeCode code, string detail)
        : base($"{call} failed ({code}): {detail}")
    {
        Call = call;
        Code = (int)code;
    }

    /// <summary>Creates the exception.</summary>
    public NativeCallException()
    {
        Call = string.Empty;
    }

    /// <summary>Creates the exception.</summary>
    public NativeCallException(string message)
        : base(message)
    {
        Call = string.Empty;
    }

    /// <summary>Creates the exception.</summary>
    public NativeCallException(string message, Exception inner)
        : base(message, inner)
    {
        Call = string.Empty;
    }

    /// <summary>The native function.</summary>
    public string Call { get; }

    /// <summary>libepa2a's status code.</summary>
    public int Code { get; }
}

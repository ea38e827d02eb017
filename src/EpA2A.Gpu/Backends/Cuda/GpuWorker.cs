using System.Collections.Concurrent;

namespace EpA2A.Backends.Cuda;

/// <summary>
/// The one thread of a process on which every blocking CUDA/NVSHMEM call runs. The CUDA device is selected
/// on it (per-thread state), libepa2a's last error is per thread, and a collective call or a host poll may
/// block for a whole step: none of that may happen on the thread pool or the Orleans scheduler. Async callers
/// await a task that completes off this thread (continuations never run here).
/// </summary>
internal sealed class GpuWorker : IDisposable
{
    private readonly BlockingCollection<Action> queue = [];
    private readonly Thread thread;

    public GpuWorker(string name)
    {
        thread = new Thread(Loop) { IsBackground = true, Name = name };
        thread.Start();
    }

    /// <summary>True on the worker thread itself (work posted from there runs inline).</summary>
    public bool IsCurrentThread => Environment.CurrentManagedThreadId == thread.ManagedThreadId;

    /// <summary>Runs <paramref name="work"/> on the worker; the task completes off the worker thread.</summary>
    public Task<T> RunAsync<T>(Func<T> work)
    {
        TaskCompletionSource<T> done = new(TaskCreationOptions.RunContinuationsAsynchronously);
        void Item()
        {
            try
            {
                done.SetResult(work());
            }
            catch (Exception e)
            {
                done.SetException(e);
            }
        }

        if (IsCurrentThread)
        {
            Item();
        }
        else if (!TryAdd(Item))
        {
            done.SetException(new ObjectDisposedException(thread.Name, "the GPU worker has been shut down (the NVSHMEM runtime was disposed)"));
        }

        return done.Task;
    }

    /// <summary>Runs <paramref name="work"/> on the worker.</summary>
    public Task RunAsync(Action work) => RunAsync(() =>
    {
        work();
        return true;
    });

    /// <summary>
    /// Runs <paramref name="work"/> on the worker and blocks the caller until it is done. Only for synchronous
    /// paths that cannot be async (construction, Dispose); inline when already on the worker.
    /// </summary>
    public T Run<T>(Func<T> work) => IsCurrentThread ? work() : RunAsync(work).GetAwaiter().GetResult();

    /// <summary>Queues <paramref name="work"/> without waiting (handle release); false once the worker is shut down.</summary>
    public bool Post(Action work)
    {
        if (IsCurrentThread)
        {
            work();
            return true;
        }

        return TryAdd(work);
    }

    /// <summary>Lets queued work finish, then ends the thread.</summary>
    public void Dispose()
    {
        try
        {
            queue.CompleteAdding();
        }
        catch (ObjectDisposedException)
        {
            return;
        }

        if (!IsCurrentThread)
        {
            thread.Join();
            queue.Dispose();
        }
    }

    private bool TryAdd(Action work)
    {
        try
        {
            return queue.TryAdd(work);
        }
        catch (Exception e) when (e is InvalidOperationException or ObjectDisposedException)
        {
            return false;
        }
    }

    private void Loop()
    {
        foreach (Action work in queue.GetConsumingEnumerable())
        {
            try
            {
                work();
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                // Items that report results catch their own exceptions; a posted release that fails is ignored.
            }
        }
    }
}

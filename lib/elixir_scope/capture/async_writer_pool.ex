defmodule ElixirScope.Capture.AsyncWriterPool do
  @moduledoc """
  The pool of writers that drain a ring buffer into the correlator and the
  store. The draining is done by native threads; each thread is *owned* by
  one Elixir worker process (`AsyncWriterPool.Worker`, one per worker) that
  stands for it: the pool supervises those processes, `get_state/1`'s
  `workers` are their pids, and the thread drains its shards only while
  its process lives.

  Two ways to run it:

    * inside a `PipelineManager` (the usual way; the manager starts it over
      its own sharded ring);
    * standalone: `start_link(ring_buffer: buf, pool_size: 4)` drains an
      existing `%RingBuffer{}` into a pipeline store of its own
      (`data_access/1`); without `:ring_buffer` (or with `ring_buffer:
      nil`) it creates a pipeline (`ring_buffer/1` is where to write).
      Stopping a standalone pool drains and stops its workers.

  ## Work partitioning

  The ring is split into shards (a process's events always go to one
  shard). Worker `w` of `n` drains shards `w, w + n, w + 2n, ...` (its
  segment); a shard is drained by one worker at a time, each event is
  processed once, in per-shard order. `scale_pool/2` moves shards between
  workers at batch boundaries, so a new worker continues where the shard
  stands, never from position 0. A standalone pool over a plain (one-shard)
  `%RingBuffer{}` has one shard: more workers add no parallelism there.

  ## Worker processes

  A worker process holds its thread's *lease* (the thread's native
  monitor of the process). When the process dies — killed, or crashed —
  the thread finishes the batch it is in and parks, leaving its shards'
  events in the ring at their cursors; the pool restarts the process at the
  same index (a new pid in the same place of `workers`), which takes the
  lease over, and the thread resumes each shard where it stands: nothing
  is lost, repeated or reordered, and the worker's counters (`events_read`,
  `current_position`, ... in `AsyncWriter.get_state/1`, which a worker
  answers) go on from where they were. Events written meanwhile wait in
  the ring (its overflow strategy applies if it fills). When the native
  pool is resized from elsewhere (`PipelineManager.update_config/2`), new
  threads run at once and the pool adds or retires their processes within
  100 ms. A worker stopped on purpose (scaling down, the pool stopping)
  gives its lease back first, so its thread never parks for it; once the
  pipeline shuts down, every thread drains regardless.

  A stage that fails while processing a batch is caught, the worker
  carries on (counted in `total_errors` and its `error_count`); the batch
  is retried once, then dead-lettered (counted; see
  `PipelineManager.dead_letters/2`).
  """
  use GenServer

  alias ElixirScope.Capture.{Pipeline, RingBuffer}
  alias ElixirScope.Capture.AsyncWriterPool.Worker
  alias ElixirScope.{Native, Utils}
  alias ElixirScope.Storage.DataAccess

  @writer_keys [:batch_size, :poll_interval_ms, :max_backlog]
  # How often the pool compares its processes with the native workers.
  @reconcile_ms 100

  @doc """
  Starts the pool. Options (keyword list or map): `pool_size: 4`,
  `batch_size: 50`, `poll_interval_ms` (idle park time, default 1),
  `max_backlog: 1000` (health threshold), `ring_buffer:` (standalone: the
  ring to drain; nil: a new one), `name:`, and any `PipelineManager`
  sizing option for a standalone pool (`max_events`, `shards`, ...).
  """
  @spec start_link(keyword() | map()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    opts = Pipeline.to_map!(opts, "AsyncWriterPool")
    {name, opts} = Map.pop(opts, :name)
    gen_opts = if name, do: [name: name], else: []

    case Map.fetch(opts, :pipeline) do
      {:ok, %Pipeline{} = p} ->
        GenServer.start_link(__MODULE__, {:attached, p, opts}, gen_opts)

      :error ->
        config = standalone_config!(opts)

        case Pipeline.start(config, Map.get(opts, :ring_buffer), name) do
          {:ok, p} -> GenServer.start_link(__MODULE__, {:owned, p, opts}, gen_opts)
          {:error, _} = err -> err
        end
    end
  end

  defp standalone_config!(opts) do
    {pool_size, opts} = Map.pop(opts, :pool_size, 4)
    {poll, opts} = Map.pop(opts, :poll_interval_ms)
    {ring, opts} = Map.pop(opts, :ring_buffer)

    case ring do
      nil -> :ok
      %RingBuffer{} -> :ok
      other -> RingBuffer.bad_buffer!(other)
    end

    opts = Map.drop(opts, [:max_backlog])
    config = Map.put(opts, :async_writer_pool_size, pool_size)
    config = if poll, do: Map.put(config, :flush_interval_us, poll * 1000), else: config
    Pipeline.validate!(config)
  end

  @doc """
  `%{config, workers, worker_assignments, shard_assignments,
  worker_monitors, start_time, pool_size, shards, mode, restarts,
  ring_buffer, data_access, uptime_ms}`. As in the original: `workers` are
  the worker processes' pids (in worker-index order),
  `worker_assignments` is `%{pid => index}` (`get_worker_assignments/1`),
  `worker_monitors` is `%{pid => monitor reference}` (the pool monitors
  its workers), `start_time` is when the pool started
  (`ElixirScope.Utils.monotonic_timestamp/0`, ns) and `config` has
  `pool_size`, `ring_buffer`, `batch_size`, `poll_interval_ms` (the idle
  park time) and `max_backlog`. Ours: `shard_assignments` is `%{index =>
  [shard]}` (`get_shard_assignments/1`: worker `i`, the pid at
  `Enum.at(workers, i)`, drains those shards).
  """
  @spec get_state(GenServer.server()) :: map()
  def get_state(pool), do: GenServer.call(pool, :get_state)

  @doc "Resizes the pool to `n` workers (1..64), threads and processes: `:ok`."
  @spec scale_pool(GenServer.server(), pos_integer()) :: :ok
  def scale_pool(pool, n) when is_integer(n) and n >= 1 and n <= 64,
    do: GenServer.call(pool, {:scale, n}, :infinity)

  def scale_pool(_pool, n),
    do: raise(ArgumentError, "pool size must be an integer in 1..64, got: #{inspect(n)}")

  @doc """
  `%{total_events_read, total_events_processed, total_batches_processed,
  average_processing_rate, total_errors, worker_count, dead_lettered,
  per_worker}`; `average_processing_rate` is events/s since start;
  `per_worker` is `%{index => %{pid, events, batches, errors}}`.
  """
  @spec get_metrics(GenServer.server()) :: map()
  def get_metrics(pool), do: GenServer.call(pool, :get_metrics)

  @doc """
  `%{worker_pid => worker_index}`, the original's shape: each worker
  process and its index (see `get_shard_assignments/1` for what an index
  drains).
  """
  @spec get_worker_assignments(GenServer.server()) :: %{pid() => non_neg_integer()}
  def get_worker_assignments(pool), do: GenServer.call(pool, :get_state).worker_assignments

  @doc """
  `%{worker_index => [shard_index]}`: which worker drains which shards
  (worker `w` of `n` drains shards `w, w + n, ...`; see "Work
  partitioning").
  """
  @spec get_shard_assignments(GenServer.server()) :: %{non_neg_integer() => [non_neg_integer()]}
  def get_shard_assignments(pool), do: GenServer.call(pool, :get_state).shard_assignments

  @doc """
  `%{status: :healthy | :degraded, worker_count, healthy_workers,
  failed_workers, uptime_ms}`. A worker is healthy while its process lives
  and holds its thread's lease; `:degraded` also when batches were
  dead-lettered or the backlog exceeds `:max_backlog`.
  """
  @spec health_check(GenServer.server()) :: map()
  def health_check(pool), do: GenServer.call(pool, :health)

  @doc "The `%RingBuffer{}` this pool drains."
  @spec ring_buffer(GenServer.server()) :: RingBuffer.t()
  def ring_buffer(pool), do: GenServer.call(pool, :pipeline).ring_buffer

  @doc "A read-only `%DataAccess{}` over the store the pool writes to."
  @spec data_access(GenServer.server()) :: DataAccess.t()
  def data_access(pool), do: GenServer.call(pool, :pipeline).data_access

  @doc "Waits until everything written so far is stored: `:ok | {:error, :timeout}`."
  @spec flush(GenServer.server(), non_neg_integer()) :: :ok | {:error, :timeout}
  def flush(pool, timeout_ms \\ 5000)

  def flush(pool, timeout_ms) when is_integer(timeout_ms) and timeout_ms >= 0 do
    p = GenServer.call(pool, :pipeline)
    if Native.pipe_flush(p.pipe, timeout_ms), do: :ok, else: {:error, :timeout}
  end

  def flush(_pool, timeout_ms),
    do:
      raise(ArgumentError, "timeout must be a non-negative integer, got: #{inspect(timeout_ms)}")

  @doc """
  Stops the pool and its worker processes (a standalone pool drains and
  stops its threads first): `:ok`.
  """
  @spec stop(GenServer.server()) :: :ok
  def stop(pool), do: GenServer.stop(pool, :normal, :infinity)

  # ---------------------------------------------------------------------------

  @impl GenServer
  def init({mode, pipeline, opts}) do
    Process.flag(:trap_exit, true)
    size = pipeline.config.async_writer_pool_size

    writer =
      opts
      |> Map.take(@writer_keys)
      |> Map.put_new(:batch_size, pipeline.config.batch_size)
      |> Map.put_new(:max_backlog, 1000)
      |> Map.put_new(:poll_interval_ms, div(pipeline.config.flush_interval_us + 999, 1000))
      |> Map.put(:ring_buffer, pipeline.ring_buffer)

    s = %{
      mode: mode,
      pipeline: pipeline,
      config: Map.merge(writer, %{pool_size: size}),
      started_at: System.monotonic_time(:millisecond),
      start_time: Utils.monotonic_timestamp(),
      # index => pid, pid => index, and pid => monitor
      workers: %{},
      indexes: %{},
      monitors: %{},
      restarts: 0
    }

    Process.send_after(self(), :reconcile, @reconcile_ms)
    {:ok, reconcile(s)}
  end

  @impl GenServer
  def handle_call(:pipeline, _from, s), do: {:reply, s.pipeline, s}

  def handle_call(:get_state, _from, s) do
    s = reconcile(s)
    {n, _per, positions} = Native.pipe_workers(s.pipeline.pipe)
    shards = length(positions)

    {:reply,
     %{
       config: s.config,
       workers: worker_pids(s),
       worker_assignments: s.indexes,
       shard_assignments: assignments(n, shards),
       worker_monitors: s.monitors,
       start_time: s.start_time,
       pool_size: n,
       shards: shards,
       mode: s.mode,
       restarts: s.restarts,
       ring_buffer: s.pipeline.ring_buffer,
       data_access: s.pipeline.data_access,
       uptime_ms: uptime(s)
     }, s}
  end

  def handle_call({:scale, n}, _from, s) do
    :ok = Native.pipe_scale(s.pipeline.pipe, n)
    {:reply, :ok, reconcile(put_in(s.config.pool_size, n))}
  end

  def handle_call(:get_metrics, _from, s) do
    s = reconcile(s)
    m = Native.pipe_metrics(s.pipeline.pipe)
    {_n, per, _positions} = Native.pipe_workers(s.pipeline.pipe)
    secs = max(uptime(s), 1) / 1000

    {:reply,
     %{
       # Consumed from the ring: processed or dead-lettered.
       total_events_read: m.pool.events_processed + m.pool.dead_lettered_events,
       total_events_processed: m.pool.events_processed,
       total_batches_processed: m.pool.batches,
       average_processing_rate: m.pool.events_processed / secs,
       total_errors: m.pool.panics + m.pool.retries,
       worker_count: m.pool.workers,
       dead_lettered: m.pool.dead_lettered_events,
       restarts: s.restarts,
       per_worker:
         per
         |> Enum.with_index()
         |> Map.new(fn {{events, batches, errors, _lease, _last_poll}, i} ->
           {i, %{pid: Map.get(s.workers, i), events: events, batches: batches, errors: errors}}
         end)
     }, s}
  end

  def handle_call(:health, _from, s) do
    s = reconcile(s)
    m = Native.pipe_metrics(s.pipeline.pipe)
    {n, per, _positions} = Native.pipe_workers(s.pipeline.pipe)

    healthy =
      per
      |> Enum.with_index()
      |> Enum.count(fn {{_e, _b, _err, lease, _last_poll}, i} ->
        lease == :held and alive?(Map.get(s.workers, i))
      end)

    status =
      if healthy < n or m.pool.dead_lettered_events > 0 or
           m.accounting.in_flight > s.config.max_backlog,
         do: :degraded,
         else: :healthy

    {:reply,
     %{
       status: status,
       worker_count: n,
       healthy_workers: healthy,
       failed_workers: n - healthy,
       uptime_ms: uptime(s)
     }, s}
  end

  @impl GenServer
  def handle_info(:reconcile, s) do
    Process.send_after(self(), :reconcile, @reconcile_ms)
    {:noreply, reconcile(s)}
  end

  def handle_info({:EXIT, pid, _reason}, s) do
    case Map.pop(s.indexes, pid) do
      {nil, _} ->
        # Not a worker (the pool's parent is handled by GenServer).
        {:noreply, s}

      {index, indexes} ->
        s = %{s | indexes: indexes, workers: Map.delete(s.workers, index)}
        s = demonitor(s, pid)
        # Restart it in its place (its thread resumes its shards), unless
        # the pool shrank meanwhile.
        s = if index < native_workers(s), do: start_worker(s, index, true), else: forget(s, index)
        {:noreply, s}
    end
  end

  def handle_info(_other, s), do: {:noreply, s}

  @impl GenServer
  def terminate(_reason, s) do
    # Stopped on purpose: the workers give their leases back.
    Enum.each(s.workers, fn {_i, pid} -> stop_worker(pid) end)

    if s.mode == :owned do
      _ = Native.pipe_flush(s.pipeline.pipe, 5000)
      _ = Native.pipe_shutdown(s.pipeline.pipe, 5000)
    end

    :ok
  end

  # One process per native worker, by index.
  defp reconcile(s) do
    n = native_workers(s)

    s =
      Enum.reduce(0..(n - 1)//1, s, fn i, s ->
        if Map.has_key?(s.workers, i), do: s, else: start_worker(s, i, false)
      end)

    Enum.reduce(s.workers, s, fn
      {i, pid}, s when i >= n ->
        s = demonitor(s, pid)
        stop_worker(pid)
        %{s | workers: Map.delete(s.workers, i), indexes: Map.delete(s.indexes, pid)}

      _, s ->
        s
    end)
  end

  defp native_workers(s) do
    {n, _per, _positions} = Native.pipe_workers(s.pipeline.pipe)
    n
  rescue
    # The pipeline was shut down under us: no threads to stand for.
    ArgumentError -> 0
  end

  defp start_worker(s, index, restart?) do
    args = %{
      pipeline: s.pipeline,
      index: index,
      config: s.config,
      started_at: s.started_at
    }

    case Worker.start_link(args) do
      {:ok, pid} ->
        s = %{
          s
          | workers: Map.put(s.workers, index, pid),
            indexes: Map.put(s.indexes, pid, index),
            monitors: Map.put(s.monitors, pid, Process.monitor(pid))
        }

        if restart?, do: %{s | restarts: s.restarts + 1}, else: s

      _error ->
        # The pipeline is going away; the next reconcile retries if not.
        s
    end
  end

  defp demonitor(s, pid) do
    {ref, monitors} = Map.pop(s.monitors, pid)
    if ref, do: Process.demonitor(ref, [:flush])
    %{s | monitors: monitors}
  end

  defp stop_worker(pid) do
    Process.unlink(pid)
    GenServer.stop(pid, :normal, 5000)
  catch
    :exit, _ -> :ok
  end

  defp forget(s, index) do
    _ = Native.pipe_worker_forget(s.pipeline.pipe, index)
    s
  rescue
    ArgumentError -> s
  end

  defp worker_pids(s) do
    s.workers |> Enum.sort() |> Enum.map(fn {_i, pid} -> pid end)
  end

  defp alive?(nil), do: false
  defp alive?(pid), do: Process.alive?(pid)

  defp assignments(n, shards) do
    Map.new(0..(n - 1)//1, fn w -> {w, Enum.to_list(w..(shards - 1)//n)} end)
  end

  defp uptime(s), do: System.monotonic_time(:millisecond) - s.started_at
end

defmodule ElixirScope.Capture.AsyncWriterPool.Worker do
  @moduledoc """
  One `AsyncWriterPool` worker: the process that stands for (and owns) one
  native worker thread. It holds the thread's lease: while it lives the
  thread drains its shards; when it dies the thread parks after its batch
  until the pool's replacement takes the lease over (see
  `ElixirScope.Capture.AsyncWriterPool`).

  It answers `AsyncWriter.get_state/1` and `AsyncWriter.get_metrics/1`
  like a standalone writer: `current_position` is the sum of its shards'
  consumption cursors (where its segment stands), `events_read`,
  `events_processed`, `batches_processed` and `error_count` are its
  thread's counters (kept across restarts of the process), `start_time`
  is when this process started and `last_poll_time` when its thread last
  finished a pass over its shards (`start_time` before the first), both on
  `ElixirScope.Utils.monotonic_timestamp/0`'s clock.
  `AsyncWriter.stop/1` stops it; the pool then starts another in its
  place, as for a crash.
  """
  use GenServer

  alias ElixirScope.{Native, Utils}

  @doc false
  def start_link(args), do: GenServer.start_link(__MODULE__, args)

  @impl GenServer
  def init(args) do
    {:ok, lease} = Native.pipe_worker_lease(args.pipeline.pipe, args.index)

    {:ok, Map.merge(args, %{lease: lease, start_time: Utils.monotonic_timestamp()})}
  rescue
    e in ArgumentError -> {:stop, {:pipeline_down, Exception.message(e)}}
  end

  @impl GenServer
  def handle_call(:get_state, _from, s) do
    info = info(s)

    {:reply, Map.merge(info, %{config: s.config, index: s.index, start_time: s.start_time}), s}
  end

  def handle_call(:get_metrics, _from, s) do
    {:reply,
     Map.take(info(s), [
       :events_read,
       :events_processed,
       :batches_processed,
       :processing_rate,
       :error_count
     ]), s}
  end

  @impl GenServer
  def terminate(_reason, s) do
    _ = Native.pipe_worker_release(s.lease)
    :ok
  end

  defp info(s) do
    {n, per, positions} = Native.pipe_workers(s.pipeline.pipe)
    shards = if s.index < n, do: Enum.to_list(s.index..(length(positions) - 1)//n), else: []
    {events, batches, errors, lease, last_poll} = Enum.at(per, s.index, {0, 0, 0, :free, nil})
    position = shards |> Enum.map(&Enum.at(positions, &1)) |> Enum.sum()
    secs = max(System.monotonic_time(:millisecond) - s.started_at, 1) / 1000

    %{
      current_position: position,
      position: position,
      shards: shards,
      lease: lease,
      events_read: events,
      events_processed: events,
      batches_processed: batches,
      processing_rate: events / secs,
      error_count: errors,
      # When its thread last finished a pass over its shards.
      last_poll_time: last_poll || s.start_time
    }
  end
end

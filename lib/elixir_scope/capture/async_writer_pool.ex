defmodule ElixirScope.Capture.AsyncWriterPool do
  @moduledoc """
  The pool of writers that drain a ring buffer into the correlator and the
  store. The writers are native threads (no Elixir process per writer);
  this GenServer is their control surface.

  Two ways to run it:

    * inside a `PipelineManager` (the usual way; the manager starts it over
      its own sharded ring);
    * standalone: `start_link(ring_buffer: buf, pool_size: 4)` drains an
      existing `%RingBuffer{}` into a pipeline store of its own
      (`data_access/1`); without `:ring_buffer` it creates a pipeline
      (`ring_buffer/1` is where to write). Stopping a standalone pool
      drains and stops its workers.

  ## Work partitioning

  The ring is split into shards (a process's events always go to one
  shard). Worker `w` of `n` drains shards `w, w + n, w + 2n, ...`; a shard
  is drained by one worker at a time, each event is processed once, in
  per-shard order. `scale_pool/2` moves shards between workers at batch
  boundaries, so a new worker continues where the shard stands, never from
  position 0. A standalone pool over a plain (one-shard) `%RingBuffer{}`
  has one shard: more workers add no parallelism there.

  A worker that panics while processing a batch is caught and carries on
  (counted in `total_errors`); the batch is retried once, then
  dead-lettered (counted; see `PipelineManager.dead_letters/2`).
  """
  use GenServer

  alias ElixirScope.Capture.{Pipeline, RingBuffer}
  alias ElixirScope.Native
  alias ElixirScope.Storage.DataAccess

  @writer_keys [:batch_size, :poll_interval_ms, :max_backlog]

  @doc """
  Starts the pool. Options (keyword list or map): `pool_size: 4`,
  `batch_size: 50`, `poll_interval_ms` (idle park time, default 1),
  `max_backlog: 1000` (health threshold), `ring_buffer:` (standalone: the
  ring to drain), `name:`, and any `PipelineManager` sizing option for a
  standalone pool (`max_events`, `shards`, ...).
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
  `%{config, workers, worker_assignments, pool_size, shards, ring_buffer,
  data_access, uptime_ms}`; `workers` are the native worker indexes.
  """
  @spec get_state(GenServer.server()) :: map()
  def get_state(pool), do: GenServer.call(pool, :get_state)

  @doc "Resizes the pool to `n` native workers (1..64): `:ok`."
  @spec scale_pool(GenServer.server(), pos_integer()) :: :ok
  def scale_pool(pool, n) when is_integer(n) and n >= 1 and n <= 64,
    do: GenServer.call(pool, {:scale, n}, :infinity)

  def scale_pool(_pool, n),
    do: raise(ArgumentError, "pool size must be an integer in 1..64, got: #{inspect(n)}")

  @doc """
  `%{total_events_read, total_events_processed, total_batches_processed,
  average_processing_rate, total_errors, worker_count, dead_lettered,
  per_worker}`; `average_processing_rate` is events/s since start.
  """
  @spec get_metrics(GenServer.server()) :: map()
  def get_metrics(pool), do: GenServer.call(pool, :get_metrics)

  @doc "`%{worker_index => [shard_index]}`: which worker drains which shards."
  @spec get_worker_assignments(GenServer.server()) :: %{non_neg_integer() => [non_neg_integer()]}
  def get_worker_assignments(pool), do: GenServer.call(pool, :get_state).worker_assignments

  @doc """
  `%{status: :healthy | :degraded, worker_count, healthy_workers,
  failed_workers, uptime_ms}`. Native workers survive panics, so a worker
  counts as failed only while fewer threads run than configured;
  `:degraded` also when batches were dead-lettered or the backlog exceeds
  `:max_backlog`.
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
  def flush(pool, timeout_ms \\ 5000) when is_integer(timeout_ms) and timeout_ms >= 0 do
    p = GenServer.call(pool, :pipeline)
    if Native.pipe_flush(p.pipe, timeout_ms), do: :ok, else: {:error, :timeout}
  end

  @doc "Stops the pool (a standalone pool drains and stops its workers first): `:ok`."
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

    {:ok,
     %{
       mode: mode,
       pipeline: pipeline,
       config: Map.merge(writer, %{pool_size: size}),
       started_at: System.monotonic_time(:millisecond)
     }}
  end

  @impl GenServer
  def handle_call(:pipeline, _from, s), do: {:reply, s.pipeline, s}

  def handle_call(:get_state, _from, s) do
    m = Native.pipe_metrics(s.pipeline.pipe)
    n = m.pool.workers
    shards = m.pool.shards

    {:reply,
     %{
       config: s.config,
       workers: Enum.to_list(0..(n - 1)),
       worker_assignments: assignments(n, shards),
       pool_size: n,
       shards: shards,
       mode: s.mode,
       ring_buffer: s.pipeline.ring_buffer,
       data_access: s.pipeline.data_access,
       uptime_ms: uptime(s)
     }, s}
  end

  def handle_call({:scale, n}, _from, s) do
    :ok = Native.pipe_scale(s.pipeline.pipe, n)
    {:reply, :ok, put_in(s.config.pool_size, n)}
  end

  def handle_call(:get_metrics, _from, s) do
    m = Native.pipe_metrics(s.pipeline.pipe)
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
       per_worker:
         m.pool.per_worker
         |> Enum.with_index()
         |> Map.new(fn {{events, batches}, i} -> {i, %{events: events, batches: batches}} end)
     }, s}
  end

  def handle_call(:health, _from, s) do
    m = Native.pipe_metrics(s.pipeline.pipe)
    configured = s.config.pool_size
    running = min(m.pool.workers, configured)

    status =
      if running < configured or m.pool.dead_lettered_events > 0 or
           m.accounting.in_flight > s.config.max_backlog,
         do: :degraded,
         else: :healthy

    {:reply,
     %{
       status: status,
       worker_count: m.pool.workers,
       healthy_workers: running,
       failed_workers: configured - running,
       uptime_ms: uptime(s)
     }, s}
  end

  @impl GenServer
  def terminate(_reason, %{mode: :owned} = s) do
    _ = Native.pipe_flush(s.pipeline.pipe, 5000)
    _ = Native.pipe_shutdown(s.pipeline.pipe, 5000)
    :ok
  end

  def terminate(_reason, _s), do: :ok

  defp assignments(n, shards) do
    Map.new(0..(n - 1), fn w -> {w, Enum.to_list(w..(shards - 1)//n)} end)
  end

  defp uptime(s), do: System.monotonic_time(:millisecond) - s.started_at
end

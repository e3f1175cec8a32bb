defmodule ElixirScope.Capture.PipelineManager do
  @moduledoc """
  Runs one native capture pipeline: sharded ring buffer → native worker
  pool → correlator → indexed store. A supervisor (of its state server,
  the `AsyncWriterPool`, the pipeline's `QueryCoordinator` server for live
  subscriptions, and its `BackpressureManager`).

      {:ok, pm} = PipelineManager.start_link(name: :my_pipeline)
      buf = PipelineManager.ring_buffer(pm)        # write here (Ingestor, RingBuffer.write)
      :ok = Ingestor.ingest_function_call(buf, M, :f, [1], self(), ref)
      :ok = PipelineManager.flush(pm)               # everything written so far is stored
      store = PipelineManager.data_access(pm)       # query here (DataAccess)
      {:ok, events} = DataAccess.query_by_process(store, self())

  ## What happens to an event

  A process's writes go to its own ring shard (by pid), so per-process
  order is kept end to end. Native worker threads (`AsyncWriterPool`)
  drain the shards in batches of up to `:batch_size`; a shard is drained
  by one worker at a time. Each batch is correlated (call stacks per
  process, send → receive matching by content, spawn tree, state changes
  linked to the call in progress) and stored with its correlation ids in
  the pipeline's store. Idle workers park for `:flush_interval_us` and
  never spin. Events are never converted to Elixir terms on this path;
  only the events a query returns are.

  ## Nothing is lost silently

  `get_metrics/1` reports the accounting identity

      accepted = stored + evicted + expired + duplicates + store_rejected
               + dead_lettered + overflow + failed + cleared + in_flight

  with `in_flight` measured (events in the rings or in a worker's hands).
  Writes refused by a full ring under `:drop_newest` are counted in
  `buffer_full`, and writes shed by the load-shedding policy
  (`ElixirScope.Capture.BackpressureManager`) in `shed` (by reason under
  `:shedding`); neither was accepted. After `flush/2` returns `:ok` with
  producers quiet, `in_flight` is 0 and `unaccounted` is 0.

  ## Circuit breaker

  The correlate-and-store stage runs behind a circuit breaker: after
  `:breaker_threshold` consecutive failed batches (each retried once) it
  opens, and for `:breaker_open_ms` batches go straight to the bounded
  dead-letter queue (counted in `dead_lettered` and
  `circuit.rejected_events`); then one probe batch runs (half open), and
  its success closes the breaker. `get_metrics/1` reports it under
  `:circuit`.

  ## Options

  | option | default | live | meaning |
  |---|---|---|---|
  | `:name` | `#{inspect(__MODULE__)}` | – | registered name (`nil`: none); several named pipelines may run |
  | `:async_writer_pool_size` | `4` | yes | native worker threads (1..64) |
  | `:batch_size` | `50` | yes | most events per worker batch |
  | `:flush_interval_us` | `1000` | yes | how long an idle worker parks |
  | `:max_backlog` | `5000` | yes | backlog above which health is `:degraded` |
  | `:correlation_enabled` | `true` | yes | correlate, or only store |
  | `:backpressure_enabled` | `true` | no | start a `BackpressureManager` for this pipeline |
  | `:backpressure` | `[]` | no | its options (observing only unless `auto_scale: true` / `load_shedding: true`; `min_workers`..`max_workers` default to the pool size..twice it) |
  | `:cleanup_interval_ms` | `60_000` | yes | correlator TTL sweep period |
  | `:correlation_ttl_ms` | `300_000` | yes | unmatched sends/receives older than this are swept |
  | `:max_correlations` | `100_000` | yes | bound on correlator entries (lowering evicts at once, counted) |
  | `:max_events` | `1_000_000` | yes | store bound (oldest evicted, counted; lowering evicts at once) |
  | `:max_age_ms` | `nil` | yes | store age bound (older expired, counted) |
  | `:shards` | `16` | no | ring shards (1..256) |
  | `:ring_size` | `16_384` | no | slots per shard (power of two) |
  | `:overflow_strategy` | `:drop_newest` | no | `:drop_oldest`, `:drop_newest`, `:block` |
  | `:max_event_bytes` | `4096` | no | payload cap per event (bigger fields truncated visibly) |
  | `:max_dead_letters` | `100` | no | failed batches kept for inspection |
  | `:breaker_threshold` | `5` | yes | consecutive failed batches that open the circuit breaker (`0`: never) |
  | `:breaker_open_ms` | `1000` | yes | how long an open breaker dead-letters batches before a probe |
  | `:shutdown_timeout_ms` | `5000` | yes | how long shutdown waits for the rings to drain |
  | `:metrics_port` | `nil` | no | serve this pipeline's Prometheus metrics at `/metrics` on this port (`0`: any free one, see `metrics_port/1`); `nil`: no endpoint |
  | `:metrics_ip` | `{127, 0, 0, 1}` | no | the address the metrics endpoint binds to |

  `update_config/2` applies the "live" options at once and refuses the
  others with `{:error, {:not_live, keys}}` (they size the rings or the
  payload cap: start a new pipeline). Raising `:max_events` above its
  starting value keeps the store's index tables at their starting size
  (lookups stay exact, bucket chains get longer).
  """
  use Supervisor

  alias ElixirScope.Capture.{AsyncWriterPool, BackpressureManager, Pipeline, RingBuffer}
  alias ElixirScope.Capture.PipelineManager.Server
  alias ElixirScope.Native
  alias ElixirScope.Storage.DataAccess

  @manager_defaults %{
    max_backlog: 5000,
    backpressure_enabled: true,
    shutdown_timeout_ms: 5000,
    metrics_port: nil,
    metrics_ip: {127, 0, 0, 1}
  }

  @live [
    :async_writer_pool_size,
    :batch_size,
    :flush_interval_us,
    :max_backlog,
    :correlation_enabled,
    :cleanup_interval_ms,
    :correlation_ttl_ms,
    :max_correlations,
    :max_events,
    :max_age_ms,
    :breaker_threshold,
    :breaker_open_ms,
    :shutdown_timeout_ms
  ]

  @type server :: pid() | atom() | {:via, module(), term()} | {:global, term()}

  @doc """
  Starts the pipeline (options above, as a keyword list or a map). Returns
  `{:error, reason}` for a size the native side refuses and raises
  `ArgumentError` for malformed options.
  """
  @spec start_link(keyword() | map()) :: Supervisor.on_start()
  def start_link(opts \\ []) do
    opts = Pipeline.to_map!(opts, "PipelineManager")
    {name, opts} = Map.pop(opts, :name, __MODULE__)
    {bp_opts, opts} = Map.pop(opts, :backpressure, [])
    config = Map.merge(Map.merge(Pipeline.native_defaults(), @manager_defaults), opts)
    Pipeline.validate!(config)
    check_manager!(config)
    bp = backpressure_opts!(bp_opts, config, name)

    case Pipeline.start(config, nil, name) do
      {:ok, pipeline} ->
        sup_opts = if name, do: [name: name], else: []

        Supervisor.start_link(
          __MODULE__,
          {pipeline, name, bp, Map.take(config, [:metrics_port, :metrics_ip])},
          sup_opts
        )

      {:error, _} = err ->
        err
    end
  end

  @impl Supervisor
  def init({pipeline, name, bp, metrics}) do
    backpressure =
      case bp do
        nil ->
          []

        opts ->
          opts = Keyword.put_new(opts, :pipeline, name || self())
          [{BackpressureManager, opts}]
      end

    endpoint =
      case metrics do
        %{metrics_port: nil} ->
          []

        %{metrics_port: port, metrics_ip: ip} ->
          [{ElixirScope.Metrics.Prometheus, port: port, ip: ip, pipelines: [self()]}]
      end

    children =
      [
        {Server, {pipeline, name}},
        {AsyncWriterPool, [pipeline: pipeline]},
        {ElixirScope.Storage.QueryCoordinator.Server, pipeline}
      ] ++ backpressure ++ endpoint

    Supervisor.init(children, strategy: :one_for_one, max_restarts: 10, max_seconds: 5)
  end

  @doc "The `%RingBuffer{}` producers write to (pass it to `Ingestor`)."
  @spec ring_buffer(server()) :: RingBuffer.t()
  def ring_buffer(pm \\ __MODULE__), do: handles(pm).ring_buffer

  @doc "A read-only `%DataAccess{}` over the pipeline's store."
  @spec data_access(server()) :: DataAccess.t()
  def data_access(pm \\ __MODULE__), do: handles(pm).data_access

  @doc """
  Waits until every event written before the call is stored (or
  dead-lettered): `:ok`, or `{:error, :timeout}` after `timeout_ms`.
  Runs on a dirty I/O scheduler.
  """
  @spec flush(server(), non_neg_integer()) :: :ok | {:error, :timeout}
  def flush(pm \\ __MODULE__, timeout_ms \\ 5000)
      when is_integer(timeout_ms) and timeout_ms >= 0 do
    if Native.pipe_flush(handles(pm).pipe, timeout_ms), do: :ok, else: {:error, :timeout}
  end

  @doc """
  `%{config, status, children, uptime_ms, uptime_ns, started_at,
  start_time, events_processed, processing_rate, ring_buffer,
  data_access}` (`uptime_ms` rounded up, as in `health_check/1`). As in
  the original, `start_time` is when the manager started on
  `ElixirScope.Utils.monotonic_timestamp/0`'s clock (ns; `started_at` is
  the wall clock in ms), and `events_processed` and `processing_rate` are
  `get_metrics/1`'s (events the workers handled so far, events/s over the
  last second).
  """
  @spec get_state(server()) :: map()
  def get_state(pm \\ __MODULE__) do
    state = GenServer.call(server!(pm), :get_state)
    Map.put(state, :children, Supervisor.which_children(pm))
  end

  @doc """
  Applies config changes (a map or keyword list) live: `:ok`, or
  `{:error, {:not_live, keys}}` / `{:error, {:unknown, keys}}` (nothing
  applied). Bad values raise `ArgumentError`.
  """
  @spec update_config(server(), map() | keyword()) :: :ok | {:error, term()}
  def update_config(pm \\ __MODULE__, changes) do
    changes = Pipeline.to_map!(changes, "update_config")
    known = Map.keys(Pipeline.native_defaults()) ++ Map.keys(@manager_defaults)

    case {Map.keys(changes) -- known, Map.keys(changes) -- @live} do
      {[], []} ->
        Pipeline.validate!(changes)
        check_manager!(changes)
        GenServer.call(server!(pm), {:update_config, changes})

      {[], not_live} ->
        {:error, {:not_live, not_live}}

      {unknown, _} ->
        {:error, {:unknown, unknown}}
    end
  end

  @doc """
  `%{status: :healthy | :degraded | :stopped, children_count, uptime_ms,
  uptime_ns, ...}`. `uptime_ms` is rounded up, so a running pipeline
  reports at least 1 from its start (`uptime_ns` is exact). Degraded when a child is down, the native workers are fewer than
  configured, the backlog exceeds `:max_backlog` or batches have been
  dead-lettered.
  """
  @spec health_check(server()) :: map()
  def health_check(pm \\ __MODULE__) do
    children = Supervisor.which_children(pm)
    alive = Enum.count(children, fn {_, pid, _, _} -> is_pid(pid) end)
    h = GenServer.call(server!(pm), :health)
    status = if alive < length(children), do: :degraded, else: h.status
    Map.merge(h, %{status: status, children_count: length(children), children_alive: alive})
  end

  @doc """
  The seeds' pipeline statistics: `events_processed`, `processing_rate`
  (events/s over the last second), `backlog_size` (in flight),
  `latency` (write → stored p50/p95/p99 ns), `buffer_utilization`,
  `dropped` (by reason), `active_workers`, `correlation_success_rate`,
  `orphaned`, `memory_bytes`, `accounting` (the identity above, with
  `unaccounted`) and `native` (every native counter).
  """
  @spec get_metrics(server()) :: map()
  def get_metrics(pm \\ __MODULE__), do: GenServer.call(server!(pm), :get_metrics)

  @doc "The accounting identity as one line of text (for logs and demos)."
  @spec accounting_line(server()) :: String.t()
  def accounting_line(pm \\ __MODULE__),
    do: Pipeline.accounting_line(get_metrics(pm).accounting)

  @doc """
  The newest `limit` dead letters (batches that failed twice):
  `[{reason, shard, first_position, events}]`.
  """
  @spec dead_letters(server(), non_neg_integer()) :: list()
  def dead_letters(pm \\ __MODULE__, limit \\ 100) when is_integer(limit) and limit >= 0,
    do: Native.pipe_dead_letters(handles(pm).pipe, limit)

  @doc """
  Drains the rings into the store (up to `:shutdown_timeout_ms`), stops
  the native workers and the supervisor. `:ok`.
  """
  @spec shutdown(server()) :: :ok
  def shutdown(pm \\ __MODULE__) do
    Supervisor.stop(pm, :normal)
  end

  @doc false
  # The native handles (`%Pipeline{}`).
  def handles(pm \\ __MODULE__), do: GenServer.call(server!(pm), :handles)

  @doc """
  The pipeline's `BackpressureManager` (nil when `:backpressure_enabled` is
  false).
  """
  @spec backpressure_manager(server()) :: pid() | nil
  def backpressure_manager(pm \\ __MODULE__) do
    Supervisor.which_children(pm)
    |> Enum.find_value(fn
      {BackpressureManager, pid, _, _} when is_pid(pid) -> pid
      _ -> nil
    end)
  end

  @doc """
  The port of the pipeline's Prometheus endpoint (`:metrics_port`), or
  nil when it has none.
  """
  @spec metrics_port(server()) :: :inet.port_number() | nil
  def metrics_port(pm \\ __MODULE__) do
    Supervisor.which_children(pm)
    |> Enum.find_value(fn
      {ElixirScope.Metrics.Prometheus.Endpoint, pid, _, _} when is_pid(pid) ->
        ElixirScope.Metrics.Prometheus.port(pid)

      _ ->
        nil
    end)
  end

  # The BackpressureManager's options (validated here, so a bad option
  # fails start_link with ArgumentError), or nil when disabled.
  defp backpressure_opts!(opts, config, name) do
    unless is_list(opts) and Keyword.keyword?(opts),
      do:
        raise(ArgumentError, "option :backpressure must be a keyword list, got: #{inspect(opts)}")

    if config.backpressure_enabled do
      # Observe only unless told otherwise; the default pipeline's manager
      # is registered under BackpressureManager's name.
      bp_name = if name == __MODULE__, do: BackpressureManager, else: nil

      opts =
        opts
        |> Keyword.put_new(:name, bp_name)
        |> Keyword.put_new(:min_workers, min(config.async_writer_pool_size, 64))
        |> Keyword.put_new(:max_workers, min(max(config.async_writer_pool_size * 2, 1), 64))

      _ = BackpressureManager.validate_opts!(Keyword.put_new(opts, :pipeline, self()))
      opts
    end
  end

  defp server!(pm) do
    found =
      Supervisor.which_children(pm)
      |> Enum.find_value(fn
        {Server, pid, _, _} when is_pid(pid) -> pid
        _ -> nil
      end)

    found || exit({:noproc, {__MODULE__, :server, [pm]}})
  end

  defp check_manager!(c) do
    Enum.each(Map.take(c, Map.keys(@manager_defaults)), fn
      {:max_backlog, v} when is_integer(v) and v >= 0 -> :ok
      {:backpressure_enabled, v} when is_boolean(v) -> :ok
      {:shutdown_timeout_ms, v} when is_integer(v) and v >= 0 -> :ok
      {:metrics_port, nil} -> :ok
      {:metrics_port, v} when is_integer(v) and v >= 0 and v <= 65_535 -> :ok
      {:metrics_ip, v} when is_tuple(v) and tuple_size(v) in [4, 8] -> :ok
      {k, v} -> raise ArgumentError, "option #{inspect(k)} has a bad value: #{inspect(v)}"
    end)
  end

  defmodule Server do
    @moduledoc false
    # Holds the pipeline's handles and config, samples the processing
    # rate, applies live config changes and drains on shutdown.
    use GenServer

    alias ElixirScope.Capture.Pipeline
    alias ElixirScope.Native

    @tick_ms 1000

    def start_link({_pipeline, _name} = arg), do: GenServer.start_link(__MODULE__, arg)

    def child_spec(arg) do
      %{
        id: __MODULE__,
        start: {__MODULE__, :start_link, [arg]},
        # Draining can take up to :shutdown_timeout_ms.
        shutdown: :infinity
      }
    end

    @impl GenServer
    def init({pipeline, name}) do
      Process.flag(:trap_exit, true)
      now = System.monotonic_time(:millisecond)
      started_ns = System.monotonic_time(:nanosecond)
      Process.send_after(self(), :tick, @tick_ms)

      {:ok,
       %{
         pipeline: pipeline,
         name: name,
         config: pipeline.config,
         started_at: now,
         started_ns: started_ns,
         started_at_wall: System.system_time(:millisecond),
         start_time: ElixirScope.Utils.monotonic_timestamp(),
         last_sample: {now, 0},
         rate: 0.0,
         stopped: false
       }}
    end

    @impl GenServer
    def handle_call(:handles, _from, s), do: {:reply, s.pipeline, s}

    def handle_call(:get_state, _from, s) do
      m = Pipeline.summarize(Native.pipe_metrics(s.pipeline.pipe), s.rate)

      {:reply,
       %{
         name: s.name,
         config: s.config,
         status: if(s.stopped, do: :stopped, else: :running),
         started_at: s.started_at_wall,
         start_time: s.start_time,
         events_processed: m.events_processed,
         processing_rate: m.processing_rate,
         uptime_ms: uptime(s),
         uptime_ns: uptime_ns(s),
         ring_buffer: s.pipeline.ring_buffer,
         data_access: s.pipeline.data_access
       }, s}
    end

    def handle_call({:update_config, changes}, _from, s) do
      pipe = s.pipeline.pipe

      Enum.each(changes, fn
        {:async_writer_pool_size, n} -> :ok = Native.pipe_scale(pipe, n)
        {:batch_size, n} -> :ok = Native.pipe_configure(pipe, :batch_size, n)
        {:flush_interval_us, n} -> :ok = Native.pipe_configure(pipe, :flush_interval_us, n)
        {:cleanup_interval_ms, n} -> :ok = Native.pipe_configure(pipe, :sweep_interval_ms, n)
        {:correlation_enabled, b} -> :ok = Native.pipe_configure(pipe, :correlation_enabled, b)
        {:correlation_ttl_ms, n} -> :ok = Native.pipe_configure(pipe, :correlation_ttl_ms, n)
        {:max_correlations, n} -> :ok = Native.pipe_configure(pipe, :max_correlations, n)
        {:max_events, n} -> :ok = Native.pipe_configure(pipe, :max_events, n)
        {:max_age_ms, n} -> :ok = Native.pipe_configure(pipe, :max_age_ms, n || 0)
        {:breaker_threshold, n} -> :ok = Native.pipe_configure(pipe, :breaker_threshold, n)
        {:breaker_open_ms, n} -> :ok = Native.pipe_configure(pipe, :breaker_open_ms, n)
        {_manager_only, _} -> :ok
      end)

      pipeline =
        case changes do
          %{max_events: n} -> put_in(s.pipeline.data_access.max_events, n).pipeline
          _ -> s.pipeline
        end

      {:reply, :ok, %{s | config: Map.merge(s.config, changes), pipeline: pipeline}}
    end

    def handle_call(:get_metrics, _from, s) do
      native = Native.pipe_metrics(s.pipeline.pipe)
      {:reply, Pipeline.summarize(native, s.rate), s}
    end

    def handle_call(:health, _from, s) do
      native = Native.pipe_metrics(s.pipeline.pipe)
      acc = native.accounting
      configured = s.config.async_writer_pool_size

      status =
        cond do
          s.stopped -> :stopped
          native.pool.workers < configured -> :degraded
          acc.in_flight > s.config.max_backlog -> :degraded
          acc.dead_lettered > 0 -> :degraded
          true -> :healthy
        end

      {:reply,
       %{
         status: status,
         uptime_ms: uptime(s),
         uptime_ns: uptime_ns(s),
         active_workers: native.pool.workers,
         backlog_size: acc.in_flight,
         dead_lettered: acc.dead_lettered,
         unaccounted: acc.unaccounted
       }, s}
    end

    @impl GenServer
    def handle_info(:tick, s) do
      Process.send_after(self(), :tick, @tick_ms)
      now = System.monotonic_time(:millisecond)
      handled = Native.pipe_metrics(s.pipeline.pipe).engine.handled
      {t0, h0} = s.last_sample
      rate = if now > t0, do: (handled - h0) * 1000 / (now - t0), else: s.rate
      {:noreply, %{s | last_sample: {now, handled}, rate: rate}}
    end

    def handle_info(_other, s), do: {:noreply, s}

    @impl GenServer
    def terminate(reason, s)
        when reason in [:normal, :shutdown] or
               (is_tuple(reason) and elem(reason, 0) == :shutdown) do
      # The supervisor is stopping: drain what was written, then stop the
      # native workers.
      pipe = s.pipeline.pipe
      timeout = Map.get(s.config, :shutdown_timeout_ms, 5000)
      _ = Native.pipe_flush(pipe, timeout)
      {:ok, _drained} = Native.pipe_shutdown(pipe, timeout)
      :ok
    end

    # A crash: the restarted server takes over the running pipeline.
    def terminate(_reason, _s), do: :ok

    # Rounded up: a running pipeline's uptime is positive from its start.
    defp uptime(s), do: div(uptime_ns(s) + 999_999, 1_000_000)
    defp uptime_ns(s), do: System.monotonic_time(:nanosecond) - s.started_ns
  end
end

defmodule ElixirScope.Capture.TemporalBridge do
  @moduledoc """
  A buffered feed of runtime events into a `ElixirScope.Capture.TemporalStorage`,
  with the original's Cinema Debugger queries, drop-in for the original
  `ElixirScope.Capture.TemporalBridge`.

      {:ok, bridge} = TemporalBridge.start_link()
      :ok = TemporalBridge.correlate_event(bridge, %{
        timestamp: 10, correlation_id: "exec_1", ast_node_id: "def_1",
        event_type: :function_entry, data: %{module: MyMod, function: :run}
      })
      {:ok, ["def_1"]} = TemporalBridge.get_active_ast_nodes(bridge, 0, 100)

  `correlate_event/2` is a cast: the event (a map) is stamped
  (`:timestamp` when absent, `bridge_id`, `bridge_timestamp`,
  `temporal_correlation: true`), buffered, and written to the storage in
  arrival order when the buffer holds `:buffer_size` events, every
  `:flush_interval` ms, on `flush_buffer/1` and before every query. The
  stored event is the storage's normalized form: `%{timestamp, event_id,
  ast_node_id, correlation_id, data}` where `data` is the stamped event.

  ## Options (`start_link/1`)

  | option | default | meaning |
  |---|---|---|
  | `:name` | none | register the process |
  | `:temporal_storage` | a new one | a running `TemporalStorage` (pid or name) |
  | `:max_events` | `100_000` | bound of the storage the bridge starts |
  | `:buffer_size` | `1000` | events buffered before a write |
  | `:flush_interval` | `100` | ms between timed writes |
  | `:store` | none | a trace's `%DataAccess{}` (or `:trace`, the node's current trace at each query) whose processes' states `reconstruct_state_at/2` answers |
  | `:pipeline` | none | a running `PipelineManager` (name or pid): its store, as `:store` |
  | `:enable_correlation_cache`, `:cache_size_limit`, `:enable_performance_tracking` | | accepted for compatibility (see "Differences") |

  ## Traced processes: time travel

  Given a trace's store (`:store` or `:pipeline`, or fed one with
  `feed_trace/2`), `reconstruct_state_at/2` also answers the state of every
  traced process at that time: the map gets one key per process, its pid,
  with the state `ElixirScope.Analysis.state_at/3` finds in force then
  (the processes are those with state records in the store and those the
  bridge's events name under `:pid`; a process with no state at that time,
  not started yet or exited, gets no key). `process_state_at/3` gives one
  process's full answer (`{:ok, %ElixirScope.Analysis.State{}}` or
  `{:error, reason}`).

      {:ok, _} = ElixirScope.trace(MyServer)
      ... # the traced GenServer runs
      {:ok, _} = ElixirScope.stop_trace()
      {:ok, bridge} = TemporalBridge.start_link()
      {:ok, _count} = TemporalBridge.feed_trace(bridge)
      {:ok, state} = TemporalBridge.reconstruct_state_at(bridge, t)
      state[server_pid]  # the server's state at t

  ## Differences from the original

    * Queries write the buffer first, so they see every event correlated
      before them (the original answered from the storage alone, missing
      up to `:buffer_size` events), and the buffer is written in arrival
      order (the original wrote it reversed).
    * `reconstruct_state_at/2` completes a function when its own exit
      arrives (same correlation id); the original marked every active
      function completed on any exit.
    * There is no correlation cache: lookups are native index walks, so
      `get_stats/1`'s `correlation_cache_size` is 0 (the original created
      a cache and never filled it).
    * A non-map event or target raises `ArgumentError`; a bridge that is
      not running raises `ArgumentError` (the original exited).
  """

  use GenServer
  require Logger

  alias ElixirScope.{Analysis, Args, Utils}
  alias ElixirScope.Capture.{PipelineManager, TemporalStorage}
  alias ElixirScope.Storage.DataAccess

  @handler_key :elixir_scope_temporal_bridge
  @i64_min -9_223_372_036_854_775_808

  @typedoc "The process state (`event_buffer` newest first)."
  @type t :: %__MODULE__{}

  defstruct [
    :bridge_id,
    :temporal_storage,
    :event_buffer,
    :correlation_cache,
    :stats,
    :config,
    # The trace store consulted for process states (nil, :trace or a
    # %DataAccess{}); `fed: true` when it came from feed_trace/2.
    trace_store: nil,
    fed: false,
    buffered: 0
  ]

  @defaults [
    name: nil,
    temporal_storage: nil,
    max_events: 100_000,
    buffer_size: 1000,
    flush_interval: 100,
    enable_correlation_cache: true,
    cache_size_limit: 10_000,
    enable_performance_tracking: true,
    store: nil,
    pipeline: nil
  ]

  @doc "Starts a bridge (see \"Options\"). Bad options raise `ArgumentError`."
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    opts = Args.keyword_opts!(opts, @defaults, "temporal bridge")

    for k <- [:buffer_size, :flush_interval] do
      v = opts[k]

      unless is_integer(v) and v >= 1 and v <= 16_777_216,
        do:
          raise(
            ArgumentError,
            "temporal bridge option #{inspect(k)} must be an integer in 1..16777216, got: #{inspect(v)}"
          )
    end

    name = opts[:name]

    unless is_atom(name),
      do:
        raise(
          ArgumentError,
          "temporal bridge option :name must be an atom, got: #{inspect(name)}"
        )

    storage =
      case opts[:temporal_storage] do
        nil -> nil
        s -> tap(s, &TemporalStorage.data_access/1)
      end

    trace_store =
      case {opts[:store], opts[:pipeline]} do
        {nil, nil} -> nil
        {store, nil} -> trace_store!(store)
        {nil, pm} -> pipeline_store!(pm)
        _ -> raise ArgumentError, "temporal bridge: give :store or :pipeline, not both"
      end

    gen = if name, do: [name: name], else: []
    config = Map.merge(Map.new(opts), %{temporal_storage: storage, store: trace_store})
    GenServer.start_link(__MODULE__, Map.delete(config, :pipeline), gen)
  end

  defp trace_store!(%DataAccess{} = s), do: s
  defp trace_store!(:trace), do: :trace

  defp trace_store!(other),
    do:
      raise(
        ArgumentError,
        "temporal bridge option :store must be a %DataAccess{} or :trace, got: " <>
          inspect(other, limit: 5, printable_limit: 40)
      )

  defp pipeline_store!(pm) do
    PipelineManager.data_access(pm)
  rescue
    _ -> bad_pipeline!(pm)
  catch
    :exit, _ -> bad_pipeline!(pm)
  end

  defp bad_pipeline!(pm),
    do:
      raise(
        ArgumentError,
        "temporal bridge option :pipeline must be a running PipelineManager (name or pid), got: " <>
          inspect(pm, limit: 5, printable_limit: 40)
      )

  @doc "Buffers one event (a map) for the storage: `:ok` (a cast)."
  @spec correlate_event(GenServer.server(), map()) :: :ok
  def correlate_event(bridge, %{} = event) do
    pid = Args.server!(bridge, __MODULE__)
    GenServer.cast(pid, {:correlate_event, event})
  end

  def correlate_event(_bridge, other),
    do: raise(ArgumentError, "an event must be a map, got: #{inspect(other, limit: 5)}")

  @doc "Events with `start_time <= timestamp <= end_time`, oldest first: `{:ok, events}`."
  @spec get_events_in_range(GenServer.server(), integer(), integer()) :: {:ok, [map()]}
  def get_events_in_range(bridge, start_time, end_time),
    do: TemporalStorage.get_events_in_range(storage!(bridge), start_time, end_time)

  @doc "Events of AST node `ast_node_id`, oldest first: `{:ok, events}`."
  @spec get_events_for_ast_node(GenServer.server(), term()) :: {:ok, [map()]}
  def get_events_for_ast_node(bridge, ast_node_id),
    do: TemporalStorage.get_events_for_ast_node(storage!(bridge), ast_node_id)

  @doc "Events with this correlation id, oldest first: `{:ok, events}`."
  @spec get_events_for_correlation(GenServer.server(), term()) :: {:ok, [map()]}
  def get_events_for_correlation(bridge, correlation_id),
    do: TemporalStorage.get_events_for_correlation(storage!(bridge), correlation_id)

  @doc """
  `{:ok, stats}`: `events_processed` (events correlated), `events_buffered`
  and `buffer_size` (waiting now), `buffer_flushes`, `events_stored`,
  `store_errors` (events the storage refused: too large), `created_at`,
  `correlations_cached` and `correlation_cache_size` (0), `config`, and
  `temporal_storage` (its `get_stats/1`). Always
  `events_processed = events_stored + store_errors + events_buffered`.
  """
  @spec get_stats(GenServer.server()) :: {:ok, map()}
  def get_stats(bridge) do
    {storage, stats} = Args.call_server!(bridge, __MODULE__, :stats)
    {:ok, ts} = TemporalStorage.get_stats(storage)
    {:ok, Map.put(stats, :temporal_storage, ts)}
  end

  @doc "Writes the buffered events to the storage: `:ok`."
  @spec flush_buffer(GenServer.server()) :: :ok
  def flush_buffer(bridge) do
    _ = storage!(bridge)
    :ok
  end

  @doc """
  The state at `timestamp`, replayed from every event up to it (oldest
  first), as the original built it: `:function_entry` events put
  `"\#{module}.\#{function}" => %{status: :active, entry_time, correlation_id}`
  (module and function from the event or its `data`); a `:function_exit`
  marks the entry with its correlation id `:completed` with its
  `exit_time`; `:local_variable_snapshot` merges its `variables`,
  `:state_change` its `state` (maps). With a trace's store (see "Traced
  processes"), also `pid => state` for each traced process with a state
  in force at `timestamp`, from `ElixirScope.Analysis.state_at/3`.
  `{:ok, map}`.
  """
  @spec reconstruct_state_at(GenServer.server(), integer()) :: {:ok, map()}
  def reconstruct_state_at(bridge, timestamp) when is_integer(timestamp) do
    {storage, store} = Args.call_server!(bridge, __MODULE__, :flush_and_store)
    {:ok, events} = TemporalStorage.get_events_in_range(storage, @i64_min, timestamp)
    state = replay(events)

    case resolve(store) do
      nil ->
        {:ok, state}

      s ->
        named = for e <- events, pid = event_pid(e), is_pid(pid), do: pid
        traced = for {pid, _} <- Analysis.state_processes(store: s), do: pid

        {:ok,
         (named ++ traced)
         |> Enum.uniq()
         |> Enum.reduce(state, fn pid, acc ->
           case Analysis.state_at(pid, timestamp, store: s) do
             {:ok, %{state: st}} -> Map.put(acc, pid, st)
             {:error, _} -> acc
           end
         end)}
    end
  end

  def reconstruct_state_at(_bridge, other),
    do: raise(ArgumentError, "timestamp must be an integer, got: #{inspect(other)}")

  @doc """
  The state of traced process `pid` at `timestamp` in the bridge's trace
  store (see "Traced processes"): `ElixirScope.Analysis.state_at/3`'s
  answer, `{:ok, %ElixirScope.Analysis.State{}}` or `{:error, reason}`;
  `{:error, :no_trace_store}` when the bridge has none.
  """
  @spec process_state_at(GenServer.server(), pid(), integer()) ::
          {:ok, ElixirScope.Analysis.State.t()} | {:error, atom()}
  def process_state_at(bridge, pid, timestamp) when is_pid(pid) and is_integer(timestamp) do
    {_storage, store} = Args.call_server!(bridge, __MODULE__, :flush_and_store)

    case resolve(store) do
      nil -> {:error, :no_trace_store}
      s -> Analysis.state_at(pid, timestamp, store: s)
    end
  end

  def process_state_at(_bridge, pid, timestamp) when is_pid(pid),
    do: raise(ArgumentError, "timestamp must be an integer, got: #{inspect(timestamp)}")

  def process_state_at(_bridge, other, _timestamp),
    do: raise(ArgumentError, "expected a pid, got: #{inspect(other, limit: 5)}")

  @doc """
  Feeds a trace into the bridge: its calls become `:function_entry`
  events and their returns and exceptions `:function_exit` events (with
  the call's id as `correlation_id`, and `pid`, `module`, `function`,
  `arity`, `trace_event_id`), written to the storage before this returns;
  from then on the bridge answers its processes' states from that trace
  (see "Traced processes") unless it was started with `:store` or
  `:pipeline`. Options: `:store` (default the node's current trace,
  `ElixirScope.trace_store/0`), and `ElixirScope.Analysis.select/1`'s
  `:pid`, `:module`, `:function`, `:from`, `:to`, `:limit` (default
  100_000). `{:ok, events_fed}` or `{:error, :no_trace}`.
  """
  @spec feed_trace(GenServer.server(), keyword()) ::
          {:ok, non_neg_integer()} | {:error, :no_trace}
  def feed_trace(bridge, opts \\ []) do
    pid = Args.server!(bridge, __MODULE__)

    o =
      Args.keyword_opts!(
        opts,
        [store: nil, pid: nil, module: nil, function: nil, from: nil, to: nil, limit: 100_000],
        "TemporalBridge.feed_trace"
      )

    case o[:store] || ElixirScope.trace_store() do
      nil ->
        {:error, :no_trace}

      %DataAccess{} = s ->
        filters =
          o
          |> Keyword.drop([:store])
          |> Enum.reject(fn {_k, v} -> v == nil end)
          |> Keyword.merge(store: s, types: [:call, :return, :exception])

        events = filters |> Analysis.select() |> Enum.map(&from_trace/1)
        GenServer.call(pid, {:feed_trace, events, s}, :infinity)

      other ->
        raise ArgumentError,
              "feed_trace option :store must be a %DataAccess{}, got: " <>
                inspect(other, limit: 5, printable_limit: 40)
    end
  end

  defp from_trace(%{type: :call} = e) do
    %{
      timestamp: e.timestamp,
      event_type: :function_entry,
      correlation_id: e.id,
      pid: e.pid,
      module: e.module,
      function: e.function,
      arity: e.arity,
      trace_event_id: e.id,
      data: %{args: e.data}
    }
  end

  defp from_trace(e) do
    %{
      timestamp: e.timestamp,
      event_type: :function_exit,
      correlation_id: e.call_id,
      pid: e.pid,
      module: e.module,
      function: e.function,
      arity: e.arity,
      trace_event_id: e.id,
      data: %{result: e.data, exception: e.type == :exception}
    }
  end

  defp event_pid(%{data: %{} = d}) do
    case d do
      %{pid: pid} -> pid
      %{data: %{pid: pid}} -> pid
      _ -> nil
    end
  end

  defp event_pid(_), do: nil

  defp resolve(:trace), do: ElixirScope.trace_store()
  defp resolve(store), do: store

  @doc """
  The events sharing `target_event`'s correlation id, oldest first:
  `{:ok, events}`, or `{:error, :no_correlation_id}`.
  """
  @spec trace_execution_path(GenServer.server(), map()) ::
          {:ok, [map()]} | {:error, :no_correlation_id}
  def trace_execution_path(bridge, %{} = target_event) do
    case Map.get(target_event, :correlation_id) do
      nil -> tap({:error, :no_correlation_id}, fn _ -> storage!(bridge) end)
      id -> get_events_for_correlation(bridge, id)
    end
  end

  def trace_execution_path(_bridge, other),
    do: raise(ArgumentError, "target_event must be a map, got: #{inspect(other, limit: 5)}")

  @doc """
  The AST nodes with an event in `start_time..end_time`, each once, in the
  order of their first event there: `{:ok, ids}`.
  """
  @spec get_active_ast_nodes(GenServer.server(), integer(), integer()) :: {:ok, [term()]}
  def get_active_ast_nodes(bridge, start_time, end_time) do
    {:ok, events} = get_events_in_range(bridge, start_time, end_time)
    {:ok, events |> Enum.map(& &1.ast_node_id) |> Enum.reject(&is_nil/1) |> Enum.uniq()}
  end

  @doc """
  Makes `bridge` the node's temporal correlation handler
  (`get_registered_bridge/0`): `:ok`. Kept in `:persistent_term`.
  """
  @spec register_as_handler(GenServer.server()) :: :ok
  def register_as_handler(bridge) do
    _ = Args.server!(bridge, __MODULE__)
    :persistent_term.put(@handler_key, bridge)
    :ok
  end

  @doc "Removes the registered handler: `:ok`."
  @spec unregister_handler() :: :ok
  def unregister_handler do
    :persistent_term.erase(@handler_key)
    :ok
  end

  @doc "`{:ok, bridge}` or `{:error, :not_registered}`."
  @spec get_registered_bridge() :: {:ok, GenServer.server()} | {:error, :not_registered}
  def get_registered_bridge do
    case :persistent_term.get(@handler_key, nil) do
      nil -> {:error, :not_registered}
      bridge -> {:ok, bridge}
    end
  end

  # The storage, after writing the buffer.
  defp storage!(bridge), do: Args.call_server!(bridge, __MODULE__, :flush)

  # ---- replay ----------------------------------------------------------------------

  defp replay(events) do
    Enum.reduce(events, %{}, fn event, acc ->
      d = if is_map(event.data), do: event.data, else: %{}
      inner = if is_map(d[:data]), do: d[:data], else: %{}
      get = fn k -> inner[k] || d[k] end

      case d[:event_type] do
        :function_entry ->
          case {get.(:module), get.(:function)} do
            {m, f} when m != nil and f != nil ->
              Map.put(acc, "#{m}.#{f}", %{
                status: :active,
                entry_time: event.timestamp,
                correlation_id: get.(:correlation_id) || event.correlation_id
              })

            _ ->
              acc
          end

        :function_exit ->
          complete(acc, get.(:correlation_id) || event.correlation_id, event.timestamp)

        :local_variable_snapshot ->
          merge(acc, get.(:variables))

        :state_change ->
          merge(acc, get.(:state))

        _ ->
          acc
      end
    end)
  end

  defp complete(acc, nil, _ts), do: acc

  defp complete(acc, corr, ts) do
    Map.new(acc, fn
      {k, %{status: :active, correlation_id: ^corr} = f} ->
        {k, Map.merge(f, %{status: :completed, exit_time: ts})}

      other ->
        other
    end)
  end

  defp merge(acc, %{} = m), do: Map.merge(acc, m)
  defp merge(acc, _), do: acc

  # ---- server ----------------------------------------------------------------------

  @impl true
  def init(config) do
    storage =
      case config.temporal_storage do
        nil ->
          {:ok, pid} = TemporalStorage.start_link(max_events: config.max_events)
          pid

        s ->
          s
      end

    Process.send_after(self(), :flush_buffer, config.flush_interval)

    {:ok,
     %__MODULE__{
       bridge_id: Utils.generate_id(),
       temporal_storage: storage,
       event_buffer: [],
       correlation_cache: nil,
       trace_store: config.store,
       config: Map.drop(config, [:name, :temporal_storage, :store]),
       stats: %{
         events_processed: 0,
         events_stored: 0,
         store_errors: 0,
         buffer_flushes: 0,
         correlations_cached: 0,
         created_at: Utils.wall_timestamp()
       }
     }}
  end

  @impl true
  def handle_cast({:correlate_event, event}, state), do: {:noreply, buffer(state, event)}

  defp buffer(state, event) do
    e =
      event
      |> Map.put_new_lazy(:timestamp, &Utils.monotonic_timestamp/0)
      |> Map.merge(%{
        bridge_id: state.bridge_id,
        bridge_timestamp: Utils.wall_timestamp(),
        temporal_correlation: true
      })

    stored = %{
      timestamp: e.timestamp,
      ast_node_id: Map.get(e, :ast_node_id),
      correlation_id: Map.get(e, :correlation_id),
      data: e
    }

    state = %{
      state
      | event_buffer: [stored | state.event_buffer],
        buffered: state.buffered + 1,
        stats: Map.update!(state.stats, :events_processed, &(&1 + 1))
    }

    if state.buffered >= state.config.buffer_size, do: flush(state), else: state
  end

  @impl true
  def handle_call(:flush, _from, state) do
    state = flush(state)
    {:reply, state.temporal_storage, state}
  end

  def handle_call(:flush_and_store, _from, state) do
    state = flush(state)
    {:reply, {state.temporal_storage, state.trace_store}, state}
  end

  def handle_call({:feed_trace, events, store}, _from, state) do
    state = events |> Enum.reduce(state, &buffer(&2, &1)) |> flush()

    # A store given at start stays; a fed trace replaces an earlier one.
    state =
      if state.trace_store == nil or state.fed,
        do: %{state | trace_store: store, fed: true},
        else: state

    {:reply, {:ok, length(events)}, state}
  end

  def handle_call(:stats, _from, state) do
    stats =
      Map.merge(state.stats, %{
        events_buffered: state.buffered,
        buffer_size: state.buffered,
        correlation_cache_size: 0,
        config: state.config
      })

    {:reply, {state.temporal_storage, stats}, state}
  end

  @impl true
  def handle_info(:flush_buffer, state) do
    state = flush(state)
    Process.send_after(self(), :flush_buffer, state.config.flush_interval)
    {:noreply, state}
  end

  def handle_info(_msg, state), do: {:noreply, state}

  defp flush(%{buffered: 0} = state), do: state

  defp flush(state) do
    events = Enum.reverse(state.event_buffer)
    n = state.buffered

    # Chunk by chunk, so one oversized event costs only itself.
    {stored, errors} =
      events
      |> Enum.chunk_every(1000)
      |> Enum.reduce({0, 0}, fn chunk, {ok, bad} -> store_chunk(state, chunk, ok, bad) end)

    if errors > 0,
      do: Logger.warning("TemporalBridge: #{errors} event(s) too large to store, dropped")

    stats =
      state.stats
      |> Map.update!(:events_stored, &(&1 + stored))
      |> Map.update!(:store_errors, &(&1 + errors))
      |> Map.update!(:buffer_flushes, &(&1 + 1))

    true = stored + errors == n
    %{state | event_buffer: [], buffered: 0, stats: stats}
  end

  defp store_chunk(state, chunk, ok, bad) do
    case TemporalStorage.store_events(state.temporal_storage, chunk) do
      {:ok, k} ->
        {ok + k, bad}

      {:error, _} ->
        # Find the refused ones one by one.
        Enum.reduce(chunk, {ok, bad}, fn e, {o, b} ->
          case TemporalStorage.store_events(state.temporal_storage, [e]) do
            {:ok, 1} -> {o + 1, b}
            {:error, _} -> {o, b + 1}
          end
        end)
    end
  end
end

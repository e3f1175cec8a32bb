defmodule ElixirScope.Capture.TemporalStorage do
  @moduledoc """
  Time-ordered event storage with AST-node and correlation indexes,
  drop-in for the original `ElixirScope.Capture.TemporalStorage`, over one
  native store (`ElixirScope.Storage.DataAccess`): the time, AST-node and
  correlation indexes are the store's own.

      {:ok, storage} = TemporalStorage.start_link()
      :ok = TemporalStorage.store_event(storage, %{timestamp: 1000, ast_node_id: "node1", correlation_id: "corr1", data: %{x: 1}})
      {:ok, [event]} = TemporalStorage.get_events_in_range(storage, 1000, 2000)
      event.data #=> %{x: 1}

  An event is a map; it is stored normalized, as in the original:
  `%{timestamp, event_id, ast_node_id, correlation_id, data}` with
  `timestamp` the event's (an integer; `ElixirScope.Utils.monotonic_timestamp/0`
  when absent), a fresh `event_id` (`ElixirScope.Utils.generate_id/0`)
  and `data` the event's `:data` (the whole event when it has none).

  Queries run in the calling process on the native indexes (time window:
  binary searches per segment; AST node and correlation id: index chains),
  and return events oldest first (by `timestamp`, then store order).

  ## Options (`start_link/1`)

  | option | default | meaning |
  |---|---|---|
  | `:name` | none | register the process |
  | `:max_events` | `100_000` | events kept: storing into a full storage evicts the oldest (counted in `get_stats/1`'s `evicted`) |
  | `:cleanup_interval`, `:enable_ast_indexing`, `:enable_correlation_indexing` | | accepted for compatibility; see "Differences" |

  ## Differences from the original

    * `:max_events` is enforced at every store (the original's periodic
      cleanup was empty: it grew without bound), so there is nothing left
      for a periodic cleanup to do and `:cleanup_interval` schedules
      nothing.
    * The AST-node and correlation indexes are always on (an index costs
      nothing for events without that field); the `enable_*` options are
      accepted and ignored.
    * A non-map event or a non-integer timestamp raises `ArgumentError`
      (the original returned `{:error, {:store_failed, exception}}` or
      stored it unordered).
    * `get_stats/1`'s `correlation_index_size` counts every event: all
      are in the correlation index (those without one under `nil`).
  """

  use GenServer

  alias ElixirScope.{Args, Utils}
  alias ElixirScope.Storage.DataAccess

  @typedoc """
  The process state: `events_table` is the native store; the index fields
  name its indexes.
  """
  @type t :: %__MODULE__{
          storage_id: pos_integer(),
          events_table: DataAccess.t(),
          ast_index: :ast_node,
          correlation_index: :correlation,
          stats: map(),
          config: map()
        }

  defstruct [
    :storage_id,
    :events_table,
    :stats,
    :config,
    ast_index: :ast_node,
    correlation_index: :correlation
  ]

  @defaults [
    name: nil,
    max_events: 100_000,
    cleanup_interval: 60_000,
    enable_ast_indexing: true,
    enable_correlation_indexing: true
  ]
  @i64_min -9_223_372_036_854_775_808
  @i64_max 9_223_372_036_854_775_807

  @doc "Starts a storage process (see \"Options\"). Bad options raise `ArgumentError`."
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    opts = Args.keyword_opts!(opts, @defaults, "temporal storage")
    name = opts[:name]

    unless is_atom(name),
      do:
        raise(
          ArgumentError,
          "temporal storage option :name must be an atom, got: #{inspect(name)}"
        )

    max = opts[:max_events]

    unless is_integer(max) and max >= 1 and max <= 536_870_912,
      do:
        raise(
          ArgumentError,
          "temporal storage option :max_events must be an integer in 1..536870912, got: #{inspect(max)}"
        )

    gen = if name, do: [name: name], else: []
    GenServer.start_link(__MODULE__, Map.new(opts), gen)
  end

  @doc """
  Stores one event (a map, see the moduledoc): `:ok` or
  `{:error, :event_too_large}`.
  """
  @spec store_event(GenServer.server(), map()) :: :ok | {:error, term()}
  def store_event(storage, event) do
    e = normalize!(event)
    Args.call_server!(storage, __MODULE__, {:store, [e]}) |> one()
  end

  defp one({:ok, _}), do: :ok
  defp one(error), do: error

  @doc """
  Stores a list of events in order, in one call (addition):
  `{:ok, n}` or `{:error, :event_too_large}` (the events before the
  chunk holding it are stored, see `DataAccess.store_events/2`).
  """
  @spec store_events(GenServer.server(), [map()]) :: {:ok, non_neg_integer()} | {:error, term()}
  def store_events(storage, events) when is_list(events) do
    Args.proper_list!(events, "events")
    es = Enum.map(events, &normalize!/1)
    Args.call_server!(storage, __MODULE__, {:store, es})
  end

  def store_events(_storage, other),
    do: raise(ArgumentError, "events must be a list, got: #{inspect(other, limit: 5)}")

  @doc false
  # The stored form of an event.
  def normalize!(%{} = event) do
    ts =
      case Map.get(event, :timestamp) do
        nil -> Utils.monotonic_timestamp()
        t when is_integer(t) and t >= @i64_min and t <= @i64_max -> t
        t -> raise ArgumentError, "event :timestamp must be a 64-bit integer, got: #{inspect(t)}"
      end

    %{
      timestamp: ts,
      event_id: Utils.generate_id(),
      ast_node_id: Map.get(event, :ast_node_id),
      correlation_id: Map.get(event, :correlation_id),
      data: Map.get(event, :data, event)
    }
  end

  def normalize!(other),
    do: raise(ArgumentError, "an event must be a map, got: #{inspect(other, limit: 5)}")

  @doc "Events with `start_time <= timestamp <= end_time`, oldest first: `{:ok, events}`."
  @spec get_events_in_range(GenServer.server(), integer(), integer()) :: {:ok, [map()]}
  def get_events_in_range(storage, start_time, end_time) do
    s = data_access(storage)
    DataAccess.query_by_time_range(s, start_time, end_time, limit: s.max_events)
  end

  @doc "Events of AST node `ast_node_id`, oldest first: `{:ok, events}`."
  @spec get_events_for_ast_node(GenServer.server(), term()) :: {:ok, [map()]}
  def get_events_for_ast_node(storage, ast_node_id) do
    s = data_access(storage)
    {:ok, events} = DataAccess.query_by_ast_node(s, ast_node_id, limit: s.max_events)
    {:ok, by_time(events)}
  end

  @doc "Events with this correlation id, oldest first: `{:ok, events}`."
  @spec get_events_for_correlation(GenServer.server(), term()) :: {:ok, [map()]}
  def get_events_for_correlation(storage, correlation_id) do
    s = data_access(storage)
    {:ok, events} = DataAccess.query_by_correlation(s, correlation_id, limit: s.max_events)
    # Correlation keys of non-integer ids are hashes: keep the id itself.
    {:ok, events |> Enum.filter(&(&1.correlation_id === correlation_id)) |> by_time()}
  end

  @doc "Every stored event, oldest first: `{:ok, events}`."
  @spec get_all_events(GenServer.server()) :: {:ok, [map()]}
  def get_all_events(storage), do: get_events_in_range(storage, @i64_min, @i64_max)

  @doc """
  `{:ok, stats}`: the original's `total_events`, `oldest_event`,
  `newest_event` (timestamps of the events kept, `nil` when empty),
  `created_at` (`Utils.wall_timestamp/0` at start), `memory_usage`
  (native bytes), `events_table_size`, `ast_index_size`,
  `correlation_index_size`; and `max_events`, `evicted`, `stored` (events
  stored since start, duplicates excluded).
  """
  @spec get_stats(GenServer.server()) :: {:ok, map()}
  def get_stats(storage) do
    {s, created_at} = Args.call_server!(storage, __MODULE__, :info)
    st = DataAccess.get_stats(s)
    z = DataAccess.index_sizes(s)

    {:ok,
     %{
       total_events: st.total_events,
       oldest_event: st.oldest_timestamp,
       newest_event: st.newest_timestamp,
       created_at: created_at,
       memory_usage: st.memory_usage,
       events_table_size: z.total,
       ast_index_size: z.ast_node,
       correlation_index_size: z.total,
       max_events: st.max_events,
       evicted: st.evicted + st.expired,
       stored: st.inserted - st.duplicates
     }}
  end

  @doc "The native store (`%DataAccess{}`) behind `storage` (addition)."
  @spec data_access(GenServer.server()) :: DataAccess.t()
  def data_access(storage), do: storage |> Args.call_server!(__MODULE__, :info) |> elem(0)

  # Stable: equal timestamps keep store order.
  defp by_time(events), do: Enum.sort_by(events, & &1.timestamp)

  # ---- server ----------------------------------------------------------------------

  @impl true
  def init(config) do
    {:ok, s} = DataAccess.new(max_events: config.max_events, name: config.name)

    {:ok,
     %__MODULE__{
       storage_id: Utils.generate_id(),
       events_table: s,
       stats: %{created_at: Utils.wall_timestamp()},
       config: Map.delete(config, :name)
     }}
  end

  @impl true
  def handle_call({:store, events}, _from, state),
    do: {:reply, DataAccess.store_events(state.events_table, events), state}

  def handle_call(:info, _from, state),
    do: {:reply, {state.events_table, state.stats.created_at}, state}
end

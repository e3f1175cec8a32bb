defmodule ElixirScope.Storage.EventStore do
  @moduledoc """
  A named event store process, drop-in for the original
  `ElixirScope.Storage.EventStore`, over one native store
  (`ElixirScope.Storage.DataAccess`): no second store, no ETS tables.

      {:ok, store} = EventStore.start_link(name: :my_store)
      :ok = EventStore.store_event(store, %{id: 1, timestamp: 10, pid: self(), event_type: :function_entry})
      {:ok, [event]} = EventStore.query_events(store, pid: self(), since: 0, until: 100)

  Events are any maps or structs (other terms are stored too and found by
  unfiltered queries); the store indexes their `:timestamp`, `:pid`,
  `:module`/`:function`, `:event_type`, `:ast_node_id` and
  `:correlation_id` fields natively (see `DataAccess`), and returns them
  unchanged (`==`).

  ## Filters (`query_events/2`)

  A keyword list or a map:

  | key | matches |
  |---|---|
  | `:since`, `:until`, `:timestamp_since`, `:timestamp_until` | `since <= timestamp <= until` (integers; `:until` may be `:infinity`; both pairs may be given) |
  | `:pid` | the event's `:pid` |
  | `:event_type` | the event's `:event_type` |
  | `:ast_node_id` | the event's `:ast_node_id` |
  | `:limit` | at most this many events (a non-negative integer; none: every match) |
  | `:order` | `:asc` (default: the earliest stored matches, oldest first) or `:desc` (the latest, newest first) |
  | any other atom | the event's field of that name equals the value (`===`) |

  The query runs on the most selective native index
  (`ElixirScope.Storage.QueryCoordinator.query/2` picks it: process, event
  type, AST node, time window or a scan in chunks) in the calling process,
  not in the store's, so queries never wait for each other. Results are
  sorted by `:timestamp` when every result has an integer one (else in
  store order).

  ## Differences from the original

    * Bounded: at most `:max_events` (default 1,000,000) events are kept;
      storing into a full store evicts the oldest (`get_index_stats/1`
      counts only what is kept). The original's ETS tables grew without
      bound.
    * An event whose `:id` (or `:event_id`) is already stored is kept once
      (the original stored every copy).
    * `:limit` keeps the first matches in store order and then sorts them
      (the original took its first matches in index order, then sorted).
    * Keys other than the time, process, type and limit keys filter by
      field equality (the original ignored them), and `:order` is
      honoured.
    * Stopping the process does not destroy the native store while a
      caller still holds its handle (`data_access/1`); it is freed when
      the last handle is gone.
  """

  use GenServer

  alias ElixirScope.Args
  alias ElixirScope.Storage.{DataAccess, QueryCoordinator}

  @typedoc """
  The store's state. `primary_table` is the native store
  (`%DataAccess{}`); the index fields name the native indexes that hold
  what the original's ETS indexes held; `event_counter` counts
  `store_event/2` calls.
  """
  @type t :: %__MODULE__{
          name: atom() | nil,
          primary_table: DataAccess.t(),
          temporal_index: :time,
          process_index: :pid,
          function_index: {:function, :event_type},
          event_counter: non_neg_integer()
        }

  defstruct [
    :name,
    :primary_table,
    temporal_index: :time,
    process_index: :pid,
    function_index: {:function, :event_type},
    event_counter: 0
  ]

  @time_keys [:since, :until, :timestamp_since, :timestamp_until]
  @page 1000
  @max_events_limit 536_870_912
  @i64_min -9_223_372_036_854_775_808
  @i64_max 9_223_372_036_854_775_807

  @doc """
  Starts a store. Options: `:name` (default `#{inspect(__MODULE__)}`, as in
  the original; `nil`: not registered) and `:max_events` (default
  1,000,000). Bad options raise `ArgumentError`.
  """
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    {name, max} = opts!(opts)
    GenServer.start_link(__MODULE__, {name, max}, gen_opts(name))
  end

  @doc false
  # Unlinked start (the global `ElixirScope.EventStore`).
  def start(opts) do
    {name, max} = opts!(opts)
    GenServer.start(__MODULE__, {name, max}, gen_opts(name))
  end

  @doc false
  def child_spec(opts) do
    {name, _max} = opts!(opts)
    %{id: name || __MODULE__, start: {__MODULE__, :start_link, [opts]}}
  end

  defp gen_opts(nil), do: []
  defp gen_opts(name), do: [name: name]

  defp opts!(opts) when is_list(opts) do
    opts =
      Args.keyword_opts!(
        opts,
        [name: __MODULE__, max_events: 1_000_000],
        "event store"
      )

    name = opts[:name]

    unless is_atom(name),
      do: raise(ArgumentError, "event store option :name must be an atom, got: #{inspect(name)}")

    max = opts[:max_events]

    unless is_integer(max) and max >= 1 and max <= @max_events_limit,
      do:
        raise(
          ArgumentError,
          "event store option :max_events must be an integer in 1..#{@max_events_limit}, got: " <>
            inspect(max)
        )

    {name, max}
  end

  defp opts!(other),
    do: raise(ArgumentError, "event store options must be a keyword list, got: #{inspect(other)}")

  @doc """
  Stores one event: `:ok` or `{:error, :event_too_large}` (see
  `DataAccess.store_event/2`).
  """
  @spec store_event(GenServer.server(), term()) :: :ok | {:error, term()}
  def store_event(store, event), do: Args.call_server!(store, __MODULE__, {:store_event, event})

  @doc """
  Matching events (see "Filters"): `{:ok, events}`. Bad filters raise
  `ArgumentError`.
  """
  @spec query_events(GenServer.server(), keyword() | map()) :: {:ok, [term()]}
  def query_events(store, filters) do
    q = compile!(filters)
    {:ok, run(data_access(store), q)}
  end

  @doc """
  Index sizes, with the original's keys: `primary_table_size` and
  `temporal_index_size` (every stored event), `process_index_size`
  (events with a pid), `function_index_size` (entries of the original's
  function table: events naming a module and a function plus events with
  an `:event_type`); and `event_type_index_size`, `ast_index_size`. Exact
  for the events kept now.
  """
  @spec get_index_stats(GenServer.server()) :: map()
  def get_index_stats(store) do
    z = DataAccess.index_sizes(data_access(store))

    %{
      primary_table_size: z.total,
      temporal_index_size: z.total,
      process_index_size: z.with_pid,
      function_index_size: z.with_function + z.event_type,
      event_type_index_size: z.event_type,
      ast_index_size: z.ast_node
    }
  end

  @doc "Every stored event, in store order: `{:ok, events}`."
  @spec get_events_via_data_access(GenServer.server()) :: {:ok, [term()]}
  def get_events_via_data_access(store) do
    {:ok, run(data_access(store), compile!([]))}
  end

  @doc "The store's native handle (`%DataAccess{}`), for `DataAccess` and `QueryCoordinator` queries."
  @spec data_access(GenServer.server()) :: DataAccess.t()
  def data_access(store), do: Args.call_server!(store, __MODULE__, :data_access)

  # ---- server ----------------------------------------------------------------------

  @impl true
  def init({name, max}) do
    {:ok, s} = DataAccess.new(max_events: max, name: name)
    {:ok, %__MODULE__{name: name, primary_table: s}}
  end

  @impl true
  def handle_call({:store_event, event}, _from, state) do
    reply = DataAccess.store_event(state.primary_table, event)
    {:reply, reply, %{state | event_counter: state.event_counter + 1}}
  end

  def handle_call(:data_access, _from, state), do: {:reply, state.primary_table, state}

  # ---- queries ---------------------------------------------------------------------

  @doc false
  # {QueryCoordinator spec, post-filters, limit, order}
  def compile!(filters) when is_map(filters), do: compile!(Map.to_list(filters))

  def compile!(filters) when is_list(filters) do
    unless Enum.all?(filters, &match?({k, _} when is_atom(k), &1)),
      do:
        raise(
          ArgumentError,
          "event store filters must be a keyword list or a map with atom keys, got: " <>
            inspect(filters, limit: 5)
        )

    f = Map.new(filters)
    {from, to} = window!(f)
    pid = Map.get(f, :pid)
    unless pid == nil or is_pid(pid), do: bad!(:pid, pid, "a pid")

    limit = Map.get(f, :limit)

    unless limit == nil or (is_integer(limit) and limit >= 0),
      do: bad!(:limit, limit, "a non-negative integer")

    order = Map.get(f, :order, :asc)
    unless order in [:asc, :desc], do: bad!(:order, order, ":asc or :desc")

    spec =
      [pid: pid, from: from, to: to, order: order, as: :event]
      |> put_tag(:event_type, f)
      |> put_tag(:ast_node_id, f)
      |> Enum.reject(fn {_k, v} -> v == nil end)

    post =
      f
      |> Map.drop(@time_keys ++ [:pid, :limit, :order])
      |> Map.to_list()

    %{spec: spec, post: post, limit: limit, order: order}
  end

  def compile!(other),
    do:
      raise(
        ArgumentError,
        "event store filters must be a keyword list or a map, got: #{inspect(other, limit: 5)}"
      )

  defp put_tag(spec, k, f) do
    case Map.fetch(f, k) do
      {:ok, v} when v != nil -> Keyword.put(spec, k, v)
      _ -> spec
    end
  end

  defp window!(f) do
    for k <- @time_keys, v = Map.get(f, k), v != nil do
      unless is_integer(v) or (v == :infinity and k in [:until, :timestamp_until]),
        do: bad!(k, v, "an integer")
    end

    lows = for k <- [:since, :timestamp_since], v = Map.get(f, k), is_integer(v), do: v
    highs = for k <- [:until, :timestamp_until], v = Map.get(f, k), is_integer(v), do: v
    from = if lows == [], do: nil, else: lows |> Enum.max() |> clamp()
    to = if highs == [], do: nil, else: highs |> Enum.min() |> clamp()
    {from, to}
  end

  defp clamp(t), do: t |> max(@i64_min) |> min(@i64_max)

  defp bad!(k, v, what),
    do:
      raise(ArgumentError, "event store filter #{inspect(k)} must be #{what}, got: #{inspect(v)}")

  defp run(%DataAccess{} = s, q) do
    wanted = q.limit || :infinity
    s |> pages(q, wanted, nil, []) |> sort(q.order)
  end

  defp pages(s, q, wanted, cursor, acc) do
    size = if q.post == [] and wanted != :infinity, do: wanted, else: @page
    {:ok, page} = QueryCoordinator.query(s, q.spec ++ [limit: size, cursor: cursor])
    hits = Enum.filter(page.events, &post?(&1, q.post))
    {hits, left} = take(hits, wanted)
    acc = [hits | acc]

    if left == 0 or page.cursor == nil do
      acc |> Enum.reverse() |> Enum.concat()
    else
      pages(s, q, left, page.cursor, acc)
    end
  end

  defp take(hits, :infinity), do: {hits, :infinity}

  defp take(hits, n) do
    {kept, _} = Enum.split(hits, n)
    {kept, n - length(kept)}
  end

  # Tags are hashed: check the value itself; other keys: field equality.
  defp post?(event, post) do
    Enum.all?(post, fn {k, v} ->
      case event do
        %{^k => other} -> other === v
        _ -> false
      end
    end)
  end

  defp sort(events, order) do
    if Enum.all?(events, &match?(%{timestamp: t} when is_integer(t), &1)),
      do: Enum.sort_by(events, & &1.timestamp, order),
      else: events
  end
end

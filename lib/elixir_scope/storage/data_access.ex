defmodule ElixirScope.Storage.DataAccess do
  @moduledoc """
  An indexed, bounded, in-memory event store held natively (Rust).

  Any term can be stored; the ElixirScope event structs (and any map with
  `:id`/`:event_id`, `:timestamp`, `:pid`, `:module`, `:function`,
  `:correlation_id` keys) are indexed by their fields. Events can then be
  fetched by id and queried by time range, process, function and
  correlation id.

  ## Stored form

  The whole event term is copied into native memory as a compact term tape
  (see `ElixirScope.Capture.RingBuffer`), never truncated: an event larger
  than 1 MiB in that form is refused with `{:error, :event_too_large}`.
  Queries decode only the events they return, so what comes back is equal
  (`==`) to what was stored.

  ## Index fields

  | event | id | timestamp | process | module/function | correlation |
  |---|---|---|---|---|---|
  | `Events.FunctionExecution` | `id` | `timestamp` | `caller_pid` | `module`/`function` | `correlation_id` |
  | `Events.ProcessEvent` | `id` | `timestamp` | `pid` | – | – |
  | `Events.MessageEvent` | `id` | `timestamp` | `from_pid` | – | – |
  | `Events.StateChange` | `id` | `timestamp` | `server_pid`, else `pid` | – | `correlation_id` |
  | `Events.ProcessExit` | fresh | `timestamp` | `exited_pid`, else `pid` | – | `correlation_id` |
  | `Events.StateSnapshot` | `snapshot_id` | `timestamp` | `server_pid`, else `pid` | – | `correlation_id` |
  | `Events.FunctionEntry`, `Events.FunctionExit` | fresh | `timestamp` | `pid` | `module`/`function` | `correlation_id` |
  | `Events.PerformanceMetric`, `Events.ErrorEvent` | `id` | `timestamp` | – | – | – |
  | `%Events{}` | `event_id` | `timestamp` | `pid` | from `data` when it is a `FunctionEntry`/`FunctionExit` | `correlation_id` |
  | any other map | `:id` or `:event_id` | `:timestamp` | `:pid` | `:module`/`:function` | `:correlation_id` |
  | any other term | fresh | now | – | – | – |

  * **Ids.** An integer id in `0..2^62-1` is used as is. Any other id term is
    mapped to a stable key of 2^63 + a 63-bit hash (two `:erlang.phash2/2`
    hashes), so it never equals an integer id; distinct terms hashing to
    the same key are not told apart. An event without an id (`nil` or no
    key) gets the fresh key 2^62 + `ElixirScope.Native.next_event_id/0`,
    distinct from both; it can only be found by the other queries. Storing an id that is already stored is
    a no-op (the first copy is kept and the event is counted once).
  * **Timestamps** are integers (nanoseconds, `System.monotonic_time/1` by
    convention). A missing, `nil`, non-integer or beyond-64-bit timestamp
    is replaced, for indexing only, by `System.monotonic_time(:nanosecond)`
    at store time.
  * **Correlation ids** are keyed like ids (`nil` is a key of its own: a
    query for `nil` finds the events without a correlation id).
  * **Processes, modules, functions** are keyed by the term itself (local
    pids and atoms by their VM word, anything else by its hash).
    A `nil` pid is no process (not counted in `index_sizes/1`'s
    `with_pid`).
  * **Event types and AST nodes.** The `:event_type` and `:ast_node_id`
    fields of any map or struct (when not `nil`) are indexed natively by
    a 63-bit hash of the term (`query_by_event_type/3`,
    `query_by_ast_node/3`, and the `:event_type` / `:ast_node_id` keys of
    `QueryCoordinator.query/2`); like the other indexes they hold only
    the events kept, and cost nothing in a store that never sees such a
    field. Trace files keep both keys (format 1.2; a file of format 1.1
    keeps the event-type keys only): a loaded store answers these queries
    as the saved one did.

  ## Bounds

  At most `:max_events` events are kept: storing into a full store evicts
  the oldest stored event (`total_events` never exceeds `max_events`).
  `cleanup_old_events/2` removes events by age.

  ## Scheduling

  Every call that may wait for the store runs on a dirty CPU scheduler:
  the store is behind one lock, writers and readers of the same store take
  turns (a write waits for a running query), and waiting must never hold
  a normal scheduler. `store_events/2` stores in chunks of 1,000. A small
  write (`store_event/2`, or `store_events/2` of at most 32
  events and 256 KiB) into a store with room for it first *tries* the
  lock on the caller's scheduler and, if it is free, stores there without
  waiting: waking a dirty scheduler takes milliseconds on a loaded machine
  (measured: p90 16 ms for ten events at a load of 16 on 2 cores, 31 µs
  without the hop).

  ## Pipeline stores

  `ElixirScope.Capture.PipelineManager.data_access/1` returns a handle on a
  pipeline's store: the same queries work on it and return the events as
  `ElixirScope.Events` structs; `get_correlated/2`, `causal_chain/2`,
  `call_contents/3` and `children/3` add what the pipeline's correlator
  found. Such a handle is read-only: `store_event/2` and `store_events/2`
  return `{:error, :read_only}`, and `destroy/1` is a no-op returning `:ok`
  (the pipeline owns its store; it is freed once the pipeline and every
  handle are gone).

  ## Stores loaded from trace files

  `ElixirScope.TraceFile.load/2` returns a read-only store holding the
  events of one or several files: every query works on it as on the store
  they were saved from. `destroy/1` frees it.

  ## Destroyed stores

  After `destroy/1`, `store_event/2` and `store_events/2` return
  `{:error, :destroyed}`, `destroy/1` returns `:ok` and every other
  function raises `ArgumentError`.

  ## Example

      iex> alias ElixirScope.Storage.DataAccess
      iex> {:ok, store} = DataAccess.new(max_events: 100)
      iex> :ok = DataAccess.store_event(store, %{id: 1, timestamp: 10, pid: self()})
      iex> DataAccess.get_event(store, 1)
      {:ok, %{id: 1, timestamp: 10, pid: self()}}
      iex> DataAccess.query_by_time_range(store, 0, 5)
      {:ok, []}
  """

  import Bitwise, only: [<<<: 2, bor: 2, bxor: 2]

  alias ElixirScope.{Args, Events, Native}

  alias ElixirScope.Events.{
    ErrorEvent,
    FunctionEntry,
    FunctionExecution,
    FunctionExit,
    MessageEvent,
    PerformanceMetric,
    ProcessEvent,
    ProcessExit,
    StateChange,
    StateSnapshot
  }

  @enforce_keys [:ref, :max_events]
  defstruct [:ref, :max_events, :name, :source]

  @typedoc """
  A store handle. `ref` is the native resource; `source` is nil, or for a
  store loaded by `ElixirScope.TraceFile.load/2` what was loaded (files,
  their headers, whether each was complete, notes).
  """
  @type t :: %__MODULE__{
          ref: reference(),
          max_events: pos_integer(),
          name: term(),
          source: map() | nil
        }
  @type query_opts :: [limit: non_neg_integer(), order: :asc | :desc]

  @max_events_limit 1 <<< 29
  @chunk 1000
  # Events store_try_put_batch takes (FAST_CHUNK in store_nif.rs).
  @fast_chunk 32
  @fresh_bit 1 <<< 62
  @hash_bit 1 <<< 63
  @two32 1 <<< 32
  @i64_min Bitwise.bsl(-1, 63)
  @i64_max (1 <<< 63) - 1
  @max_limit 1 <<< 62
  @defaults [name: nil, max_events: 1_000_000]
  @query_defaults [limit: 1000, order: :asc]

  @doc """
  Creates a store.

  | option | default | meaning |
  |---|---|---|
  | `:max_events` | `1_000_000` | most events kept, an integer in 1..#{@max_events_limit} |
  | `:name` | `nil` | any term, kept in the struct for identification |

  Bad options raise `ArgumentError`.
  """
  @spec new(keyword()) :: {:ok, t()}
  def new(opts \\ [])

  def new(opts) when is_list(opts) do
    opts = Args.keyword_opts!(opts, @defaults, "data access")

    max = opts[:max_events]

    unless is_integer(max) and max >= 1 and max <= @max_events_limit do
      raise ArgumentError,
            "data access option :max_events must be an integer in 1..#{@max_events_limit}, " <>
              "got: #{inspect(max)}"
    end

    {:ok, ref} = Native.store_new(max)
    {:ok, %__MODULE__{ref: ref, max_events: max, name: opts[:name]}}
  end

  def new(opts) do
    raise ArgumentError, "data access options must be a keyword list, got: #{inspect(opts)}"
  end

  @doc """
  Stores one event (any term).

  Returns `:ok` (also when an event with the same id is already stored:
  it is kept once), `{:error, :event_too_large}` or `{:error, :destroyed}`.
  """
  @spec store_event(t(), term()) :: :ok | {:error, :event_too_large | :destroyed}
  def store_event(%__MODULE__{} = s, event) do
    {id, ts, pid, m, f, corr} = header(event)
    {tk, ak} = keys = term_keys(event)

    nif(s, fn ref ->
      case Native.store_try_put_batch(ref, [{id, ts, pid, m, f, {corr, tk, ak}, event}]) do
        :busy -> Native.store_put(ref, id, ts, pid, m, f, corr, keys, event)
        result -> result
      end
    end)
  end

  def store_event(other, _event), do: bad_store!(other)

  @doc """
  Stores a list of events, #{@chunk} per native call.

  Returns `{:ok, length(events)}` (duplicates included: they are accepted
  and stored once), or `{:error, :event_too_large | :destroyed}`: the
  chunks before the failing one are stored, nothing of the failing chunk
  or after it is.
  """
  @spec store_events(t(), [term()]) ::
          {:ok, non_neg_integer()} | {:error, :event_too_large | :destroyed}
  def store_events(%__MODULE__{} = s, events) when is_list(events) do
    Args.proper_list!(events, "events")
    store_chunks(s, events, 0)
  end

  def store_events(%__MODULE__{}, events),
    do: raise(ArgumentError, "events must be a list, got: #{inspect(events, limit: 5)}")

  def store_events(other, _events), do: bad_store!(other)

  defp store_chunks(_s, [], n), do: {:ok, n}

  defp store_chunks(s, events, n) do
    {entries, rest, k} = take_chunk(events, [], 0)

    case nif(s, fn ref -> put_batch(ref, entries, k) end) do
      :ok -> store_chunks(s, rest, n + k)
      {:error, _} = error -> error
    end
  end

  # Small batches first try the caller's scheduler (no wait, bounded work;
  # a dirty scheduler is slow to wake on a loaded machine), else dirty.
  defp put_batch(ref, entries, k) when k <= @fast_chunk do
    case Native.store_try_put_batch(ref, entries) do
      :busy -> Native.store_put_batch(ref, entries)
      result -> result
    end
  end

  defp put_batch(ref, entries, _k), do: Native.store_put_batch(ref, entries)

  # Entries in list order (the store keeps insertion order).
  defp take_chunk(rest, acc, @chunk), do: {:lists.reverse(acc), rest, @chunk}
  defp take_chunk([], acc, k), do: {:lists.reverse(acc), [], k}

  defp take_chunk([event | rest], acc, k) do
    {id, ts, pid, m, f, corr} = header(event)
    {tk, ak} = term_keys(event)
    take_chunk(rest, [{id, ts, pid, m, f, {corr, tk, ak}, event} | acc], k + 1)
  end

  @doc "Fetches the event with this id (keyed as described in the moduledoc)."
  @spec get_event(t(), term()) :: {:ok, term()} | {:error, :not_found}
  def get_event(%__MODULE__{} = s, nil) do
    # Id-less events get fresh ids: `nil` names none of them.
    nif(s, fn ref -> Native.store_stats(ref) end)
    {:error, :not_found}
  end

  def get_event(%__MODULE__{} = s, id) do
    key = key(id)
    nif(s, fn ref -> quick(ref, :get, key, nil, 1, false, &Native.store_get(&1, key)) end)
  end

  def get_event(other, _id), do: bad_store!(other)

  @doc """
  Events with `start_time <= timestamp <= end_time` (integers), ordered by
  timestamp (then store order).

  Options: `limit: 1000` (most events returned), `order: :asc | :desc`.
  """
  @spec query_by_time_range(t(), integer(), integer(), query_opts()) :: {:ok, [term()]}
  def query_by_time_range(s, start_time, end_time, opts \\ [])

  def query_by_time_range(%__MODULE__{} = s, t0, t1, opts)
      when is_integer(t0) and is_integer(t1) do
    {limit, desc} = query_opts!(opts)
    t0 = clamp(t0)
    t1 = clamp(t1)

    {:ok,
     nif(s, fn ref ->
       quick(
         ref,
         :time,
         t0,
         t1,
         limit,
         desc,
         &Native.store_by_time_range(&1, t0, t1, limit, desc)
       )
     end)}
  end

  def query_by_time_range(%__MODULE__{}, t0, t1, _opts) do
    bad = if is_integer(t0), do: {"end_time", t1}, else: {"start_time", t0}
    raise ArgumentError, "#{elem(bad, 0)} must be an integer, got: #{inspect(elem(bad, 1))}"
  end

  def query_by_time_range(other, _t0, _t1, _opts), do: bad_store!(other)

  @doc """
  Events of process `pid` (see the index table), in store order.
  Options as for `query_by_time_range/4`.
  """
  @spec query_by_process(t(), pid(), query_opts()) :: {:ok, [term()]}
  def query_by_process(s, pid, opts \\ [])

  def query_by_process(%__MODULE__{} = s, pid, opts) when is_pid(pid) do
    {limit, desc} = query_opts!(opts)

    {:ok,
     nif(s, fn ref ->
       quick(ref, :pid, pid, nil, limit, desc, &Native.store_by_pid(&1, pid, limit, desc))
     end)}
  end

  def query_by_process(%__MODULE__{}, pid, _opts),
    do: raise(ArgumentError, "pid must be a pid, got: #{inspect(pid)}")

  def query_by_process(other, _pid, _opts), do: bad_store!(other)

  @doc """
  Events of `module.function` (atoms), in store order.
  Options as for `query_by_time_range/4`.
  """
  @spec query_by_function(t(), module(), atom(), query_opts()) :: {:ok, [term()]}
  def query_by_function(s, module, function, opts \\ [])

  def query_by_function(%__MODULE__{} = s, module, function, opts)
      when is_atom(module) and is_atom(function) do
    {limit, desc} = query_opts!(opts)

    {:ok,
     nif(s, fn ref ->
       quick(
         ref,
         :function,
         module,
         function,
         limit,
         desc,
         &Native.store_by_function(&1, module, function, limit, desc)
       )
     end)}
  end

  def query_by_function(%__MODULE__{}, module, function, _opts) do
    bad = if is_atom(module), do: {"function", function}, else: {"module", module}
    raise ArgumentError, "#{elem(bad, 0)} must be an atom, got: #{inspect(elem(bad, 1))}"
  end

  def query_by_function(other, _module, _function, _opts), do: bad_store!(other)

  @doc """
  Events with this correlation id (any term, keyed like ids), in store
  order. Options as for `query_by_time_range/4`.
  """
  @spec query_by_correlation(t(), term(), query_opts()) :: {:ok, [term()]}
  def query_by_correlation(s, correlation_id, opts \\ [])

  def query_by_correlation(%__MODULE__{} = s, correlation_id, opts) do
    {limit, desc} = query_opts!(opts)
    key = key(correlation_id)

    {:ok,
     nif(s, fn ref ->
       quick(
         ref,
         :correlation,
         key,
         nil,
         limit,
         desc,
         &Native.store_by_correlation(&1, key, limit, desc)
       )
     end)}
  end

  def query_by_correlation(other, _correlation_id, _opts), do: bad_store!(other)

  @doc """
  The stored event `id` with its correlation, as the pipeline computed it:
  `{:ok, %{event, id, correlation_id, parent_id, root_id, links,
  correlation_type, timestamp}}` or `{:error, :not_found}`.

  `links` are `{:called_from, call_id}` (a call made inside another),
  `{:completes, call_id}` (a return or exception), `{:receives, send_id}` (a
  matched receive, also when the match was found after the receive was
  stored), `{:spawned_by, parent_pid}` and `{:state_in, call_id}`.
  `parent_id`/`root_id` are `nil` when there is none. Events stored with
  `store_event/2` have no correlation of their own: their
  `correlation_id` is the key of the event's `correlation_id` field.
  """
  @spec get_correlated(t(), term()) :: {:ok, map()} | {:error, :not_found}
  def get_correlated(%__MODULE__{} = s, id) do
    key = key(id)
    nif(s, fn ref -> Native.store_get_correlated(ref, key) end)
  end

  def get_correlated(other, _id), do: bad_store!(other)

  @doc """
  The causal chain of event `id`: the event and its ancestors (the calls
  that enclose it, following `parent_id` while stored), root first, as
  `get_correlated/2` maps; `{:ok, []}` if `id` is not stored. At most 4,096
  events.
  """
  @spec causal_chain(t(), term()) :: {:ok, [map()]}
  def causal_chain(%__MODULE__{} = s, id) do
    key = key(id)

    {:ok,
     nif(s, fn ref ->
       quick(ref, :chain, key, nil, 0, false, &Native.store_causal_chain(&1, key))
     end)}
  end

  def causal_chain(other, _id), do: bad_store!(other)

  @doc """
  Everything inside call `call_id`: the call, the calls nested in it (at
  any depth), the messages sent and received, the spawns and state changes
  inside them, and the returns — in store order, as `get_correlated/2`
  maps. Option `limit:` (default 1,000). Cost is proportional to the
  result, not to the store.
  """
  @spec call_contents(t(), term(), keyword()) :: {:ok, [map()]}
  def call_contents(s, call_id, opts \\ [])

  def call_contents(%__MODULE__{} = s, call_id, opts) do
    {limit, _desc} = query_opts!(opts)
    key = key(call_id)
    {:ok, nif(s, fn ref -> Native.store_call_contents(ref, key, limit) end)}
  end

  def call_contents(other, _call_id, _opts), do: bad_store!(other)

  @doc """
  The events directly caused by event `id` (its `parent_id` is `id`): for
  a call, the calls, sends, receives, spawns and state changes made
  directly inside it, and the returns of those calls. Oldest first, as `get_correlated/2` maps; option
  `limit:` (default 1,000).
  """
  @spec children(t(), term(), keyword()) :: {:ok, [map()]}
  def children(s, id, opts \\ [])

  def children(%__MODULE__{} = s, id, opts) do
    {limit, _desc} = query_opts!(opts)
    key = key(id)
    {:ok, nif(s, fn ref -> Native.store_children(ref, key, limit) end)}
  end

  def children(other, _id, _opts), do: bad_store!(other)

  @doc false
  # A handle on a pipeline's store (see `PipelineManager.data_access/1`).
  @spec from_pipeline(reference(), pos_integer(), term()) :: t()
  def from_pipeline(ref, max_events, name),
    do: %__MODULE__{ref: ref, max_events: max_events, name: name}

  @doc """
  Store statistics:

    * `total_events` — events stored now (never more than `max_events`);
    * `max_events`;
    * `oldest_timestamp`, `newest_timestamp` — among stored events, `nil`
      when empty;
    * `last_cleanup` — wall time (`System.system_time(:millisecond)`) of the
      last `cleanup_old_events/2`, or `nil`;
    * `memory_usage` — native bytes used, payloads included;

  and the counters `payload_bytes` (part of `memory_usage`), `inserted`
  (store attempts), `evicted` (by `max_events`), `expired` (by
  `cleanup_old_events/2`), `duplicates` (ids already stored) and
  `rejected` (too large), with `inserted = total_events + evicted + expired
  + duplicates + rejected`; `reclaimed_bytes` and `compactions` count the
  memory `cleanup_old_events/2` gave back.
  """
  @spec get_stats(t()) :: %{
          required(:total_events) => non_neg_integer(),
          required(:max_events) => pos_integer(),
          required(:oldest_timestamp) => integer() | nil,
          required(:newest_timestamp) => integer() | nil,
          required(:last_cleanup) => integer() | nil,
          required(:memory_usage) => non_neg_integer(),
          optional(atom()) => non_neg_integer()
        }
  def get_stats(%__MODULE__{} = s), do: nif(s, &Native.store_stats/1)
  def get_stats(other), do: bad_store!(other)

  @doc """
  Removes every event whose timestamp is `< cutoff_time` and returns
  `{:ok, removed}` (counted in `expired`). `cutoff_time` is an integer in
  the events' timestamp unit: as in the original, monotonic nanoseconds
  (`System.monotonic_time(:nanosecond)`, `ElixirScope.Utils.monotonic_timestamp/0`,
  the clock every `ElixirScope.Events` struct and the ring stamp events
  with), so `Utils.monotonic_timestamp() - 60 * 1_000_000_000` keeps the
  last minute. Events stored without an integer timestamp were indexed at
  the time they were stored.

  The memory of the removed events is given back at once: their payload
  bytes are freed (the store's segments they were in are compacted, and a
  segment left empty is freed whole), so `memory_usage` in `get_stats/1`
  drops after a cleanup that removed events; `reclaimed_bytes` counts it.
  """
  @spec cleanup_old_events(t(), integer()) :: {:ok, non_neg_integer()}
  def cleanup_old_events(%__MODULE__{} = s, cutoff_time) when is_integer(cutoff_time) do
    cutoff = clamp(cutoff_time)
    now = System.system_time(:millisecond)
    {:ok, nif(s, fn ref -> Native.store_evict(ref, cutoff, now) end)}
  end

  def cleanup_old_events(%__MODULE__{}, cutoff),
    do: raise(ArgumentError, "cutoff_time must be an integer, got: #{inspect(cutoff)}")

  def cleanup_old_events(other, _cutoff), do: bad_store!(other)

  @doc """
  Destroys the store: its memory is freed at once and the handle stops
  working (see "Destroyed stores"). Idempotent.
  """
  @spec destroy(t()) :: :ok
  def destroy(%__MODULE__{} = s), do: nif(s, &Native.store_destroy/1)
  def destroy(other), do: bad_store!(other)

  @doc false
  @spec bad_store!(term()) :: no_return()
  def bad_store!(other) do
    raise ArgumentError,
          "expected an %ElixirScope.Storage.DataAccess{} (from DataAccess.new/1), got: " <>
            inspect(other, limit: 5, printable_limit: 40)
  end

  # ---------------------------------------------------------------------------
  # Event-type and AST-node indexes
  # ---------------------------------------------------------------------------

  @doc """
  Events whose `:event_type` field is `event_type` (any term; maps and
  structs with an `:event_type` key are indexed by it), in store order.
  Options as for `query_by_time_range/4`.
  """
  @spec query_by_event_type(t(), term(), query_opts()) :: {:ok, [term()]}
  def query_by_event_type(s, event_type, opts \\ [])

  def query_by_event_type(%__MODULE__{} = s, event_type, opts) do
    {limit, desc} = query_opts!(opts)
    key = tag_key(event_type)

    {:ok,
     s
     |> nif(fn ref -> Native.store_by_event_type(ref, key, limit, desc) end)
     |> exact(:event_type, event_type)}
  end

  def query_by_event_type(other, _event_type, _opts), do: bad_store!(other)

  @doc """
  Events whose `:ast_node_id` field is `ast_node_id` (any term but `nil`;
  maps and structs with an `:ast_node_id` key are indexed by it), in store
  order. Options as for `query_by_time_range/4`.
  """
  @spec query_by_ast_node(t(), term(), query_opts()) :: {:ok, [term()]}
  def query_by_ast_node(s, ast_node_id, opts \\ [])

  def query_by_ast_node(%__MODULE__{} = s, ast_node_id, opts) do
    {limit, desc} = query_opts!(opts)
    key = tag_key(ast_node_id)

    {:ok,
     s
     |> nif(fn ref -> Native.store_by_ast_node(ref, key, limit, desc) end)
     |> exact(:ast_node_id, ast_node_id)}
  end

  def query_by_ast_node(other, _ast_node_id, _opts), do: bad_store!(other)

  @doc """
  How many stored events each index holds now: `total` (every event is in
  the id and time indexes), `with_pid` (events with a process),
  `with_function` (events naming a module and a function), `event_type`
  and `ast_node` (events with an `:event_type` / `:ast_node_id`). Exact
  (evicted and expired events are not counted); cost: one step per
  segment of the store.
  """
  @spec index_sizes(t()) :: %{
          total: non_neg_integer(),
          with_pid: non_neg_integer(),
          with_function: non_neg_integer(),
          event_type: non_neg_integer(),
          ast_node: non_neg_integer()
        }
  def index_sizes(%__MODULE__{} = s), do: nif(s, &Native.store_index_sizes/1)
  def index_sizes(other), do: bad_store!(other)

  @doc false
  # The index key of an `:event_type` / `:ast_node_id` value: 0 for nil
  # (not indexed), else 2^63 + a 63-bit hash (never 0).
  @spec tag_key(term()) :: non_neg_integer()
  def tag_key(nil), do: 0

  def tag_key(term) do
    high = :erlang.phash2({:tag, term}, @two32) <<< 31
    bor(@hash_bit, bxor(high, :erlang.phash2({:tag2, term}, @two32)))
  end

  # Keys are hashes: drop the (rare) events of another value sharing one.
  defp exact(events, field, value) do
    Enum.filter(events, fn
      %{^field => v} -> v === value
      _ -> false
    end)
  end

  defp term_keys(%{} = e),
    do: {tag_key(Map.get(e, :event_type)), tag_key(Map.get(e, :ast_node_id))}

  defp term_keys(_other), do: {0, 0}

  # ---------------------------------------------------------------------------
  # Default storage: the original's one-argument functions
  # ---------------------------------------------------------------------------

  @default_key {__MODULE__, :default_storage}
  @plan_key {__MODULE__, :instrumentation_plan}

  @doc """
  The node's default store, created on first use and kept for the life of
  the VM (in `:persistent_term`). Its options come from `config
  :elixir_scope, :default_storage` (a keyword list for `new/1`, default
  `[]`: 1,000,000 events at most); its name is `:elixir_scope_default`.
  Concurrent first calls create one store (under a node-local lock).
  """
  @spec default_storage() :: {:ok, t()}
  def default_storage do
    case :persistent_term.get(@default_key, nil) do
      %__MODULE__{} = s ->
        {:ok, s}

      nil ->
        :global.trans({@default_key, self()}, &create_default/0, [node()])
    end
  end

  defp create_default do
    case :persistent_term.get(@default_key, nil) do
      %__MODULE__{} = s ->
        {:ok, s}

      nil ->
        opts = Application.get_env(:elixir_scope, :default_storage, [])

        unless is_list(opts) do
          raise ArgumentError,
                "config :elixir_scope, :default_storage must be a keyword list, got: " <>
                  inspect(opts)
        end

        {:ok, s} = new(Keyword.put_new(opts, :name, :elixir_scope_default))
        :persistent_term.put(@default_key, s)
        {:ok, s}
    end
  end

  @doc """
  The default store's events with `since_timestamp <= timestamp <= now`
  (`System.monotonic_time(:nanosecond)`), oldest first, at most 10,000 —
  a list, as in the original.
  """
  @spec get_events_since(integer()) :: [term()]
  def get_events_since(since_timestamp) when is_integer(since_timestamp) do
    {:ok, s} = default_storage()
    now = System.monotonic_time(:nanosecond)
    {:ok, events} = query_by_time_range(s, since_timestamp, now, limit: 10_000)
    events
  end

  def get_events_since(other),
    do: raise(ArgumentError, "since_timestamp must be an integer, got: #{inspect(other)}")

  @doc "Whether the default store holds an event with this id (see `get_event/2`)."
  @spec event_exists?(term()) :: boolean()
  def event_exists?(event_id) do
    {:ok, s} = default_storage()
    match?({:ok, _}, get_event(s, event_id))
  end

  @doc """
  Stores `events` in the default store: `:ok` or `{:error, reason}` (see
  `store_events/2`).
  """
  @spec store_events([term()]) :: :ok | {:error, :event_too_large | :destroyed}
  def store_events(events) when is_list(events) do
    {:ok, s} = default_storage()

    case store_events(s, events) do
      {:ok, _n} -> :ok
      {:error, _} = error -> error
    end
  end

  def store_events(other),
    do: raise(ArgumentError, "events must be a list, got: #{inspect(other, limit: 5)}")

  @doc """
  The instrumentation plan stored by `store_instrumentation_plan/1`:
  `{:ok, plan}` or `{:error, :not_found}`.
  """
  @spec get_instrumentation_plan() :: {:ok, term()} | {:error, :not_found}
  def get_instrumentation_plan do
    case :persistent_term.get(@plan_key, :none) do
      :none -> {:error, :not_found}
      {:plan, plan} -> {:ok, plan}
    end
  end

  @doc """
  Stores the node's instrumentation plan (any term; a later call replaces
  it): `:ok`. It is kept in `:persistent_term`, so replacing it costs a
  scan of every process (the plan changes rarely: at compile time or when
  an operator changes it).
  """
  @spec store_instrumentation_plan(term()) :: :ok
  def store_instrumentation_plan(plan) do
    :persistent_term.put(@plan_key, {:plan, plan})
    :ok
  end

  # ---------------------------------------------------------------------------
  # Helpers
  # ---------------------------------------------------------------------------

  # Calls a NIF with the store's ref. Every other argument is checked (or
  # built) here, so the NIF's bare `ArgumentError` means the ref is not a
  # store resource (a forged struct); destroyed stores raise their own.
  # A query on the caller's scheduler first (`Native.store_quick/6`: small
  # answers, store lock free), else the dirty NIF `dirty`.
  defp quick(ref, op, a, b, limit, desc, dirty) do
    case Native.store_quick(ref, op, a, b, limit, desc) do
      :busy -> dirty.(ref)
      result -> result
    end
  end

  defp nif(%__MODULE__{ref: ref} = s, fun) do
    fun.(ref)
  rescue
    e in ArgumentError ->
      if e.message == "argument error" do
        raise ArgumentError,
              "expected a %ElixirScope.Storage.DataAccess{} from DataAccess.new/1; " <>
                "its ref is not a store: #{inspect(s, limit: 5)}"
      else
        reraise e, __STACKTRACE__
      end
  end

  defp query_opts!(opts) when is_list(opts) do
    opts = Args.keyword_opts!(opts, @query_defaults, "query")

    limit =
      case opts[:limit] do
        l when is_integer(l) and l >= 0 ->
          min(l, @max_limit)

        l ->
          raise ArgumentError,
                "query option :limit must be a non-negative integer, got: #{inspect(l)}"
      end

    desc =
      case opts[:order] do
        :asc -> false
        :desc -> true
        o -> raise ArgumentError, "query option :order must be :asc or :desc, got: #{inspect(o)}"
      end

    {limit, desc}
  end

  defp query_opts!(opts),
    do: raise(ArgumentError, "query options must be a keyword list, got: #{inspect(opts)}")

  defp clamp(t), do: t |> max(@i64_min) |> min(@i64_max)

  # {id key, timestamp, pid, module, function, correlation key}
  defp header(%FunctionExecution{} = e),
    do: {id_key(e.id), ts(e.timestamp), e.caller_pid, e.module, e.function, key(e.correlation_id)}

  defp header(%ProcessEvent{} = e), do: {id_key(e.id), ts(e.timestamp), e.pid, nil, nil, key(nil)}

  defp header(%MessageEvent{} = e),
    do: {id_key(e.id), ts(e.timestamp), e.from_pid, nil, nil, key(nil)}

  defp header(%StateChange{} = e),
    do: {id_key(e.id), ts(e.timestamp), e.server_pid || e.pid, nil, nil, key(e.correlation_id)}

  defp header(%ProcessExit{} = e),
    do: {id_key(nil), ts(e.timestamp), e.exited_pid || e.pid, nil, nil, key(e.correlation_id)}

  defp header(%StateSnapshot{} = e),
    do:
      {id_key(e.snapshot_id), ts(e.timestamp), e.server_pid || e.pid, nil, nil,
       key(e.correlation_id)}

  defp header(%PerformanceMetric{} = e),
    do: {id_key(e.id), ts(e.timestamp), nil, nil, nil, key(nil)}

  defp header(%ErrorEvent{} = e), do: {id_key(e.id), ts(e.timestamp), nil, nil, nil, key(nil)}

  defp header(%Events{} = e) do
    {m, f} =
      case e.data do
        %FunctionEntry{module: m, function: f} -> {m, f}
        %FunctionExit{module: m, function: f} -> {m, f}
        _ -> {nil, nil}
      end

    {id_key(e.event_id), ts(e.timestamp), e.pid, m, f, key(e.correlation_id)}
  end

  defp header(%{} = map) do
    id =
      case map do
        %{id: id} when id != nil -> id
        %{event_id: id} -> id
        _ -> nil
      end

    {id_key(id), ts(Map.get(map, :timestamp)), Map.get(map, :pid), Map.get(map, :module),
     Map.get(map, :function), key(Map.get(map, :correlation_id))}
  end

  defp header(_other), do: {id_key(nil), ts(nil), nil, nil, nil, key(nil)}

  # Three disjoint key spaces: integer ids below 2^62 as is, fresh ids of
  # id-less events (2^62 + counter), hashes of other ids (2^63 + hash).
  defp id_key(nil), do: bor(@fresh_bit, Native.next_event_id())
  defp id_key(id), do: key(id)

  defp key(id) when is_integer(id) and id >= 0 and id < @fresh_bit, do: id

  defp key(term) do
    high = :erlang.phash2({:id, term}, @two32) <<< 31
    bor(@hash_bit, bxor(high, :erlang.phash2({:id2, term}, @two32)))
  end

  defp ts(t) when is_integer(t) and t >= @i64_min and t <= @i64_max, do: t
  defp ts(_), do: System.monotonic_time(:nanosecond)

  defimpl Inspect do
    import Inspect.Algebra

    def inspect(%{max_events: max, name: name}, opts) do
      fields = [max_events: max] ++ if(name, do: [name: name], else: [])
      concat(["#DataAccess<", to_doc(fields, opts), ">"])
    end
  end
end

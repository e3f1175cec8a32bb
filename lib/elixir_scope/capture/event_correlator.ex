defmodule ElixirScope.Capture.EventCorrelator do
  @moduledoc """
  Establishes causal links between events: function calls and their
  returns, message sends and their receives, process spawns and exits, and
  state changes inside calls. The correlation state is held natively (Rust)
  and bounded by a TTL and a maximum number of correlations.

  A correlator is a `GenServer` that owns the native handle and runs the
  periodic TTL sweep. Correlation itself does not go through its mailbox:
  `correlate_event/2` and `correlate_batch/2` run in the *caller's* process
  on the shared handle (found through `:persistent_term`), so a batch is
  never copied into the server. Calls from several processes are serialised
  per chunk of events by a lock; events of one process must be correlated
  in order by one caller (per-process order is what the correlation
  relies on).

  ## Rules

    * **Calls** push a frame on their process's call stack: `parent_id` is
      the call on top (also linked as `{:called_from, parent}`), `root_id`
      the bottom of the stack (the call itself on an empty stack).
    * **Returns** complete a frame and link `{:completes, call}`; their
      `correlation_id` is the call's. A return carrying a correlation id
      completes the call it names: the call whose *event id* it is (the
      `correlation_id` this correlator returned for the call), or else the
      innermost open call made with the same correlation id (`call_id` of
      `FunctionEntry`/`FunctionExit`, `correlation_id` of
      `FunctionExecution` or of the `%Events{}` envelope). Frames above it
      are unwound (counted in `unwound_frames`). A return without one
      completes the top frame; one naming no open call completes nothing
      (`unmatched_returns`) and leaves the stack alone. A return whose
      process is unknown (`caller_pid: nil`, as the Ingestor writes them)
      is attributed to the process of the call its correlation id names.
    * **Messages** are matched by receiver and `:erlang.phash2/1` of the
      message: a receive takes the *oldest* unmatched identical send (FIFO),
      links `{:receives, send}` and takes the send's id as its
      `correlation_id`. Its `correlation_confidence` is `1 / n` when `n`
      different senders have identical messages waiting for that receiver.
    * **Receive before send** (events arriving out of order): the receive is
      returned unlinked (confidence `0.0`) and waits; when the matching send
      is correlated later, the send is returned normally and the link is
      recorded in the metadata: `get_correlation_metadata(c, receive_id)`
      then shows `links: [{:receives, send_id}]`, and the send's metadata
      `received_by: receive_id`.
    * **Spawns** record the process tree and link `{:spawned_by, parent_pid}`;
      **exits** clear the process's stack (open calls are counted in
      `orphaned_calls`) and link `{:spawned_by, parent_pid}` when the spawn
      was seen.
    * **State changes** are linked to the call in progress on that process
      (`{:state_in, call}`, also its `parent_id`).
    * Anything else is `:unknown` with confidence `0.0`.

  ## Events understood

  | event | type | process | other fields used |
  |---|---|---|---|
  | `FunctionExecution` `:call` / `:return`, `:exception` | call / return | `caller_pid` | `id`, `correlation_id` |
  | `FunctionEntry` / `FunctionExit` | call / return | `pid`, else the envelope's | `call_id`, else `correlation_id`; `exit_reason` |
  | `MessageEvent` `:send` / `:receive` | send / receive | `from_pid` / `to_pid` | `id`, `to_pid`, `message` |
  | `MessageSend` / `MessageReceive` | send / receive | `sender_pid` / `receiver_pid` | `receiver_pid`, `message` |
  | `MessageSent` / `MessageReceived` | send / receive | `from_pid` / `pid` | `to_pid`, `message` |
  | `CallbackReply` | return (completes its call) | `server_pid`, else `pid` | `call_id` |
  | `ProcessEvent` `:spawn` / `:exit` | spawn / exit | `parent_pid` / `pid` | `id`, `pid` |
  | `ProcessSpawn` / `ProcessExit` | spawn / exit | `parent_pid` / `exited_pid`, else `pid` | `spawned_pid` |
  | `StateChange` | state change | `server_pid`, else `pid` | `id` |
  | `%Events{}` wrapping any of these | as its `data` | data's, else `pid` | `event_id` (the id), `correlation_id` |
  | `%Events{}` with other data | by `event_type` (`:function_entry`, `:message_send`, `:message_sent`, `:callback_reply`, ...) | `pid` | `data.message`, `data.to_pid`, ... |
  | anything else | `:unknown` | – | `event_id` or `id` if present |

  ## Ids

  An integer id in `0..2^63-1` (what `ElixirScope.Events.generate_id/0`
  returns) is used as is. An event without an id (`FunctionEntry` and the
  other data structs without an id field, or `id: nil`) gets the fresh id
  `2^62 + ElixirScope.Native.next_event_id()`, returned as that integer. Any
  other id term (a string, a tuple, a ref, a negative integer...) is hashed
  (59 bits) into a key range of its own and results show the term itself:
  within one call the very term the caller gave, in later calls a copy the
  correlator keeps. Distinct terms with equal hashes are not told apart. A
  kept term is forgotten, and then shown as its integer key, once
  `max_correlations` newer terms have been kept since it was last given or
  shown (so an open call's id that newer events keep referring to stays;
  at most `max_correlations × 9 / 8` terms are kept), and a term larger than
  about 4 KiB is not kept past its call. Integer ids from `2^62` up may
  collide with fresh ids. Non-integer ids cost more than integers (a hash
  and, once per term, a copy); `bench/correlator_bench.exs` ("id shapes")
  measures integer, string and tuple ids.

  ## Bounds

    * Tracked state (open call frames, unmatched sends and receives,
      process-tree entries; `active_correlations`) never exceeds
      `max_correlations`: the oldest unmatched message or tree entry is
      evicted to make room (`evicted`); if everything tracked is an open
      call frame, new calls are not tracked (`refused`, confidence `0.0`).
    * Correlation metadata (one record per call, send, unmatched receive,
      spawn, exit and state change) is kept at most `max_correlations`
      records (oldest evicted first) and at most `correlation_ttl_ms` after
      it was created; the sweep runs every `cleanup_interval_ms` and on
      `cleanup_expired_correlations/1`. It also drops unmatched sends and
      receives older than the TTL (`expired`). Open call frames are not
      swept: they go when their return or their process exit is seen.
    * Ages are measured on the correlator's clock (monotonic time when the
      event was correlated), not from event timestamps.

  ## Scheduling

  A batch of up to 1,000 events is correlated in one NIF call on a normal
  scheduler, which stops after ~0.6 ms and hands the rest to a dirty
  scheduler. Longer batches, and batches that find the lock taken (by
  another caller or by the sweep), are correlated in one call on a dirty
  CPU scheduler that takes the lock per 10,000 events, so concurrent
  callers interleave at those boundaries. (On 100,000-event batches one
  dirty call measured as fast as or faster than 1,000-event chunks joined
  in Elixir, whose join allocates while the whole result is live.)
  Lookups, metrics and the sweep run on dirty CPU schedulers.

  ## Example

      iex> alias ElixirScope.Capture.EventCorrelator
      iex> alias ElixirScope.Events.FunctionExecution
      iex> {:ok, c} = EventCorrelator.start_link()
      iex> outer = EventCorrelator.correlate_event(c, %FunctionExecution{id: 1, event_type: :call, caller_pid: self()})
      iex> inner = EventCorrelator.correlate_event(c, %FunctionExecution{id: 2, event_type: :call, caller_pid: self()})
      iex> {outer.parent_id, inner.parent_id, inner.root_id, inner.links}
      {nil, 1, 1, [{:called_from, 1}]}
      iex> ret = EventCorrelator.correlate_event(c, %FunctionExecution{id: 3, event_type: :return, caller_pid: self()})
      iex> {ret.correlation_type, ret.correlation_id, ret.links}
      {:function_return, 2, [{:completes, 2}]}
      iex> EventCorrelator.get_correlation_chain(c, 2) |> Enum.map(& &1.correlation_id)
      [1, 2]
      iex> EventCorrelator.stop(c)
      :ok
  """

  use GenServer

  import Bitwise, only: [<<<: 2]

  alias ElixirScope.Native

  defmodule CorrelatedEvent do
    @moduledoc """
    An event with its correlation: what `EventCorrelator.correlate_event/2`
    and `EventCorrelator.correlate_batch/2` return.

      * `event` — the event as given;
      * `correlation_id` — the call's id for calls and returns, the send's id
        for sends and matched receives, else the event's own id (`nil` for
        unknown events without one);
      * `parent_id` / `root_id` — the enclosing call and the bottom of its
        stack (for returns: of the completed call), or `nil`;
      * `links` — `{:called_from, id}`, `{:completes, id}`,
        `{:receives, id}`, `{:state_in, id}` or `{:spawned_by, pid}`;
      * `correlation_type` — `:function_call | :function_return |
        :message_send | :message_receive | :process_spawn | :process_exit |
        :state_change | :unknown`;
      * `correlated_at` — `System.monotonic_time(:nanosecond)` when the
        event's chunk was correlated;
      * `correlation_confidence` — `0.0..1.0`; `0.0` when nothing could be
        linked (unknown events, returns completing no call, receives whose
        send has not been seen yet, calls whose caller was not tracked
        because `max_correlations` was reached).
    """

    defstruct event: nil,
              correlation_id: nil,
              parent_id: nil,
              root_id: nil,
              links: [],
              correlation_type: :unknown,
              correlated_at: nil,
              correlation_confidence: 0.0

    @type id :: non_neg_integer() | term()
    @type link ::
            {:called_from | :completes | :receives | :state_in, id()}
            | {:spawned_by, pid() | term()}
    @type correlation_type ::
            :function_call
            | :function_return
            | :message_send
            | :message_receive
            | :process_spawn
            | :process_exit
            | :state_change
            | :unknown

    @type t :: %__MODULE__{
            event: term(),
            correlation_id: id() | nil,
            parent_id: id() | nil,
            root_id: id() | nil,
            links: [link()],
            correlation_type: correlation_type(),
            correlated_at: integer(),
            correlation_confidence: float()
          }
  end

  @typedoc "A correlator: its pid or registered name."
  @type server :: GenServer.server()

  @typedoc """
  Metadata of one correlation: `correlation_id`, `type`, `created_at`
  (monotonic ns), `pid` (acting process, `nil` if unknown), `peer`
  (receiver of a send, child of a spawn), `parent_id`, `root_id`, `links`,
  `confidence`, `completed_by` (calls: the return's id) and `received_by`
  (sends: the receive's id).
  """
  @type metadata :: %{
          correlation_id: term(),
          type: CorrelatedEvent.correlation_type(),
          created_at: integer(),
          pid: pid() | term() | nil,
          peer: pid() | term() | nil,
          parent_id: term(),
          root_id: term(),
          links: [CorrelatedEvent.link()],
          confidence: float(),
          completed_by: term(),
          received_by: term()
        }

  @max_correlations_limit 1 <<< 28
  @max_interval_ms 4_294_967_295
  @max_ttl_ms 1 <<< 40
  @defaults [
    name: nil,
    cleanup_interval_ms: 60_000,
    correlation_ttl_ms: 300_000,
    max_correlations: 100_000
  ]
  @limits [
    cleanup_interval_ms: @max_interval_ms,
    correlation_ttl_ms: @max_ttl_ms,
    max_correlations: @max_correlations_limit
  ]

  # ---------------------------------------------------------------------------
  # Lifecycle
  # ---------------------------------------------------------------------------

  @doc """
  Starts a correlator linked to the caller.

  `opts` is a keyword list or a map:

  | option | default | meaning |
  |---|---|---|
  | `:name` | `nil` | registered name (any `GenServer` name) |
  | `:cleanup_interval_ms` | `60_000` | how often the TTL sweep runs (1..#{@max_interval_ms}) |
  | `:correlation_ttl_ms` | `300_000` | how long metadata and unmatched messages are kept (1..2^40) |
  | `:max_correlations` | `100_000` | bound on tracked state and on metadata records (1..2^28) |

  Unknown options and bad values raise `ArgumentError` naming the option.
  """
  @spec start_link(keyword() | map()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    config = validate!(opts)
    {name, config} = Map.pop(config, :name)
    gen_opts = if name == nil, do: [], else: [name: name]
    GenServer.start_link(__MODULE__, {name, config}, gen_opts)
  end

  @doc "Stops the correlator (its native state is freed). Returns `:ok`."
  @spec stop(server()) :: :ok
  def stop(server), do: GenServer.stop(dest!(server))

  @doc """
  The server's state: `%{config: %{cleanup_interval_ms, correlation_ttl_ms,
  max_correlations}, name, ref, started_at, cleanups_run, last_cleanup}`
  (`last_cleanup` is `nil` or `%{at, removed, expired_messages}`, times in
  monotonic milliseconds).
  """
  @spec get_state(server()) :: map()
  def get_state(server), do: GenServer.call(dest!(server), :get_state)

  # ---------------------------------------------------------------------------
  # Correlation
  # ---------------------------------------------------------------------------

  @doc """
  Correlates one event (any term; see the module docs for what is
  understood) and returns its `%CorrelatedEvent{}`.
  """
  @spec correlate_event(server(), term()) :: CorrelatedEvent.t()
  def correlate_event(server, event), do: run(server, {:correlate_event, event})

  @doc """
  Correlates a list of events in order and returns their
  `%CorrelatedEvent{}`s in the same order (`[]` for `[]`).

  Raises `ArgumentError` if `events` is not a proper list (before
  correlating any of them).
  """
  @spec correlate_batch(server(), [term()]) :: [CorrelatedEvent.t()]
  def correlate_batch(server, events) when is_list(events),
    do: run(server, {:correlate_batch, events})

  def correlate_batch(server, events) do
    _ = locate(server)
    raise ArgumentError, "events must be a list, got: #{inspect(events, limit: 5)}"
  end

  # ---------------------------------------------------------------------------
  # Queries
  # ---------------------------------------------------------------------------

  @doc """
  The metadata of correlation `id` (see `t:metadata/0`), or `nil` if there
  is none (unknown, expired or evicted). Receives linked late show their
  `{:receives, send_id}` link here.
  """
  @spec get_correlation_metadata(server(), term()) :: metadata() | nil
  def get_correlation_metadata(server, id), do: run(server, {:metadata, id})

  @doc """
  The metadata of `id` and its enclosing calls, root first (`[]` if `id`
  has no metadata). The chain stops at the first ancestor whose metadata
  has expired or been evicted.
  """
  @spec get_correlation_chain(server(), term()) :: [metadata()]
  def get_correlation_chain(server, id), do: run(server, {:chain, id})

  @doc """
  Runs the TTL sweep now: `{:ok, n}` with `n` the correlations (metadata
  records) removed. Unmatched messages dropped by the same sweep are counted
  in `get_metrics/1`'s `expired`.
  """
  @spec cleanup_expired_correlations(server()) :: {:ok, non_neg_integer()}
  def cleanup_expired_correlations(server), do: GenServer.call(dest!(server), :cleanup)

  @doc """
  Counters: `total_correlations_created`, `active_correlations`,
  `function_correlations`, `message_correlations`,
  `average_correlation_time_ns` (per event, decoding and building results
  included), and the native ones: `events_correlated`, `unknown_events`,
  `calls`, `returns`, `sends`, `receives`, `matched_receives`,
  `unmatched_returns`, `unwound_frames`, `orphaned_calls`, `expired`,
  `evicted`, `refused`, `late_links`, `pid_resolved_returns`,
  `pending_messages`, `metadata_entries`, `metadata_expired`,
  `metadata_evicted`, `sweeps`, `max_correlations`, `correlation_ttl_ns`,
  `memory_bytes`.
  """
  @spec get_metrics(server()) :: map()
  def get_metrics(server), do: run(server, :metrics)

  @doc """
  `%{status, active_correlations, memory_usage_bytes, uptime_ms,
  correlation_rate, max_correlations, events_correlated}`.

  `status` is `:healthy`, or `:degraded` when the tracked state is at
  `max_correlations` (new state now evicts old). `correlation_rate` is the
  fraction of events correlated so far that were understood and, for
  returns, completed a call (`1.0` before any event). `memory_usage_bytes`
  is the server process plus an estimate of the native state.
  """
  @spec health_check(server()) :: map()
  def health_check(server), do: run(server, :health)

  # ---------------------------------------------------------------------------
  # GenServer
  # ---------------------------------------------------------------------------

  @impl true
  def init({name, config}) do
    # Exits of the parent run terminate/2, which unpublishes the handle.
    Process.flag(:trap_exit, true)
    forget_dead_handles()
    ref = Native.corr_new(config.correlation_ttl_ms * 1_000_000, config.max_correlations)
    started = System.monotonic_time(:millisecond)
    :persistent_term.put(key(self()), {ref, started})

    state = %{
      ref: ref,
      name: name,
      config: config,
      started_at: started,
      cleanups_run: 0,
      last_cleanup: nil
    }

    schedule_cleanup(config.cleanup_interval_ms)
    {:ok, state}
  end

  @impl true
  def handle_call(:get_state, _from, state), do: {:reply, state, state}

  def handle_call(:cleanup, _from, state) do
    {n, state} = sweep(state)
    {:reply, {:ok, n}, state}
  end

  # Requests from another node (the handle is node-local). Bad input raises
  # in the caller, not here.
  def handle_call({:run, request}, _from, state) do
    reply =
      try do
        {:ok, execute({state.ref, state.started_at, self()}, request)}
      rescue
        e in ArgumentError -> {:raise, e}
      end

    {:reply, reply, state}
  end

  @impl true
  def handle_info(:cleanup, state) do
    {_, state} = sweep(state)
    schedule_cleanup(state.config.cleanup_interval_ms)
    {:noreply, state}
  end

  def handle_info(_other, state), do: {:noreply, state}

  @impl true
  def terminate(_reason, _state) do
    :persistent_term.erase(key(self()))
    :ok
  end

  defp sweep(state) do
    {records, entries} = Native.corr_sweep(state.ref)
    now = System.monotonic_time(:millisecond)

    {records,
     %{
       state
       | cleanups_run: state.cleanups_run + 1,
         last_cleanup: %{at: now, removed: records, expired_messages: entries}
     }}
  end

  defp schedule_cleanup(ms), do: Process.send_after(self(), :cleanup, ms)

  # ---------------------------------------------------------------------------
  # Requests
  # ---------------------------------------------------------------------------

  defp run(server, request) do
    case locate(server) do
      {:local, ctx} -> execute(ctx, request)
      {:remote, dest} -> remote(dest, request)
    end
  end

  defp remote(dest, request) do
    case GenServer.call(dest, {:run, request}) do
      {:ok, result} -> result
      {:raise, e} -> raise e
    end
  end

  defp execute({ref, _, _}, {:correlate_event, event}) do
    [correlated] = batch(ref, [event])
    correlated
  end

  defp execute({ref, _, _}, {:correlate_batch, events}), do: batch(ref, events)
  defp execute({ref, _, _}, {:metadata, id}), do: Native.corr_metadata(ref, id)
  defp execute({ref, _, _}, {:chain, id}), do: Native.corr_chain(ref, id)
  defp execute({ref, _, _}, :metrics), do: Native.corr_metrics(ref)

  defp execute({ref, started, pid}, :health) do
    m = Native.corr_metrics(ref)
    events = m.events_correlated

    rate =
      if events == 0,
        do: 1.0,
        else: Float.round((events - m.unknown_events - m.unmatched_returns) / events, 4)

    process_memory =
      case Process.info(pid, :memory) do
        {:memory, bytes} -> bytes
        nil -> 0
      end

    %{
      status: if(m.active_correlations >= m.max_correlations, do: :degraded, else: :healthy),
      active_correlations: m.active_correlations,
      memory_usage_bytes: m.memory_bytes + process_memory,
      uptime_ms: System.monotonic_time(:millisecond) - started,
      correlation_rate: rate,
      max_correlations: m.max_correlations,
      events_correlated: events
    }
  end

  # Up to 1,000 events in one call on a normal scheduler; a longer list, a
  # contended lock or the rest of a chunk that ran out of time go to one
  # dirty-scheduler call, which builds the whole result list in order.
  defp batch(ref, events) do
    case Native.corr_batch(ref, events) do
      results when is_list(results) -> results
      {results, rest} -> results ++ Native.corr_batch_dirty(ref, rest)
      _large_or_busy -> Native.corr_batch_dirty(ref, events)
    end
  end

  # ---------------------------------------------------------------------------
  # Locating a correlator
  # ---------------------------------------------------------------------------

  defp key(pid), do: {__MODULE__, pid}

  # {:local, {ref, started_at, pid}} for a correlator on this node (its
  # handle is published in :persistent_term), {:remote, dest} for one on a
  # connected node.
  defp locate(pid) when is_pid(pid) and node(pid) == node() do
    case :persistent_term.get(key(pid), nil) do
      {ref, started} -> {:local, {ref, started, pid}}
      nil -> raise ArgumentError, "#{inspect(pid)} is not a running #{inspect(__MODULE__)}"
    end
  end

  defp locate(pid) when is_pid(pid), do: {:remote, pid}

  defp locate(name) when is_atom(name) do
    case Process.whereis(name) do
      pid when is_pid(pid) -> locate(pid)
      _ -> raise ArgumentError, "no #{inspect(__MODULE__)} is registered as #{inspect(name)}"
    end
  end

  defp locate({name, node} = dest) when is_atom(name) and is_atom(node) do
    cond do
      node == node() -> locate(name)
      node in Node.list() -> {:remote, dest}
      true -> raise ArgumentError, "node #{inspect(node)} of #{inspect(dest)} is not connected"
    end
  end

  defp locate({:global, _} = name), do: locate_registered(name)
  defp locate({:via, mod, _} = name) when is_atom(mod), do: locate_registered(name)

  defp locate(other) do
    raise ArgumentError,
          "expected an #{inspect(__MODULE__)} pid or name, got: #{inspect(other, limit: 5)}"
  end

  defp locate_registered(name) do
    case GenServer.whereis(name) do
      pid when is_pid(pid) -> locate(pid)
      _ -> raise ArgumentError, "no #{inspect(__MODULE__)} is registered as #{inspect(name)}"
    end
  end

  # Where to send GenServer calls, after checking it is a correlator.
  defp dest!(server) do
    case locate(server) do
      {:local, {_, _, pid}} -> pid
      {:remote, dest} -> dest
    end
  end

  # Handles of correlators killed without running terminate/2.
  defp forget_dead_handles do
    for {{__MODULE__, pid} = k, _} <- :persistent_term.get(),
        is_pid(pid),
        not Process.alive?(pid),
        do: :persistent_term.erase(k)

    :ok
  end

  # ---------------------------------------------------------------------------
  # Options
  # ---------------------------------------------------------------------------

  defp validate!(opts) when is_map(opts) and not is_struct(opts),
    do: validate!(Map.to_list(opts))

  defp validate!(opts) when is_list(opts) do
    unless Keyword.keyword?(opts) do
      raise ArgumentError,
            "EventCorrelator options must be a keyword list or a map with atom keys, " <>
              "got: #{inspect(opts, limit: 5)}"
    end

    opts = ElixirScope.Args.keyword_opts!(opts, @defaults, "EventCorrelator")

    for {k, max} <- @limits do
      v = opts[k]

      unless is_integer(v) and v >= 1 and v <= max do
        raise ArgumentError,
              "EventCorrelator option #{inspect(k)} must be an integer in 1..#{max}, " <>
                "got: #{inspect(v, limit: 5)}"
      end
    end

    Map.new(opts)
  end

  defp validate!(other) do
    raise ArgumentError,
          "EventCorrelator options must be a keyword list or a map, got: #{inspect(other, limit: 5)}"
  end
end

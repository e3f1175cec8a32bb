defmodule ElixirScope.Bench.BaselinePipeline do
  @moduledoc """
  Pure-Elixir baseline for the native pipeline: a GenServer + ETS capture and
  correlation pipeline doing the same correlation and indexing, written the way
  a competent Elixir engineer would without NIFs. It depends on nothing but
  OTP and Elixir's stdlib, so a bench script can `Code.require_file/1` it.

  ## Architecture

    * `ingest/2` / `ingest_batch/2` stamp `System.monotonic_time(:nanosecond)`
      and cast to one of `n` worker GenServers, picked by
      `:erlang.phash2(self(), n)`, so every producer's events stay in order.
    * A worker buffers casts and processes them in batches: when the buffer
      reaches `:batch_size`, or as soon as its mailbox runs dry (the classic
      `{:noreply, state, 0}` idiom), so a light load is not held back waiting
      for a full batch. Workers keep their mailbox off-heap.
    * Correlation state is shared in public ETS tables: call stacks keyed by
      pid, message matching keyed by `{receiver, :erlang.phash2(message)}`
      and the process tree (child -> parent).
    * The store is ETS: a `:set` main table `id -> row` plus `:ordered_set`
      indexes keyed `{pid, id}`, `{ts, id}`, `{{module, function}, id}` and
      `{correlation_id, id}`. Queries read the tables from the caller's
      process (the tids are in `:persistent_term`, see `tables/1`).
    * `:max_events` is enforced by evicting the oldest events (by ingest
      timestamp) from the main table and every index.
    * `flush/2` snapshots how many events were sent to each worker and waits
      until each has processed that many (it does not rely on message order
      between different senders).

  ## Rows

  `{id, ts, pid, type, module, function, correlation_id, parent_id, root_id,
  payload}`, see `to_map/1`. `type` is the event tag. `payload` is: the args
  for a call, the value for a return, `{to_pid, message}` for a send, the
  message for a receive, the child pid for a spawn, the reason for an exit and
  `{old, new}` for a state change. Returns carry the module and function of
  the call they complete.

  ## Correlation rules

    * call: pushed on the pid's stack; `parent_id` = previous top, `root_id` =
      bottom (itself on an empty stack); `correlation_id` = own id.
    * return: pops the frame with the same `corr_key` (the top one when the key
      is `nil`), unwinding the frames above it (counted); `correlation_id` =
      the call id, `parent_id`/`root_id` those of the call. A key not on the
      stack is an unmatched return (counted; own id, no parent).
    * send / receive: the n-th receive of `{receiver, phash2(message)}` is
      matched with the n-th send of it (FIFO: a receive takes the oldest
      unreceived send). A receive processed before its send stays pending and
      is linked (its row updated) when the send arrives. A matched receive's
      `correlation_id` is the send id. Sends, receives, spawns and state
      changes get `parent_id`/`root_id` from the call in progress of their
      process.
    * spawn: records child -> parent (`process_parent/2`).
    * exit: clears the stack (open calls counted as orphaned) and forgets the
      process in the tree.

  Message matching is race-free across workers without locks: each side of a
  key claims a sequence number with `:ets.update_counter/4` and the two sides
  of slot n meet through `:ets.insert_new/2` (the first to arrive waits in the
  slot, the second takes it with `:ets.take/2`). A pending receive is only
  published after its row is stored, so the send that completes it can always
  update the row. A key's counter row is removed (atomically, with
  `:ets.delete_object/2`) once its sends and receives are all paired; it
  carries an epoch, so a new series of the key never collides with slots of
  an older one still in flight.

  Assumption (as in any per-producer design): the events of one traced pid
  come from one producer, so one worker owns each call stack.
  """

  use GenServer
  import Bitwise

  alias ElixirScope.Bench.BaselinePipeline.Worker

  # 1-based position of correlation_id in a row, for :ets.update_element/3.
  @pos_corr 7

  # :counters slots.
  @c_processed 1
  @c_evicted 2
  @c_unmatched 3
  @c_orphaned 4
  @c_unwound 5
  @c_matched 6
  @c_late 7
  @c_pending_recv 8
  @c_queued_send 9
  @c_invalid 10
  @n_counters 10

  # Latency histogram: 0..15 ns exact, then 8 linear sub-buckets per power of
  # two (relative resolution 1/8).
  @lat_buckets 16 + 8 * 60

  @query_defaults [limit: 1000, order: :asc]

  @type row ::
          {id :: integer(), ts :: integer(), pid :: term(), type :: atom(),
           module :: atom() | nil, function :: atom() | nil, correlation_id :: integer(),
           parent_id :: integer() | nil, root_id :: integer() | nil, payload :: term()}

  ## Lifecycle

  @doc """
  Starts the pipeline; returns `{:ok, pid}` (the pid is the pipeline handle
  `p` for every other function).

  Options: `workers:` (default `System.schedulers_online()`),
  `max_events:` (1_000_000), `batch_size:` (1000), `latency_sample_every:`
  (1 = every event; n = one event in n of each batch feeds the latency
  histogram).
  """
  def start_link(opts \\ []), do: GenServer.start_link(__MODULE__, opts)

  @doc "Stops the pipeline and its workers; the tables go with it."
  def stop(p, timeout \\ 30_000), do: GenServer.stop(p, :normal, timeout)

  ## Ingest (producer side)

  @doc "Ingests one event tuple (asynchronous cast)."
  def ingest(p, event) do
    ts = System.monotonic_time(:nanosecond)
    GenServer.cast(worker_for(p, 1), {:e, ts, event})
  end

  @doc """
  Ingests a list of event tuples in one cast. The whole list is stamped with
  one timestamp (it is ingested at one instant).
  """
  def ingest_batch(_p, []), do: :ok

  def ingest_batch(p, events) when is_list(events) do
    ts = System.monotonic_time(:nanosecond)
    GenServer.cast(worker_for(p, length(events)), {:b, ts, events})
  end

  # Also counts what is sent to each worker, for flush/2.
  defp worker_for(p, k) do
    %{workers: ws, n: n, sent: sent} = handle(p)
    i = :erlang.phash2(self(), n)
    :counters.add(sent, i + 1, k)
    elem(ws, i)
  end

  @doc """
  Returns `:ok` once every event ingested before the call (by any process) is
  stored, correlated and queryable; `{:error, :timeout}` after `timeout_ms`.

  Erlang orders messages per sender only, so flush does not rely on its
  request reaching a worker after the producers' casts: it snapshots how many
  events were sent to each worker and waits until the worker has processed
  that many.
  """
  def flush(p, timeout_ms \\ 30_000) do
    deadline = System.monotonic_time(:millisecond) + timeout_ms
    %{workers: ws, sent: sent} = handle(p)

    reqs =
      for {w, i} <- Enum.with_index(Tuple.to_list(ws)),
          do: :gen_server.send_request(w, {:flush, :counters.get(sent, i + 1)})

    Enum.reduce(reqs, :ok, fn req, acc ->
      left = max(deadline - System.monotonic_time(:millisecond), 0)

      case :gen_server.receive_response(req, left) do
        {:reply, :ok} -> acc
        :timeout -> {:error, :timeout}
        {:error, {reason, _}} -> {:error, reason}
      end
    end)
  end

  ## Queries (run in the caller, straight on ETS)

  @doc "The ETS tables (tids) of the pipeline."
  def tables(p) do
    h = handle(p)

    Map.take(
      h,
      [:main, :by_time, :by_pid, :by_function, :by_correlation] ++
        [:stacks, :msg_seq, :msg_slots, :tree]
    )
  end

  @doc "The stored row of event `id`, or `nil`."
  def get_event(p, id) do
    case :ets.lookup(handle(p).main, id) do
      [row] -> row
      [] -> nil
    end
  end

  @doc "Events of `pid` in id order. Options: `limit:` (1000), `order: :asc | :desc`."
  def query_by_pid(p, pid, opts \\ []) do
    h = handle(p)
    by_index(h, h.by_pid, [{{{pid, :"$1"}}, [], [:"$1"]}], opts)
  end

  @doc "Calls and returns of `module.function`, in id order."
  def query_by_function(p, module, function, opts \\ []) do
    h = handle(p)
    by_index(h, h.by_function, [{{{{module, function}, :"$1"}}, [], [:"$1"]}], opts)
  end

  @doc "Events whose correlation_id is `corr_id`, in id order."
  def query_by_correlation(p, corr_id, opts \\ []) do
    h = handle(p)
    by_index(h, h.by_correlation, [{{{corr_id, :"$1"}}, [], [:"$1"]}], opts)
  end

  @doc "Events with `t0 <= ts <= t1` (ingest timestamps, ns), in `{ts, id}` order."
  def query_by_time_range(p, t0, t1, opts \\ []) when is_integer(t0) and is_integer(t1) do
    h = handle(p)
    {limit, desc} = query_opts(opts)

    if desc do
      # {t, []} sorts after every {t, integer}: prev/next land on the range ends.
      walk_time(h, :ets.prev(h.by_time, {t1, []}), t0, limit, &:ets.prev/2, &(&1 < &2), [])
    else
      walk_time(h, :ets.next(h.by_time, {t0 - 1, []}), t1, limit, &:ets.next/2, &(&1 > &2), [])
    end
  end

  @doc "The parent pid recorded by the spawn of `pid`, or `nil`."
  def process_parent(p, pid) do
    case :ets.lookup(handle(p).tree, pid) do
      [{_, parent, _spawn_id}] -> parent
      [] -> nil
    end
  end

  @doc "Open call ids of `pid`, innermost first."
  def call_stack(p, pid) do
    case :ets.lookup(handle(p).stacks, pid) do
      [{_, stack}] -> Enum.map(stack, &elem(&1, 0))
      [] -> []
    end
  end

  @doc "A row as a map."
  def to_map({id, ts, pid, type, m, f, corr, parent, root, payload}) do
    %{
      id: id,
      timestamp: ts,
      pid: pid,
      type: type,
      module: m,
      function: f,
      correlation_id: corr,
      parent_id: parent,
      root_id: root,
      payload: payload
    }
  end

  def to_map(nil), do: nil

  @doc """
  Pipeline statistics:

      %{stored, evicted, processed, invalid, queued, workers,
        ingested_per_worker (events sent to each worker), max_events,
        memory_bytes, bytes_per_event,
        latency: %{samples, p50_ns, p99_ns, max_ns},
        latency_p50_ns, latency_p99_ns,
        correlation: %{matched_receives, late_links, pending_receives,
                       queued_sends, unmatched_returns, unwound_frames,
                       orphaned_calls}}

  Latency is ingest timestamp -> rows inserted in every table (queryable), in
  ns, from a log-linear histogram (about 6% resolution).
  """
  def stats(p) do
    h = handle(p)
    c = h.counters
    get = &:counters.get(c, &1)
    word = :erlang.system_info(:wordsize)
    tabs = Map.values(tables(p))
    memory = Enum.reduce(tabs, 0, fn t, acc -> acc + :ets.info(t, :memory) * word end)
    stored = :ets.info(h.main, :size)

    queued =
      h.workers
      |> Tuple.to_list()
      |> Enum.reduce(0, fn w, acc ->
        case Process.info(w, :message_queue_len) do
          {:message_queue_len, q} -> acc + q
          nil -> acc
        end
      end)

    max_lat = :atomics.get(h.size, 2)
    {samples, p50, p99} = percentiles(h.hist, max_lat)
    per_worker = for i <- 1..h.n, do: :counters.get(h.sent, i)

    %{
      stored: stored,
      evicted: get.(@c_evicted),
      processed: get.(@c_processed),
      invalid: get.(@c_invalid),
      queued: queued,
      workers: h.n,
      ingested_per_worker: per_worker,
      max_events: h.max_events,
      memory_bytes: memory,
      bytes_per_event: if(stored > 0, do: div(memory, stored), else: 0),
      latency: %{samples: samples, p50_ns: p50, p99_ns: p99, max_ns: max_lat},
      latency_p50_ns: p50,
      latency_p99_ns: p99,
      correlation: %{
        matched_receives: get.(@c_matched),
        late_links: get.(@c_late),
        pending_receives: get.(@c_pending_recv),
        queued_sends: get.(@c_queued_send),
        unmatched_returns: get.(@c_unmatched),
        unwound_frames: get.(@c_unwound),
        orphaned_calls: get.(@c_orphaned)
      }
    }
  end

  ## GenServer (the coordinator owns the tables and links the workers)

  @impl true
  def init(opts) do
    Process.flag(:trap_exit, true)
    n = Keyword.get(opts, :workers, System.schedulers_online())
    max_events = Keyword.get(opts, :max_events, 1_000_000)
    batch = Keyword.get(opts, :batch_size, 1000)
    every = Keyword.get(opts, :latency_sample_every, 1)

    unless is_integer(n) and n >= 1, do: raise(ArgumentError, "workers must be >= 1")
    unless is_integer(max_events) and max_events >= 1, do: raise(ArgumentError, "bad max_events")
    unless is_integer(batch) and batch >= 1, do: raise(ArgumentError, "bad batch_size")
    unless is_integer(every) and every >= 1, do: raise(ArgumentError, "bad latency_sample_every")

    wc = [:public, write_concurrency: true]
    idx = [:ordered_set | wc]

    h = %{
      n: n,
      max_events: max_events,
      sample_every: every,
      main: :ets.new(:baseline_main, [:set, {:decentralized_counters, true} | wc]),
      by_time: :ets.new(:baseline_by_time, idx),
      by_pid: :ets.new(:baseline_by_pid, idx),
      by_function: :ets.new(:baseline_by_function, idx),
      by_correlation: :ets.new(:baseline_by_correlation, idx),
      stacks: :ets.new(:baseline_stacks, [:set | wc]),
      msg_seq: :ets.new(:baseline_msg_seq, [:set | wc]),
      msg_slots: :ets.new(:baseline_msg_slots, [:set | wc]),
      tree: :ets.new(:baseline_tree, [:set | wc]),
      counters: :counters.new(@n_counters, [:write_concurrency]),
      hist: :counters.new(@lat_buckets, [:write_concurrency]),
      # events sent to each worker (flush/2 waits for them)
      sent: :counters.new(n, [:write_concurrency]),
      # 1: rows counted against max_events, 2: max latency seen (ns)
      size: :atomics.new(2, signed: true)
    }

    workers =
      for _ <- 1..n do
        {:ok, w} = Worker.start_link({h, batch})
        w
      end

    h = Map.put(h, :workers, List.to_tuple(workers))
    :persistent_term.put({__MODULE__, self()}, h)
    {:ok, h}
  end

  @impl true
  def handle_info({:EXIT, pid, reason}, h) do
    if pid in Tuple.to_list(h.workers),
      do: {:stop, {:worker_exit, reason}, h},
      else: {:noreply, h}
  end

  def handle_info(_msg, h), do: {:noreply, h}

  @impl true
  def terminate(_reason, h) do
    for w <- Tuple.to_list(h.workers) do
      Process.unlink(w)
      Process.exit(w, :kill)
    end

    :persistent_term.erase({__MODULE__, self()})
    :ok
  end

  @doc false
  def handle(p), do: :persistent_term.get({__MODULE__, p})

  ## Query helpers

  defp query_opts(opts) do
    opts = Keyword.merge(@query_defaults, opts)

    limit =
      case opts[:limit] do
        :infinity -> :infinity
        l when is_integer(l) and l >= 0 -> l
        other -> raise ArgumentError, "bad limit: #{inspect(other)}"
      end

    desc =
      case opts[:order] do
        o when o in [:asc, :oldest] -> false
        o when o in [:desc, :newest] -> true
        other -> raise ArgumentError, "bad order: #{inspect(other)}"
      end

    {limit, desc}
  end

  defp by_index(h, tab, ms, opts) do
    case query_opts(opts) do
      {0, _} ->
        []

      {limit, desc} ->
        chunk = if limit == :infinity, do: 1000, else: limit

        first =
          if desc, do: :ets.select_reverse(tab, ms, chunk), else: :ets.select(tab, ms, chunk)

        collect(h.main, first, limit, desc, [])
    end
  end

  # Index entries whose row was evicted meanwhile are skipped; the select
  # continues until `limit` rows are found or the index is exhausted.
  defp collect(_main, :"$end_of_table", _left, _desc, acc), do: Enum.reverse(acc)

  defp collect(main, {ids, cont}, left, desc, acc) do
    {acc, left} = fetch(main, ids, left, acc)

    cond do
      left == 0 -> Enum.reverse(acc)
      desc -> collect(main, :ets.select_reverse(cont), left, desc, acc)
      true -> collect(main, :ets.select(cont), left, desc, acc)
    end
  end

  defp fetch(_main, _ids, 0, acc), do: {acc, 0}
  defp fetch(_main, [], left, acc), do: {acc, left}

  defp fetch(main, [id | ids], left, acc) do
    case :ets.lookup(main, id) do
      [row] -> fetch(main, ids, dec(left), [row | acc])
      [] -> fetch(main, ids, left, acc)
    end
  end

  defp dec(:infinity), do: :infinity
  defp dec(n), do: n - 1

  defp walk_time(_h, _key, _bound, 0, _step, _past, acc), do: Enum.reverse(acc)
  defp walk_time(_h, :"$end_of_table", _bound, _left, _step, _past, acc), do: Enum.reverse(acc)

  defp walk_time(h, {ts, id} = key, bound, left, step, past, acc) do
    if past.(ts, bound) do
      Enum.reverse(acc)
    else
      case :ets.lookup(h.main, id) do
        [row] -> walk_time(h, step.(h.by_time, key), bound, dec(left), step, past, [row | acc])
        [] -> walk_time(h, step.(h.by_time, key), bound, left, step, past, acc)
      end
    end
  end

  ## Latency histogram

  @doc false
  def lat_bucket(v) when v < 16, do: max(v, 0)

  def lat_bucket(v) do
    shift = bitlen(v, 0) - 4
    min(16 + (shift - 1) * 8 + ((v >>> shift) - 8), @lat_buckets - 1)
  end

  defp bitlen(v, acc) when v >= 0x1_0000_0000, do: bitlen(v >>> 32, acc + 32)
  defp bitlen(v, acc) when v >= 0x1_0000, do: bitlen(v >>> 16, acc + 16)
  defp bitlen(v, acc) when v >= 0x100, do: bitlen(v >>> 8, acc + 8)
  defp bitlen(v, acc) when v >= 0x10, do: bitlen(v >>> 4, acc + 4)
  defp bitlen(v, acc) when v >= 4, do: bitlen(v >>> 2, acc + 2)
  defp bitlen(v, acc) when v >= 2, do: acc + 2
  defp bitlen(v, acc), do: acc + v

  # Midpoint of bucket i.
  defp bucket_value(i) when i < 16, do: i

  defp bucket_value(i) do
    shift = div(i - 16, 8) + 1
    mant = rem(i - 16, 8) + 8
    (mant <<< shift) + (1 <<< (shift - 1))
  end

  # Bucket midpoints, capped by the largest latency seen.
  defp percentiles(hist, max_lat) do
    counts = for i <- 1..@lat_buckets, do: :counters.get(hist, i)
    total = Enum.sum(counts)

    if total == 0 do
      {0, nil, nil}
    else
      {total, min(pick(counts, total * 0.50), max_lat), min(pick(counts, total * 0.99), max_lat)}
    end
  end

  defp pick(counts, target) do
    Enum.reduce_while(Enum.with_index(counts), 0, fn {c, i}, acc ->
      if acc + c >= target, do: {:halt, {:found, i}}, else: {:cont, acc + c}
    end)
    |> case do
      {:found, i} -> bucket_value(i)
      _ -> bucket_value(@lat_buckets - 1)
    end
  end

  ## Batch processing (runs in a worker)

  @doc false
  def process_batch(h, items) do
    {rows, stacks, deferred} = correlate(items, h, [], %{}, [])

    case rows do
      [] ->
        :ok

      _ ->
        # Store: main first, the time index last (eviction walks the time
        # index, so anything it finds there is fully indexed).
        :ets.insert(h.main, rows)
        {pk, fk, ck, tk, k, min_ts} = index_keys(rows, [], [], [], [], 0, nil)
        :ets.insert(h.by_pid, pk)
        if fk != [], do: :ets.insert(h.by_function, fk)
        :ets.insert(h.by_correlation, ck)
        :ets.insert(h.by_time, tk)
        t_stored = System.monotonic_time(:nanosecond)

        record_latency(h, rows, t_stored, min_ts)
        :counters.add(h.counters, @c_processed, k)
        enforce_max(h, k)
    end

    write_back_stacks(h, stacks)
    publish_receives(h, deferred)
    :ok
  end

  defp correlate([], _h, rows, stacks, deferred), do: {rows, stacks, deferred}

  defp correlate([{:batch, ts, evs} | rest], h, rows, stacks, deferred) do
    {rows, stacks, deferred} = correlate_many(evs, ts, h, rows, stacks, deferred)
    correlate(rest, h, rows, stacks, deferred)
  end

  defp correlate([{ts, ev} | rest], h, rows, stacks, deferred) do
    {rows, stacks, deferred} = event(ev, ts, h, rows, stacks, deferred)
    correlate(rest, h, rows, stacks, deferred)
  end

  defp correlate_many([], _ts, _h, rows, stacks, deferred), do: {rows, stacks, deferred}

  defp correlate_many([ev | evs], ts, h, rows, stacks, deferred) do
    {rows, stacks, deferred} = event(ev, ts, h, rows, stacks, deferred)
    correlate_many(evs, ts, h, rows, stacks, deferred)
  end

  # Stack frame: {call_id, corr_key, parent_id, root_id, module, function};
  # a stack is a list, innermost frame first.

  defp event({:call, id, pid, m, f, args, key}, ts, h, rows, stacks, deferred) do
    {stack, stacks} = stack(h, stacks, pid)

    {parent, root} =
      case stack do
        [] -> {nil, id}
        [{top, _, _, root, _, _} | _] -> {top, root}
      end

    stacks = Map.put(stacks, pid, {[{id, key, parent, root, m, f} | stack], true})
    {[{id, ts, pid, :call, m, f, id, parent, root, args} | rows], stacks, deferred}
  end

  defp event({:return, id, pid, value, key}, ts, h, rows, stacks, deferred) do
    {stack, stacks} = stack(h, stacks, pid)

    case pop_frame(stack, key) do
      {{cid, _, parent, root, m, f}, rest, unwound} ->
        if unwound > 0, do: :counters.add(h.counters, @c_unwound, unwound)
        stacks = Map.put(stacks, pid, {rest, true})
        {[{id, ts, pid, :return, m, f, cid, parent, root, value} | rows], stacks, deferred}

      :none ->
        :counters.add(h.counters, @c_unmatched, 1)
        {[{id, ts, pid, :return, nil, nil, id, nil, nil, value} | rows], stacks, deferred}
    end
  end

  defp event({:send, id, from, to, msg}, ts, h, rows, stacks, deferred) do
    {stack, stacks} = stack(h, stacks, from)
    {top, root} = context(stack)
    key = {to, :erlang.phash2(msg)}
    # New counter rows take the event id as epoch (ids are unique).
    [seq, epoch] = :ets.update_counter(h.msg_seq, key, [{2, 1}, {4, 0}], {key, 0, 0, id})
    slot = {key, epoch, seq}

    if :ets.insert_new(h.msg_slots, {slot, :send, id}) do
      :counters.add(h.counters, @c_queued_send, 1)
    else
      # The receive of this slot came first and is already stored: link it.
      case :ets.take(h.msg_slots, slot) do
        [{_, :recv, rid}] ->
          link_receive(h, rid, id)
          :counters.add(h.counters, @c_pending_recv, -1)
          :counters.add(h.counters, @c_late, 1)
          retire(h, key, seq, epoch)

        _ ->
          :ok
      end
    end

    {[{id, ts, from, :send, nil, nil, id, top, root, {to, msg}} | rows], stacks, deferred}
  end

  defp event({:receive, id, pid, msg}, ts, h, rows, stacks, deferred) do
    {stack, stacks} = stack(h, stacks, pid)
    {top, root} = context(stack)
    key = {pid, :erlang.phash2(msg)}
    [seq, epoch] = :ets.update_counter(h.msg_seq, key, [{3, 1}, {4, 0}], {key, 0, 0, id})
    slot = {key, epoch, seq}

    case :ets.take(h.msg_slots, slot) do
      [{_, :send, sid}] ->
        :counters.add(h.counters, @c_matched, 1)
        :counters.add(h.counters, @c_queued_send, -1)
        retire(h, key, seq, epoch)
        {[{id, ts, pid, :receive, nil, nil, sid, top, root, msg} | rows], stacks, deferred}

      [] ->
        # Published as pending only after the row is stored (publish_receives/2).
        {[{id, ts, pid, :receive, nil, nil, id, top, root, msg} | rows], stacks,
         [{slot, id, key, seq, epoch} | deferred]}
    end
  end

  defp event({:spawn, id, parent_pid, child}, ts, h, rows, stacks, deferred) do
    {stack, stacks} = stack(h, stacks, parent_pid)
    {top, root} = context(stack)
    :ets.insert(h.tree, {child, parent_pid, id})
    {[{id, ts, parent_pid, :spawn, nil, nil, id, top, root, child} | rows], stacks, deferred}
  end

  defp event({:exit, id, pid, reason}, ts, h, rows, stacks, deferred) do
    {stack, stacks} = stack(h, stacks, pid)

    stacks =
      case stack do
        [] ->
          stacks

        _ ->
          :counters.add(h.counters, @c_orphaned, length(stack))
          Map.put(stacks, pid, {[], true})
      end

    :ets.delete(h.tree, pid)
    {[{id, ts, pid, :exit, nil, nil, id, nil, nil, reason} | rows], stacks, deferred}
  end

  defp event({:state_change, id, pid, old, new}, ts, h, rows, stacks, deferred) do
    {stack, stacks} = stack(h, stacks, pid)
    {top, root} = context(stack)
    {[{id, ts, pid, :state_change, nil, nil, id, top, root, {old, new}} | rows], stacks, deferred}
  end

  defp event(_bad, _ts, h, rows, stacks, deferred) do
    :counters.add(h.counters, @c_invalid, 1)
    {rows, stacks, deferred}
  end

  # Batch-local cache of the stacks this batch touches: {stack, dirty?}.
  defp stack(h, stacks, pid) do
    case stacks do
      %{^pid => {stack, _}} ->
        {stack, stacks}

      _ ->
        stack =
          case :ets.lookup(h.stacks, pid) do
            [{_, s}] -> s
            [] -> []
          end

        {stack, Map.put(stacks, pid, {stack, false})}
    end
  end

  defp context([]), do: {nil, nil}
  defp context([{top, _, _, root, _, _} | _]), do: {top, root}

  defp pop_frame([], _key), do: :none
  defp pop_frame([frame | rest], nil), do: {frame, rest, 0}
  defp pop_frame(stack, key), do: pop_frame(stack, key, 0)

  defp pop_frame([{_, key, _, _, _, _} = frame | rest], key, n), do: {frame, rest, n}
  defp pop_frame([_ | rest], key, n), do: pop_frame(rest, key, n + 1)
  defp pop_frame([], _key, _n), do: :none

  defp write_back_stacks(h, stacks) do
    Enum.each(stacks, fn
      {_pid, {_, false}} -> :ok
      {pid, {[], true}} -> :ets.delete(h.stacks, pid)
      {pid, {stack, true}} -> :ets.insert(h.stacks, {pid, stack})
    end)
  end

  # Receives with no send yet: wait in their slot, unless the send arrived
  # since (then it is in the slot, and the receive takes it).
  defp publish_receives(_h, []), do: :ok

  defp publish_receives(h, [{slot, rid, key, seq, epoch} | rest]) do
    if :ets.insert_new(h.msg_slots, {slot, :recv, rid}) do
      :counters.add(h.counters, @c_pending_recv, 1)
    else
      case :ets.take(h.msg_slots, slot) do
        [{_, :send, sid}] ->
          link_receive(h, rid, sid)
          :counters.add(h.counters, @c_queued_send, -1)
          retire(h, key, seq, epoch)

        _ ->
          :ok
      end
    end

    publish_receives(h, rest)
  end

  # Sets a stored receive's correlation_id to its send; ordered so that a
  # concurrent eviction of the receive leaves no stale index entry.
  defp link_receive(h, rid, sid) do
    :counters.add(h.counters, @c_matched, 1)
    :ets.insert(h.by_correlation, {{sid, rid}})

    if :ets.update_element(h.main, rid, {@pos_corr, sid}),
      do: :ets.delete(h.by_correlation, {rid, rid}),
      else: :ets.delete(h.by_correlation, {sid, rid})
  end

  # Drops the key's counter row if slot `seq` was its last claimed one on
  # both sides (a no-op if anything was claimed since).
  defp retire(h, key, seq, epoch), do: :ets.delete_object(h.msg_seq, {key, seq, seq, epoch})

  defp index_keys([], pk, fk, ck, tk, k, min_ts), do: {pk, fk, ck, tk, k, min_ts}

  defp index_keys([{id, ts, pid, _, m, f, corr, _, _, _} | rows], pk, fk, ck, tk, k, min_ts) do
    fk = if m == nil, do: fk, else: [{{{m, f}, id}} | fk]
    min_ts = if min_ts == nil or ts < min_ts, do: ts, else: min_ts

    index_keys(
      rows,
      [{{pid, id}} | pk],
      fk,
      [{{corr, id}} | ck],
      [{{ts, id}} | tk],
      k + 1,
      min_ts
    )
  end

  defp record_latency(h, rows, t_stored, min_ts) do
    sample(rows, h.hist, t_stored, h.sample_every, 0)
    max_lat = t_stored - min_ts
    bump_max(h.size, max_lat, :atomics.get(h.size, 2))
  end

  defp sample([], _hist, _t, _every, _i), do: :ok

  defp sample([{_, ts, _, _, _, _, _, _, _, _} | rest], hist, t, every, i) do
    if rem(i, every) == 0, do: :counters.add(hist, lat_bucket(t - ts) + 1, 1)
    sample(rest, hist, t, every, i + 1)
  end

  defp bump_max(ref, v, cur) when v > cur do
    case :atomics.compare_exchange(ref, 2, cur, v) do
      :ok -> :ok
      actual -> bump_max(ref, v, actual)
    end
  end

  defp bump_max(_ref, _v, _cur), do: :ok

  # Each batch evicts its share of the overflow: the count is claimed with
  # one atomic add, so concurrent workers never evict more than the excess.
  defp enforce_max(h, k) do
    count = :atomics.add_get(h.size, 1, k)
    over = min(count - h.max_events, k)

    if over > 0 do
      :atomics.sub(h.size, 1, over)
      evict(h, over)
    end
  end

  defp evict(_h, 0), do: :ok

  defp evict(h, n) do
    case :ets.select(h.by_time, [{{:"$1"}, [], [:"$1"]}], min(n, 1000)) do
      :"$end_of_table" ->
        :ok

      {keys, _cont} ->
        done = Enum.reduce(keys, 0, fn key, acc -> acc + evict_key(h, key) end)
        :counters.add(h.counters, @c_evicted, done)
        evict(h, n - done)
    end
  end

  # Claimed with :ets.take, so two workers never evict the same event.
  defp evict_key(h, {_ts, id} = key) do
    case :ets.take(h.by_time, key) do
      [] ->
        0

      [_] ->
        case :ets.take(h.main, id) do
          [{^id, _, pid, _, m, f, corr, _, _, _}] ->
            :ets.delete(h.by_pid, {pid, id})
            if m != nil, do: :ets.delete(h.by_function, {{m, f}, id})
            :ets.delete(h.by_correlation, {corr, id})
            1

          [] ->
            0
        end
    end
  end
end

defmodule ElixirScope.Bench.BaselinePipeline.Worker do
  @moduledoc false
  # Buffers casts and hands them to BaselinePipeline.process_batch/2 when the
  # buffer is full or the mailbox is empty (timeout 0).
  use GenServer

  alias ElixirScope.Bench.BaselinePipeline

  def start_link(arg), do: GenServer.start_link(__MODULE__, arg)

  @impl true
  def init({h, batch}) do
    Process.flag(:message_queue_data, :off_heap)
    {:ok, %{h: h, batch: batch, buf: [], n: 0, done: 0, waiters: []}}
  end

  @impl true
  def handle_cast({:e, ts, ev}, %{buf: buf, n: n} = s) do
    buffered(%{s | buf: [{ts, ev} | buf], n: n + 1})
  end

  def handle_cast({:b, ts, evs}, %{buf: buf, n: n} = s) do
    buffered(%{s | buf: [{:batch, ts, evs} | buf], n: n + length(evs)})
  end

  # Replies once `target` events (the count sent to this worker when flush
  # was called) are processed; they may still be on their way.
  @impl true
  def handle_call({:flush, target}, from, s) do
    s = drain(s)

    if s.done >= target,
      do: {:reply, :ok, s},
      else: {:noreply, %{s | waiters: [{from, target} | s.waiters]}}
  end

  @impl true
  def handle_info(:timeout, s), do: {:noreply, drain(s)}
  def handle_info(_msg, s), do: {:noreply, s}

  defp buffered(%{n: n, batch: batch} = s) when n >= batch, do: {:noreply, drain(s)}
  defp buffered(s), do: {:noreply, s, 0}

  defp drain(%{buf: []} = s), do: s

  defp drain(%{buf: buf, h: h, n: n, done: done} = s) do
    BaselinePipeline.process_batch(h, Enum.reverse(buf))
    wake(%{s | buf: [], n: 0, done: done + n})
  end

  defp wake(%{waiters: []} = s), do: s

  defp wake(%{waiters: ws, done: done} = s) do
    {ready, waiting} = Enum.split_with(ws, fn {_, target} -> done >= target end)
    Enum.each(ready, fn {from, _} -> GenServer.reply(from, :ok) end)
    %{s | waiters: waiting}
  end
end

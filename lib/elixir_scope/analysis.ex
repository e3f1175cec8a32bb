defmodule ElixirScope.Analysis do
  @moduledoc """
  Questions about a stored trace, answered from the store's indexes: the
  call stack at any event, everything inside a call, call trees and the
  ones that repeat, call statistics, navigation and message flow. The
  questions Erlang Doctor (`tr`) answers, over ElixirScope's native store.

      {:ok, _} = ElixirScope.trace(MyApp, pids: :all)
      MyApp.run()
      {:ok, _} = ElixirScope.stop_trace()

      alias ElixirScope.Analysis
      alias ElixirScope.Analysis.Format
      [crash | _] = Analysis.select(types: [:exception])
      crash |> Analysis.traceback() |> Format.print_traceback()
      crash.call_id |> Analysis.traceback() |> List.last() |> Analysis.call_tree() |> Format.print_tree()
      Analysis.call_stat() |> Format.print_call_stat(10)

  Every function works on the last trace's store (`ElixirScope.trace_store/0`)
  unless given `store: %DataAccess{}` (any store: a pipeline's, or one
  filled by hand). Results are plain data: `ElixirScope.Analysis.Entry`
  records, lists, maps.

  | question | function | cost |
  |---|---|---|
  | events matching filters / a predicate | `select/1`, `filter/2` | a scan in chunks; the window with `from:`/`to:` |
  | the call stack at an event | `traceback/2` | its depth (index lookups) |
  | everything inside a call | `range/2` | the result size (index walks) |
  | a call's tree | `call_tree/2` | the result size |
  | identical call trees that repeat | `top_call_trees/1` | one pass |
  | count, accumulated and own time per function | `call_stat/1` | one pass |
  | the next / previous event of a process or overall | `next/2`, `prev/2` | a few index steps; overall: a growing time window |
  | who sent what to whom, from which call | `messages/1` | a scan of the store |
  | a process's state at any moment | `state_at/3`, `state_at/2` | a binary search in the process's state index |
  | every state of a process, in order | `state_history/2` | the states returned |
  | what changed between two states | `state_diff/3` | the terms' size |
  | why a state (or any event) happened, back to the root | `why/2` | one or two lookups per step |
  | run a recorded call again and compare | `replay/2` | the call |

  ## Time travel

  When the trace's targets implement OTP callbacks, every callback's
  return is a *state record* (see `ElixirScope.Analysis.State`), linked to
  the callback's call and to what triggered it, and with `state:
  :snapshot` (the default then) each traced OTP process's state is taken
  when the trace starts:

      {:ok, st} = Analysis.state_at(pid, System.monotonic_time(:nanosecond) - 1_000_000)
      st.state                                  # the state 1 ms ago
      Analysis.state_history(pid) |> Format.print_state_history()
      Analysis.why(st) |> Format.print_why()    # callback ← message ← sender's call ← ...

  ## Cluster traces

  After `ElixirScope.trace(targets, nodes: [...])`, every function asks the
  trace's nodes by default (or those given as `nodes:`; `store:` or
  `nodes: nil` reads one store only). Each node's store is read where it
  is, all nodes at once over `:erpc`, and the results are merged here:

    * every time, in results and in arguments (`from:`, `to:`, `state_at`
      times), is on this node's monotonic clock: each node's times are
      corrected by its clock offset (`ElixirScope.Cluster.Clock`), and
      merged lists are in corrected time order;
    * an event belongs to the node of its pid (`node(entry.pid)`); a
      function taking an event takes the `Entry` (or `{node, id}`) and asks
      its node;
    * `call_stat/1` and `top_call_trees/1` add up the nodes' figures (by
      key; identical trees on several nodes count together);
    * `messages/1` links a send to a process on another node (a pid,
      `{name, node}`, or the alias a `GenServer.call` reply goes to) with
      that node's receive, by the local rules (the receiver, equal
      contents, oldest first; `:confidence` 1/n when n identical messages
      were candidates, halved without contents under `payload: :arity`);
    * `call_tree/2` follows a send that triggered an OTP callback on
      another node: the callback's tree follows the send among the
      children, with `node:` and `via: %{send:, receive:, confidence:}`;
      `why/2` continues a chain whose receive came from another node at
      that node's send (`:sent`) and its callers;
    * a node that is down, was not traced, or does not answer within
      `timeout:` (ms; default 5_000, or `config :elixir_scope,
      cluster_query_timeout: ms`) makes the result `{:partial, result,
      %{node => reason}}` (`:nodedown`, `:timeout`, `:no_trace`,
      `{:not_traced, why}`); the call never waits longer.
      `filter/2`'s predicate runs on each node (its module must be loaded
      there; a fun typed in IEx works anywhere).

  The one-pass queries run on a dirty scheduler and hold the store's lock
  for the pass (about 45 ns per stored event): a pipeline still writing
  waits for them. Event ids are unique per node, increasing in capture
  order across traces (a trace's first id is not 1).
  """

  alias ElixirScope.Analysis.{Cluster, Diff, Entry, State}
  alias ElixirScope.Native
  alias ElixirScope.Storage.DataAccess

  @types %{
    call: 2,
    return: 3,
    spawn: 4,
    send: 5,
    state_change: 6,
    receive: 9,
    exit: 10,
    exception: 11,
    link: 12,
    unlink: 12,
    state_snapshot: 20
  }

  @type entry_ref :: Entry.t() | pos_integer()
  @type tree :: %{call: Entry.t(), result: Entry.t() | nil, children: [tree() | Entry.t()]}

  @doc """
  Events matching every given filter, in store order (each process's
  events in the order they happened); with `:from` or `:to`, in timestamp
  order, walking only that window of the time index (without them the
  whole store is scanned, in chunks, over a consistent cut taken when the
  call starts: events stored meanwhile are not seen, events evicted
  meanwhile still are, and ingest into the store goes on during the scan).

  Filters: `:pid`, `:module`, `:function`, `:types` (a list of
  `#{inspect(Map.keys(@types))}`), `:from` / `:to` (monotonic ns,
  inclusive), `:limit` (default 100_000), `:store`.
  """
  @spec select(keyword()) :: [Entry.t()]
  def select(filters \\ []) do
    case Cluster.split(filters) do
      {nil, f} -> filter_local(nil, f)
      {ctx, f} -> Cluster.select(ctx, f)
    end
  end

  @doc """
  Events for which `pred` returns true, among those matching `filters`
  (see `select/1`), in store order. The store is scanned in chunks of
  50,000 events; `pred` runs in the caller.
  """
  @spec filter((Entry.t() -> as_boolean(term())), keyword()) :: [Entry.t()]
  def filter(pred, filters \\ []) when is_function(pred, 1) do
    case Cluster.split(filters) do
      {nil, f} -> filter_local(pred, f)
      {ctx, f} -> Cluster.filter(ctx, pred, f)
    end
  end

  # `pred` nil: every entry the NIF's filters let through.
  defp filter_local(pred, filters) do
    f =
      ElixirScope.Args.keyword_opts!(
        filters,
        [
          pid: nil,
          module: nil,
          function: nil,
          types: nil,
          from: nil,
          to: nil,
          limit: 100_000,
          store: nil
        ],
        "ElixirScope.Analysis.select"
      )

    s = store!(f)
    limit = pos_int!(f[:limit], :limit)
    kinds = kinds!(f[:types])
    t0 = ts!(f[:from], :from, -0x8000000000000000)
    t1 = ts!(f[:to], :to, 0x7FFFFFFFFFFFFFFF)
    check_term!(f[:pid], &is_pid/1, :pid)
    check_term!(f[:module], &is_atom/1, :module)
    check_term!(f[:function], &is_atom/1, :function)
    link? = f[:types] == nil or :link in f[:types]
    unlink? = f[:types] == nil or :unlink in f[:types]

    keep = fn
      %Entry{type: :link} -> link?
      %Entry{type: :unlink} -> unlink?
      _ -> true
    end

    # Links and unlinks share a kind: told apart here only when the
    # types ask for one of them.
    pred =
      cond do
        pred != nil -> fn e -> keep.(e) and pred.(e) end
        link? and unlink? -> nil
        true -> keep
      end

    if f[:from] == nil and f[:to] == nil do
      # A consistent cut, scanned in chunks without the store lock (ingest
      # into the store goes on); released at once when done.
      snap = Native.ana_snapshot(s.ref)

      try do
        scan(snap, 0, f, kinds, t0, t1, pred, limit, [])
      after
        Native.ana_snapshot_release(snap)
      end
    else
      scan_time(s.ref, {t0, -1}, f, kinds, t1, pred, limit, [])
    end
  end

  # Through the time index: only the window is visited. Chunks of hits
  # are kept in reverse (`acc`), concatenated at the end.
  defp scan_time(_ref, nil, _f, _k, _t1, _pred, _left, acc), do: done(acc)
  defp scan_time(_ref, _cursor, _f, _k, _t1, _pred, 0, acc), do: done(acc)

  defp scan_time(ref, {ts, seq}, f, kinds, t1, pred, left, acc) do
    {p, m, fun} = {f[:pid], f[:module], f[:function]}

    # Small chunks on the caller's scheduler (`:busy`: the dirty NIF).
    {hits, next} =
      case Native.ana_select_time_quick(ref, ts, seq, p, m, fun, kinds, t1, left) do
        :busy -> Native.ana_select_time(ref, ts, seq, p, m, fun, kinds, t1, left)
        chunk -> chunk
      end

    {acc, left} = take_hits(hits, pred, acc, left)
    scan_time(ref, next, f, kinds, t1, pred, left, acc)
  end

  defp done([]), do: []
  defp done([one]), do: one
  defp done(acc), do: acc |> Enum.reverse() |> Enum.concat()

  # The chunk's hits kept (at most `left`): `{[kept | acc], left}`.
  defp take_hits([], _pred, acc, left), do: {acc, left}

  defp take_hits(hits, nil, acc, left) do
    n = length(hits)

    if n <= left,
      do: {[hits | acc], left - n},
      else: {[Enum.take(hits, left) | acc], 0}
  end

  defp take_hits(hits, pred, acc, left) do
    {kept, left} =
      Enum.reduce_while(hits, {[], left}, fn e, {kept, left} ->
        cond do
          left == 0 -> {:halt, {kept, 0}}
          pred.(e) -> {:cont, {[e | kept], left - 1}}
          true -> {:cont, {kept, left}}
        end
      end)

    {[Enum.reverse(kept) | acc], left}
  end

  defp scan(_ref, nil, _f, _k, _t0, _t1, _pred, _left, acc), do: done(acc)
  defp scan(_ref, _cursor, _f, _k, _t0, _t1, _pred, 0, acc), do: done(acc)

  defp scan(ref, cursor, f, kinds, t0, t1, pred, left, acc) do
    {hits, next} =
      Native.ana_select(ref, cursor, f[:pid], f[:module], f[:function], kinds, t0, t1, left)

    {acc, left} = take_hits(hits, pred, acc, left)

    scan(ref, next, f, kinds, t0, t1, pred, left, acc)
  end

  @doc "The event `id` (an `Entry`), or nil."
  @spec get(entry_ref(), keyword()) :: Entry.t() | nil
  def get(ref, opts \\ []) do
    case Cluster.split(opts) do
      {nil, o} -> Native.ana_get(store!(o).ref, id!(ref))
      {ctx, o} -> Cluster.get(ctx, ref, o)
    end
  end

  @doc """
  The call stack at an event, innermost call first: for a call, the call
  and its callers; for a return or exception, the call it leaves and its
  callers; for any other event, the call it happened in and its callers.
  Only traced calls appear (untraced frames in between are invisible).
  `[]` for an event outside any traced call; nil for an unknown id.
  """
  @spec traceback(entry_ref(), keyword()) :: [Entry.t()] | nil
  def traceback(ref, opts \\ []) do
    case Cluster.split(opts) do
      {nil, o} ->
        quick(store!(o).ref, :traceback, id!(ref), 0, &Native.ana_traceback(&1, id!(ref)))

      {ctx, o} ->
        Cluster.traceback(ctx, ref, o)
    end
  end

  @doc """
  Every event inside a call, in order: the call, the calls it made (to any
  depth) and their returns, the messages sent and received and the
  processes spawned on the way, and the call's own return or exception.
  `ref` may be any event of the call: a return or exception stands for its
  call. Options: `:limit` (default 100_000), `:store`.
  """
  @spec range(entry_ref(), keyword()) :: [Entry.t()]
  def range(ref, opts \\ []) do
    case Cluster.split(opts) do
      {nil, o} -> range_local(ref, o)
      {ctx, o} -> Cluster.range(ctx, ref, o)
    end
  end

  defp range_local(ref, opts) do
    s = store!(opts)
    limit = pos_int!(Keyword.get(opts, :limit, 100_000), :limit)

    case ref do
      # An id resolved to its call inside the NIF (no `ana_get` round trip);
      # a big answer or a held lock (`:busy`) takes the path below.
      id when is_integer(id) and id > 0 ->
        case Native.ana_quick(s.ref, :range_of, id, limit) do
          :busy -> range_by_call(s, ref, limit)
          answer -> answer
        end

      _ ->
        range_by_call(s, ref, limit)
    end
  end

  defp range_by_call(s, ref, limit) do
    id = call_id!(s, ref)
    quick(s.ref, :range, id, limit, &Native.ana_range(&1, id, limit))
  end

  # Small answers on the caller's scheduler (`Native.ana_quick/4`), else
  # (`:busy`) the dirty NIF `dirty`.
  defp quick(ref, op, id, limit, dirty) do
    case Native.ana_quick(ref, op, id, limit) do
      :busy -> dirty.(ref)
      answer -> answer
    end
  end

  @doc """
  The call tree of a call: `%{call: entry, result: return_or_exception |
  nil, children: [tree | entry]}`, where `children` holds the nested calls'
  trees and the call's other events (sends, receives, spawns) in order.
  nil for an unknown id. Options as `range/2`.
  """
  @spec call_tree(entry_ref(), keyword()) :: tree() | nil
  def call_tree(ref, opts \\ []) do
    case Cluster.split(opts) do
      {nil, o} -> call_tree_local(ref, o)
      {ctx, o} -> Cluster.call_tree(ctx, ref, o)
    end
  end

  defp call_tree_local(ref, opts) do
    case range_local(ref, opts) do
      [%Entry{type: :call} = root | rest] -> build_tree(root, rest)
      _ -> nil
    end
  end

  defp build_tree(root, rest) do
    node = fn call -> %{call: call, result: nil, children: []} end

    {stack, _} =
      Enum.reduce(rest, {[node.(root)], nil}, fn e, {stack, _} ->
        case e do
          %Entry{type: :call} ->
            {[node.(e) | stack], nil}

          %Entry{type: t, call_id: cid} when t in [:return, :exception] ->
            close(stack, cid, e)

          other ->
            [top | below] = stack
            {[%{top | children: [other | top.children]} | below], nil}
        end
      end)

    # Calls left open (the trace stopped inside them) are closed without a
    # result.
    stack |> fold_open() |> finish_node()
  end

  # Pops frames until the one `cid` completes; attaches each to its parent.
  defp close([top | below], cid, result) do
    cond do
      top.call.id == cid ->
        attach(%{top | result: result}, below)

      Enum.any?(below, &(&1.call.id == cid)) ->
        [parent | rest] = below
        close([%{parent | children: [finish_node(top) | parent.children]} | rest], cid, result)

      true ->
        # A result for a call outside this tree: keep it as an event.
        {[%{top | children: [result | top.children]} | below], nil}
    end
  end

  defp attach(done, []), do: {[done], nil}

  defp attach(done, [parent | rest]),
    do: {[%{parent | children: [finish_node(done) | parent.children]} | rest], nil}

  defp fold_open([root]), do: root

  defp fold_open([top, parent | rest]),
    do: fold_open([%{parent | children: [finish_node(top) | parent.children]} | rest])

  defp finish_node(n), do: %{n | children: Enum.reverse(n.children)}

  @doc """
  Identical call trees that repeat: same function, arguments and return
  value, with the same nested calls in the same order (arguments and
  values as captured, so under the payload cap; with `payload: :arity`
  only the shapes are compared). Each result: `%{count:, size:
  (calls per occurrence), total_ns:, tree:}` (the first occurrence's
  `call_tree/2`), by `total_ns`, largest first. Like `call_stat/1`, the
  pass runs over a consistent cut without holding the store's lock.

  Options: `:max` (10), `:min_count` (2), `:min_size` (2 calls), `:store`.
  """
  @spec top_call_trees(keyword()) :: [map()]
  def top_call_trees(opts \\ []) do
    case Cluster.split(opts) do
      {nil, o} -> top_call_trees_local(o)
      {ctx, o} -> Cluster.top_call_trees(ctx, o)
    end
  end

  defp top_call_trees_local(opts) do
    o =
      ElixirScope.Args.keyword_opts!(
        opts,
        [max: 10, min_count: 2, min_size: 2, store: nil],
        "ElixirScope.Analysis.top_call_trees"
      )

    s = store!(o)

    {trees, _distinct, _untracked} =
      Native.ana_top_trees(
        s.ref,
        pos_int!(o[:max], :max),
        pos_int!(o[:min_count], :min_count),
        pos_int!(o[:min_size], :min_size)
      )

    for {call_id, count, size, total} <- trees do
      %{count: count, size: size, total_ns: total, tree: call_tree_local(call_id, store: s)}
    end
  end

  @doc """
  Call statistics over the whole trace: `[%{key:, count:, acc_ns:,
  own_ns:}]`, by accumulated time, largest first. `acc_ns` is the time
  inside the calls (a recursive call inside another call of the same key
  in the same process counts once, with its outermost call); `own_ns`
  excludes the time in traced callees. Calls whose return was not traced
  count, without time. The pass runs over a consistent cut of the store
  taken when it starts, without holding the store's lock, so ingest into
  the store goes on meanwhile (events stored after the cut are not
  counted).

  Options: `:by` — `:function` (key `{m, f, arity}`, default), `:module`,
  `:process` (key: pid), `:process_function` (key `{pid, {m, f, a}}`);
  `:modules` — only calls of these modules; `:store`.

  After a stats session (`ElixirScope.trace(targets, mode: :stats)`, no
  `store:` given) the figures are the VM's counters, read live while it
  runs: exact counts, `own_ns` the time in the function itself (the VM
  stops a function's clock while a counted callee runs, and while the
  process is scheduled out; microsecond resolution per process and
  function), `acc_ns` nil; by own time, largest first. After `mode:
  :counts`, only `by: :function` / `:module`, with counts (`own_ns` nil).
  """
  @spec call_stat(keyword()) :: [map()]
  def call_stat(opts \\ []) do
    case Cluster.split(opts) do
      {nil, o} -> call_stat_local(o)
      {ctx, o} -> Cluster.call_stat(ctx, o)
    end
  end

  defp call_stat_local(opts) do
    o =
      ElixirScope.Args.keyword_opts!(
        opts,
        [by: :function, modules: [], store: nil],
        "ElixirScope.Analysis.call_stat"
      )

    unless o[:by] in [:function, :module, :process, :process_function] do
      raise ArgumentError,
            "by must be :function, :module, :process or :process_function, got: #{inspect(o[:by])}"
    end

    mods = o[:modules]

    unless is_list(mods) and Enum.all?(mods, &is_atom/1),
      do: raise(ArgumentError, "modules must be a list of modules, got: #{inspect(mods)}")

    # The last trace a stats session (mode: :stats / :counts): the VM's counters.
    stats =
      o[:store] == nil and ElixirScope.Tracer.Stats.last?() && ElixirScope.Tracer.stats_data()

    if stats do
      ElixirScope.Tracer.Stats.call_stat(stats, o[:by], mods)
    else
      {stats, _scanned, _untracked} = Native.ana_call_stats(store!(o).ref, o[:by], mods)

      for {key, count, acc, own} <- stats do
        %{key: key, count: count, acc_ns: acc, own_ns: own}
      end
    end
  end

  @doc """
  The event after `ref`: in the same process (`scope: :process`, the
  default) or across all processes in timestamp order (`scope: :global`).
  nil at the end.
  """
  @spec next(entry_ref(), keyword()) :: Entry.t() | nil
  def next(ref, opts \\ []), do: step(ref, opts, true)

  @doc "The event before `ref` (see `next/2`)."
  @spec prev(entry_ref(), keyword()) :: Entry.t() | nil
  def prev(ref, opts \\ []), do: step(ref, opts, false)

  defp step(ref, opts, forward) do
    case Cluster.split(opts) do
      {nil, o} -> step_local(ref, o, forward)
      {ctx, o} -> Cluster.step(ctx, ref, o, forward)
    end
  end

  defp step_local(ref, opts, forward) do
    scope = Keyword.get(opts, :scope, :process)

    unless scope in [:process, :global],
      do: raise(ArgumentError, "scope must be :process or :global, got: #{inspect(scope)}")

    Native.ana_step(store!(opts).ref, id!(ref), scope, forward)
  end

  @doc """
  Message flow: every traced send (by or to `pid:`, or all), with its
  receive when traced and matched, and the call it was sent from:
  `[%{from:, to:, message:, sent_at:, received_at:, in_call: {m, f, a} |
  nil, send: entry, receive: entry | nil}]` in send order, over a
  consistent cut taken when the call starts (scanned without holding the
  store's lock, as `select/1`). Options: `:pid`, `:limit` (10_000),
  `:store`.
  """
  @spec messages(keyword()) :: [map()]
  def messages(opts \\ []) do
    case Cluster.split(opts) do
      {nil, o} -> messages_local(o)
      {ctx, o} -> Cluster.messages(ctx, o)
    end
  end

  defp messages_local(opts) do
    o =
      ElixirScope.Args.keyword_opts!(
        opts,
        [pid: nil, limit: 10_000, store: nil],
        "ElixirScope.Analysis.messages"
      )

    check_term!(o[:pid], &is_pid/1, :pid)
    s = store!(o)
    limit = pos_int!(o[:limit], :limit)
    # A consistent cut, scanned in chunks without the store lock.
    snap = Native.ana_snapshot(s.ref)

    try do
      collect_messages(snap, o[:pid], 0, limit, [])
    after
      Native.ana_snapshot_release(snap)
    end
  end

  defp collect_messages(_ref, _pid, nil, _left, acc), do: acc |> Enum.reverse() |> List.flatten()
  defp collect_messages(_ref, _pid, _cursor, 0, acc), do: acc |> Enum.reverse() |> List.flatten()

  defp collect_messages(ref, pid, cursor, left, acc) do
    {flows, next} = Native.ana_messages(ref, pid, cursor, min(left, 1000))

    rows =
      for {send, recv, call} <- flows do
        %{
          from: send.pid,
          to: send.peer,
          message: send.data,
          sent_at: send.timestamp,
          received_at: recv && recv.timestamp,
          in_call: call && {call.module, call.function, call.arity},
          send: send,
          receive: recv
        }
      end

    collect_messages(ref, pid, next, left - length(rows), [rows | acc])
  end

  # ---- states ----------------------------------------------------------------------

  @i64_min -0x8000000000000000
  @i64_max 0x7FFFFFFFFFFFFFFF

  @typedoc "Why there is no state to show."
  @type state_error ::
          :not_traced
          | :no_state
          | :outside_trace
          | :before_first_state
          | :exited
          | :evicted

  @doc """
  The state of `pid` in force at `time`: `{:ok, %State{}}` (the state and
  the record that set it, see `ElixirScope.Analysis.State`), or
  `{:error, reason}`:

    * `:not_traced` — no event of `pid` in the store;
    * `:no_state` — events, but no state record (not an OTP process of a
      traced callback module, or states were not captured);
    * `:outside_trace` — `time` is before the first or after the last
      stored event;
    * `:before_first_state` — before the process's first state record
      (before its `init/1` returned, or before the snapshot);
    * `:exited` — after the process exited;
    * `:evicted` — the record in force then has been evicted from the
      bounded store, or a state record the trace's full ring dropped may
      have been in force (see the stop summary's `states_dropped`).

  `time` is monotonic nanoseconds (`System.monotonic_time(:nanosecond)`,
  the events' `timestamp`) or a `DateTime` (converted with the VM's
  current time offset). A state that keeps the previous one
  (`:keep_state_and_data`, `terminate/2`) shows the state it keeps. Cost:
  a binary search in the process's state index, no scan.
  Options: `:store`.
  """
  @spec state_at(pid(), integer() | DateTime.t(), keyword()) ::
          {:ok, State.t()} | {:error, state_error()}
  def state_at(pid, time, opts) when is_list(opts) do
    unless is_pid(pid),
      do: raise(ArgumentError, "state_at/3 expects a pid, got: #{inspect(pid)}")

    case Cluster.split(opts) do
      {nil, o} ->
        ref = store!(o).ref
        t = mono!(time)

        # On this scheduler when the store is free and the answer small,
        # else on a dirty scheduler.
        case Native.ana_state_at_fast(ref, pid, t) do
          :busy -> Native.ana_state_at(ref, pid, t)
          answer -> answer
        end

      {ctx, o} ->
        Cluster.state_at(ctx, pid, mono!(time), o)
    end
  end

  @doc """
  `state_at(pid, time)` (see `state_at/3`), or `state_at(event, opts)`:
  the state of the event's process when the event happened (for a state
  record, the state it set).
  """
  @spec state_at(pid() | Entry.t() | State.t(), integer() | DateTime.t() | keyword()) ::
          {:ok, State.t()} | {:error, state_error()}
  def state_at(%Entry{pid: pid, timestamp: t}, opts) when is_list(opts),
    do: state_at(pid, t, opts)

  def state_at(%State{pid: pid, timestamp: t}, opts) when is_list(opts),
    do: state_at(pid, t, opts)

  def state_at(pid, time), do: state_at(pid, time, [])

  @doc "`state_at(event, [])`: the state of the event's process when it happened."
  @spec state_at(Entry.t() | State.t()) :: {:ok, State.t()} | {:error, state_error()}
  def state_at(%Entry{} = e), do: state_at(e, [])
  def state_at(%State{} = s), do: state_at(s, [])

  def state_at(other),
    do:
      raise(ArgumentError, "state_at/1 expects an event (Entry or State), got: #{inspect(other)}")

  @doc """
  Every state of `pid`, oldest first: `[%State{}]` (see
  `ElixirScope.Analysis.State`: the time, the callback, its triggering
  message, the state in force from then on), or `{:error, :not_traced |
  :no_state}`. Options: `:from` / `:to` (monotonic ns or `DateTime`,
  inclusive), `:limit` (default 10_000), `:store`.
  `ElixirScope.Analysis.Format.print_state_history/2` prints it as a
  sequence of diffs.
  """
  @spec state_history(pid(), keyword()) :: [State.t()] | {:error, :not_traced | :no_state}
  def state_history(pid, opts \\ []) do
    case Cluster.split(opts) do
      {nil, o} -> state_history_local(pid, o)
      {ctx, o} -> Cluster.state_history(ctx, pid, o)
    end
  end

  defp state_history_local(pid, opts) do
    o =
      ElixirScope.Args.keyword_opts!(
        opts,
        [from: nil, to: nil, limit: 10_000, store: nil],
        "ElixirScope.Analysis.state_history"
      )

    unless is_pid(pid),
      do: raise(ArgumentError, "state_history/2 expects a pid, got: #{inspect(pid)}")

    t0 = if o[:from] == nil, do: @i64_min, else: mono!(o[:from])
    t1 = if o[:to] == nil, do: @i64_max, else: mono!(o[:to])

    case Native.ana_state_history(store!(o).ref, pid, t0, t1, pos_int!(o[:limit], :limit)) do
      {:ok, states} -> states
      {:error, _} = err -> err
    end
  end

  @doc """
  The processes with state records in the store and how many each has:
  `[{pid, count}]`. Options: `:store`.
  """
  @spec state_processes(keyword()) :: [{pid(), non_neg_integer()}]
  def state_processes(opts \\ []) do
    case Cluster.split(opts) do
      {nil, o} -> Native.ana_state_processes(store!(o).ref)
      {ctx, o} -> Cluster.state_processes(ctx, o)
    end
  end

  @doc """
  The structural differences between two states (`%State{}`) or any two
  terms: `[{:added, path, value} | {:removed, path, value} | {:changed,
  path, old, new} | {:cut, path}]` (see `ElixirScope.Analysis.Diff`).
  For gen_statem states a changed state name comes first, under the path
  `[:state_name]`. Parts cut at the state cap of a truncated state are
  reported as `{:cut, path}`, never as changes. Options: `:cut` (treat
  `{:truncated, _, _}` markers as unknown; default: true when either
  state is truncated).
  """
  @spec state_diff(State.t() | term(), State.t() | term(), keyword()) :: [Diff.change()]
  def state_diff(a, b, opts \\ [])

  def state_diff(%State{} = a, %State{} = b, opts) do
    cut = Keyword.get(opts, :cut, a.truncated == true or b.truncated == true)

    names =
      if a.name != nil or b.name != nil do
        Diff.diff(a.name, b.name, cut: cut) |> Enum.map(&prefix(&1, :state_name))
      else
        []
      end

    names ++ Diff.diff(a.state, b.state, cut: cut)
  end

  def state_diff(a, b, opts), do: Diff.diff(a, b, cut: Keyword.get(opts, :cut, false))

  defp prefix({:changed, p, x, y}, k), do: {:changed, [k | p], x, y}
  defp prefix({:added, p, x}, k), do: {:added, [k | p], x}
  defp prefix({:removed, p, x}, k), do: {:removed, [k | p], x}
  defp prefix({:cut, p}, k), do: {:cut, [k | p]}

  @doc """
  Why an event happened: the causal chain from it back to the root, as
  `[{role, %Entry{}}]`, across processes. For a state (`%State{}` or its
  record): the state record (`:state`) ← the callback's call
  (`:callback`) ← the receive of the message that triggered it
  (`:received`) ← that message's send (`:sent`) ← the call it was sent
  from and its callers (`:call`) ← if the outermost of those is itself an
  OTP callback, what triggered it ← ... A callback no message triggered
  leads to the previous state record (`:previous_state`: the `{:continue,
  _}`, the timeout or the internal event it set up), an `init/1` to the
  process's spawn (`:spawned`) and the spawning call. Works for any event
  (a call leads to its callers, a receive to its send). nil for an
  unknown id. `ElixirScope.Analysis.Format.print_why/1` prints it.
  Options: `:store`.
  """
  @spec why(State.t() | entry_ref(), keyword()) :: [{atom(), Entry.t()}] | nil
  def why(ref, opts \\ []) do
    case Cluster.split(opts) do
      {nil, o} -> why_local(ref, o)
      {ctx, o} -> Cluster.why(ctx, ref, o)
    end
  end

  defp why_local(ref, opts) do
    id =
      case ref do
        %State{id: id} -> id
        other -> id!(other)
      end

    case Native.ana_why(store!(opts).ref, id) do
      [] -> nil
      chain -> chain
    end
  end

  @doc """
  Runs a recorded call again — `apply(module, function, recorded_args)`
  in the current code, in a fresh process — and compares the result with
  the recorded return (Erlang Doctor's `do/1`, plus the comparison).

  `ref`: the call (or its return or exception). `{:ok, result}` with
  `result` a map: `:call` (the entry), `:mfa`, `:args`, `:recorded`
  (`{:return, value}`, `{:exception, {class, reason}}` or nil when the
  trace has no result), `:replayed` (`{:return, value}`, `{:exception,
  {class, reason}}` or `{:timeout, ms}`), `:match` (true / false; nil when
  there is nothing to compare or the recorded value was cut) and `:diff`
  (`state_diff/3` of the two values, `[]` when they match).
  `{:error, reason}`: `:not_found`, `:not_a_call`, `:no_arguments` (traced
  with `payload: :arity`), `:arguments_truncated`, `{:not_exported, mfa}`
  (private functions cannot be called from outside their module).
  Options: `:timeout` (ms, default 5_000), `:store`.
  """
  @spec replay(entry_ref(), keyword()) :: {:ok, map()} | {:error, term()}
  def replay(ref, opts \\ []) do
    case Cluster.split(opts, [:timeout]) do
      {nil, o} -> replay_local(ref, o)
      {ctx, o} -> Cluster.replay(ctx, ref, o)
    end
  end

  defp replay_local(ref, opts) do
    o =
      ElixirScope.Args.keyword_opts!(
        opts,
        [timeout: 5_000, store: nil],
        "ElixirScope.Analysis.replay"
      )

    s = store!(o)
    timeout = pos_int!(o[:timeout], :timeout)

    with {:ok, call} <- replay_call(s, ref),
         {:ok, mfa} <- replayable(call) do
      recorded = recorded_result(s, call)
      replayed = run_isolated(call.module, call.function, call.data, timeout)
      {match, diff} = compare(recorded, replayed)

      {:ok,
       %{
         call: call,
         mfa: mfa,
         args: call.data,
         recorded: recorded && elem(recorded, 0),
         replayed: replayed,
         match: match,
         diff: diff
       }}
    end
  end

  defp replay_call(s, ref) do
    case Native.ana_get(s.ref, id!(ref)) do
      nil ->
        {:error, :not_found}

      %Entry{type: :call} = c ->
        {:ok, c}

      %Entry{type: t, call_id: cid} when t in [:return, :exception] and is_integer(cid) ->
        case Native.ana_get(s.ref, cid) do
          %Entry{type: :call} = c -> {:ok, c}
          _ -> {:error, :not_found}
        end

      _ ->
        {:error, :not_a_call}
    end
  end

  defp replayable(%Entry{data: nil}), do: {:error, :no_arguments}

  defp replayable(%Entry{truncated: true}), do: {:error, :arguments_truncated}

  defp replayable(%Entry{module: m, function: f, data: args}) when is_list(args) do
    mfa = {m, f, length(args)}

    if Code.ensure_loaded?(m) and function_exported?(m, f, length(args)),
      do: {:ok, mfa},
      else: {:error, {:not_exported, mfa}}
  end

  defp replayable(_), do: {:error, :no_arguments}

  # `{{:return, v} | {:exception, {class, reason}}, truncated?}` or nil.
  defp recorded_result(s, call) do
    case Native.ana_result(s.ref, call.id) do
      %Entry{type: :return, data: v, truncated: t} -> {{:return, v}, t}
      %Entry{type: :exception, data: cr, truncated: t} -> {{:exception, cr}, t}
      nil -> nil
    end
  end

  defp run_isolated(m, f, args, timeout) do
    {pid, mon} =
      spawn_monitor(fn ->
        result =
          try do
            {:return, apply(m, f, args)}
          catch
            class, reason -> {:exception, {class, reason}}
          end

        exit({:elixir_scope_replay, result})
      end)

    receive do
      {:DOWN, ^mon, :process, ^pid, {:elixir_scope_replay, result}} -> result
      {:DOWN, ^mon, :process, ^pid, reason} -> {:exception, {:exit, reason}}
    after
      timeout ->
        Process.exit(pid, :kill)

        receive do
          {:DOWN, ^mon, :process, ^pid, _} -> :ok
        end

        {:timeout, timeout}
    end
  end

  defp compare(nil, _replayed), do: {nil, []}

  defp compare({recorded, truncated?}, replayed) do
    cond do
      recorded === replayed -> {true, []}
      truncated? -> {nil, state_diff(recorded, replayed, cut: true)}
      true -> {false, state_diff(recorded, replayed)}
    end
  end

  defp mono!(t) when is_integer(t), do: t

  defp mono!(%DateTime{} = dt),
    do: DateTime.to_unix(dt, :nanosecond) - System.time_offset(:nanosecond)

  defp mono!(other),
    do:
      raise(
        ArgumentError,
        "a time is monotonic nanoseconds (an integer) or a DateTime, got: #{inspect(other)}"
      )

  # ---- arguments ---------------------------------------------------------------

  defp store!(opts) do
    case Keyword.get(opts, :store) do
      %DataAccess{} = s ->
        s

      nil ->
        ElixirScope.trace_store() ||
          raise ArgumentError, "no trace to analyse: run ElixirScope.trace/2 first or pass store:"

      other ->
        raise ArgumentError, "store must be a %DataAccess{}, got: #{inspect(other)}"
    end
  end

  defp id!(%Entry{id: id}), do: id
  defp id!(id) when is_integer(id) and id > 0, do: id

  defp id!(other),
    do:
      raise(
        ArgumentError,
        "expected an event (Entry) or a positive integer id, got: #{inspect(other)}"
      )

  # The call a reference stands for: a call itself, a return's call.
  defp call_id!(s, ref) do
    case ref do
      %Entry{type: t, call_id: cid} when t in [:return, :exception] and is_integer(cid) ->
        cid

      %Entry{id: id} ->
        id

      id ->
        case Native.ana_get(s.ref, id!(id)) do
          %Entry{type: t, call_id: cid} when t in [:return, :exception] and is_integer(cid) -> cid
          _ -> id
        end
    end
  end

  defp pos_int!(v, _k) when is_integer(v) and v > 0, do: v

  defp pos_int!(v, k),
    do: raise(ArgumentError, "#{k} must be a positive integer, got: #{inspect(v)}")

  defp kinds!(nil), do: 0

  defp kinds!(types) when is_list(types) do
    Enum.reduce(types, 0, fn t, acc ->
      case Map.fetch(@types, t) do
        {:ok, k} ->
          Bitwise.bor(acc, Bitwise.bsl(1, k))

        :error ->
          raise ArgumentError,
                "unknown event type #{inspect(t)}; known: #{inspect(Map.keys(@types))}"
      end
    end)
  end

  defp kinds!(other), do: raise(ArgumentError, "types must be a list, got: #{inspect(other)}")

  defp ts!(nil, _k, default), do: default
  defp ts!(v, _k, _default) when is_integer(v), do: v
  defp ts!(v, k, _), do: raise(ArgumentError, "#{k} must be an integer (ns), got: #{inspect(v)}")

  defp check_term!(nil, _check, _k), do: :ok

  defp check_term!(v, check, k) do
    unless check.(v), do: raise(ArgumentError, "#{k} has a bad value: #{inspect(v)}")
    :ok
  end
end

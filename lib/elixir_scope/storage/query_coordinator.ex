defmodule ElixirScope.Storage.QueryCoordinator do
  @moduledoc """
  Watch a pipeline's events as they are stored, and ask the store
  correlation-aware questions.

  ## Live subscriptions

      {:ok, ref} = QueryCoordinator.subscribe(MyApp.Trace, module: MyApp.Bank, types: [:call])

      receive do
        {:elixir_scope_event, ^ref, %{event: call, parent_id: caller, links: links}} -> ...
        {:elixir_scope_dropped, ^ref, n} -> IO.puts("missed \#{n} events")
      end

      QueryCoordinator.unsubscribe(ref)

  Every newly stored event of the pipeline that matches the filter is sent
  to the subscriber as `{:elixir_scope_event, ref, map}`, where `map` is
  what `DataAccess.get_correlated/2` returns for it (`event`, `id`,
  `correlation_id`, `parent_id`, `root_id`, `links`, `correlation_type`,
  `timestamp`). Messages are sent by the pipeline's native delivery thread
  after the event is stored and correlated, in store order, so each
  process's events arrive in the order they happened. A receive whose send
  is stored after it is linked later (`late_links`): its notification
  carries the correlation known when it was stored.

  ### Filters

  | key | matches |
  |---|---|
  | `:pid` | the event's process (as `DataAccess.query_by_process/3`) |
  | `:node` | the node of the event's process (`node()`: local processes) |
  | `:module`, `:function` | a call's function (as `DataAccess.query_by_function/4`) |
  | `:arity` | a call's arity |
  | `:types` | a list of #{inspect([:call, :return, :exception, :send, :receive, :spawn, :exit, :link, :unlink, :state_change, :error, :performance_metric, :event])} |
  | `:correlation_id` | the stored correlation id (a call and its return share their call's id) |
  | `:args` | a call's argument list, by a match specification |
  | `:message` | a send's or receive's message, by a match specification |

  All given keys must match. `:args` and `:message` take a match
  specification (`[{head, guards, body}]`, as for `:ets.select/2`; the body
  is not used), `pattern/1` of a plain pattern (`:_` and `:"$1"` as in
  match specifications) or `match/1` of an Elixir pattern with a guard:

      QueryCoordinator.subscribe(pm, message: QueryCoordinator.match({:work, n} when n > 3))
      QueryCoordinator.subscribe(pm, args: [{[:_, :"$1"], [{:is_integer, :"$1"}], [true]}])

  They are evaluated natively on the stored payload (events recorded
  without arguments, or with a truncated field, do not match a pattern
  that looks inside them).

  ### Bounded, never blocking

  Each subscription has a bound, `:max_queue` (default 10,000): the
  messages sent to the subscriber and not yet taken out of its mailbox,
  plus those queued for sending, never exceed it (by one drop notice at
  most). The native side cannot see a mailbox, so it keeps an upper bound
  of it and asks this pipeline's coordinator process to measure the
  subscriber's `:message_queue_len` when the bound is half used; the
  measure counts every message in the mailbox. When the bound is reached,
  matching events for that subscriber are dropped and counted, and one
  `{:elixir_scope_dropped, ref, n}` message takes the place of each run of
  `n` dropped events. The pipeline never waits for a subscriber. A
  subscriber that exits is unsubscribed (monitored).

  `stats/1` gives a subscription's counters (`matched = delivered +
  dropped + queued events`), `subscriptions/1` the pipeline's.

  ## Queries

  `query/2` answers one multi-dimensional question (any combination of the
  filter keys above plus `:linked_to` and a `:from`/`:to` time window) on
  the most selective index, with `:limit`, `:order` and a `:cursor` to
  page; `correlation_search/3` gathers everything related to one event.
  Both work on any `%DataAccess{}` (a pipeline's or one filled by hand) or
  on a pipeline.
  """

  import Bitwise, only: [bor: 2, bsl: 2]

  alias ElixirScope.Capture.PipelineManager
  alias ElixirScope.Native
  alias ElixirScope.Storage.DataAccess

  @type_bits %{
    event: 1,
    call: 2,
    return: 3,
    spawn: 4,
    send: 5,
    state_change: 6,
    performance_metric: 7,
    error: 8,
    receive: 9,
    exit: 10,
    exception: 11,
    link: 12,
    unlink: 13
  }

  @filter_keys [:pid, :node, :module, :function, :arity, :types, :correlation_id, :args, :message]
  @max_queue_limit 16_777_216
  @subscribe_defaults [max_queue: 10_000, subscriber: nil]

  @typedoc "A subscription, as returned by `subscribe/3` and carried by its messages."
  @type subscription :: reference()
  @type pipeline :: PipelineManager.server()

  @doc """
  Subscribes to the pipeline's newly stored events that match `filter` (a
  keyword list, see "Filters"; `[]`: every event).

  Options: `:max_queue` (default 10,000, at most #{@max_queue_limit}) and
  `:subscriber` (the pid to send to, default `self()`; a local pid).

  Returns `{:ok, ref}` or `{:error, :unknown_pipeline}` when `pipeline`
  is not a running `PipelineManager`. Bad filters or options raise
  `ArgumentError`.
  """
  @spec subscribe(pipeline(), keyword(), keyword()) ::
          {:ok, subscription()} | {:error, term()}
  def subscribe(pipeline, filter \\ [], opts \\ []) do
    compiled = compile_filter!(filter)
    opts = ElixirScope.Args.keyword_opts!(opts, @subscribe_defaults, "subscribe")
    max = opts[:max_queue]

    unless is_integer(max) and max >= 1 and max <= @max_queue_limit,
      do:
        raise(
          ArgumentError,
          "subscribe option :max_queue must be an integer in 1..#{@max_queue_limit}, got: #{inspect(max)}"
        )

    subscriber = opts[:subscriber] || self()

    unless is_pid(subscriber) and node(subscriber) == node(),
      do:
        raise(
          ArgumentError,
          "subscribe option :subscriber must be a local pid, got: #{inspect(subscriber)}"
        )

    with {:ok, server} <- server(pipeline) do
      GenServer.call(server, {:subscribe, subscriber, compiled, max})
    end
  end

  @doc """
  Cancels a subscription: no message is sent for it afterwards (messages
  already in the mailbox stay there). `:ok`, also when it was already
  cancelled.
  """
  @spec unsubscribe(subscription()) :: :ok
  def unsubscribe(ref) do
    {_removed, id, watcher} = Native.sub_cancel(ref)
    if is_pid(watcher), do: send(watcher, {:elixir_scope_forget, id})
    :ok
  end

  @doc """
  A subscription's counters: `matched`, `delivered`, `dropped`, `queued`,
  `drop_notices`, `backlog_estimate` (the bound's current reading),
  `backlog_reports`, `max_queue`, `latency_p50_ns`, `latency_p99_ns`,
  `latency_max_ns` (store write → message in the mailbox), `subscriber`,
  `active`.
  """
  @spec stats(subscription()) :: map()
  def stats(ref), do: Native.sub_stats(ref)

  @doc "The counters (`stats/1`) of every subscription of the pipeline."
  @spec subscriptions(pipeline()) :: [map()] | {:error, :unknown_pipeline}
  def subscriptions(pipeline) do
    with {:ok, pipe} <- pipe(pipeline), do: Native.sub_list(pipe)
  end

  @doc """
  Waits until every event written to the pipeline before the call is
  stored and its notifications are in the subscribers' mailboxes (or
  dropped): `:ok` or `{:error, :timeout}`.
  """
  @spec flush(pipeline(), non_neg_integer()) :: :ok | {:error, :timeout | :unknown_pipeline}
  def flush(pipeline, timeout_ms \\ 5000) when is_integer(timeout_ms) and timeout_ms >= 0 do
    with {:ok, pipe} <- pipe(pipeline),
         :ok <- PipelineManager.flush(pipeline, timeout_ms) do
      if Native.sub_flush(pipe, timeout_ms), do: :ok, else: {:error, :timeout}
    end
  end

  @doc """
  A `Stream` of the pipeline's matching events as they are stored (for
  IEx): it subscribes when it starts, in the consuming process, and
  unsubscribes when it halts.

      QueryCoordinator.stream(pm, module: MyApp.Bank) |> Enum.take(10)

  Elements are the maps of `{:elixir_scope_event, ref, map}`; a drop
  notice becomes `{:dropped, n}` (`dropped: :skip` leaves it out).
  Options: those of `subscribe/3`, `:timeout` (halt after this many ms
  without an event; default `:infinity`), `:dropped`.
  """
  @spec stream(pipeline(), keyword(), keyword()) :: Enumerable.t()
  def stream(pipeline, filter \\ [], opts \\ []) do
    {timeout, opts} = Keyword.pop(opts, :timeout, :infinity)
    {dropped, opts} = Keyword.pop(opts, :dropped, :emit)

    unless timeout == :infinity or (is_integer(timeout) and timeout >= 0),
      do:
        raise(
          ArgumentError,
          "stream option :timeout must be :infinity or ms, got: #{inspect(timeout)}"
        )

    unless dropped in [:emit, :skip],
      do:
        raise(
          ArgumentError,
          "stream option :dropped must be :emit or :skip, got: #{inspect(dropped)}"
        )

    # Validate now, so a bad filter fails where the stream is built.
    _ = compile_filter!(filter)

    Stream.resource(
      fn ->
        case subscribe(pipeline, filter, Keyword.delete(opts, :subscriber)) do
          {:ok, ref} ->
            ref

          {:error, reason} ->
            raise ArgumentError, "cannot subscribe to #{inspect(pipeline)}: #{inspect(reason)}"
        end
      end,
      fn ref ->
        receive do
          {:elixir_scope_event, ^ref, event} -> {[event], ref}
          {:elixir_scope_dropped, ^ref, n} when dropped == :emit -> {[{:dropped, n}], ref}
          {:elixir_scope_dropped, ^ref, _n} -> {[], ref}
        after
          timeout -> {:halt, ref}
        end
      end,
      &unsubscribe/1
    )
  end

  @doc """
  A match specification matching `pattern` (a term where `:_` matches
  anything and `:"$1"`, `:"$2"`... bind), with no guard:
  `[{pattern, [], [true]}]`.
  """
  @spec pattern(term()) :: [{term(), [], [true]}]
  def pattern(pattern), do: [{pattern, [], [true]}]

  @doc """
  Compiles an Elixir pattern, with an optional `when` guard, into a match
  specification (at compile time; `^var` is taken from the caller):

      QueryCoordinator.match({:deposit, account, amount} when amount > 100)
      QueryCoordinator.match([_, %{id: id}] when is_integer(id))

  Variables bind (`_` and `_name` match anything); guards may use
  comparisons, `and`/`or`/`not`, the `is_*` type tests, `elem/2`, `hd/1`,
  `tl/1`, `length/1`, `tuple_size/1`, `map_size/1`, `is_map_key/2`,
  `abs/1`, `+`, `-`, `*`, `div/2`, `rem/2`.
  """
  defmacro match(pattern_and_guard) do
    {pat, guards} =
      case pattern_and_guard do
        {:when, _, [p, g]} -> {p, [g]}
        p -> {p, []}
      end

    {head, vars} = ms_pattern(pat, %{})
    guards = Enum.map(guards, &ms_guard(&1, vars))
    quote do: [{unquote(head), unquote(guards), [true]}]
  end

  # ---- queries -------------------------------------------------------------------

  @query_keys [:linked_to, :from, :to, :event_type, :ast_node_id, :limit, :order, :cursor, :as]

  @doc """
  One query over a store (a `%DataAccess{}` or a `PipelineManager`):

      {:ok, %{events: events, cursor: next, plan: :pid}} =
        QueryCoordinator.query(store, pid: pid, types: [:call], from: t0, to: t1, limit: 100)
      {:ok, page2} = QueryCoordinator.query(store, pid: pid, types: [:call], from: t0, to: t1,
                                            limit: 100, cursor: next)

  Filters: every subscription filter key (see "Filters"), `:linked_to`
  (events with a link to this event id: calls made inside it, its return,
  the receive of a send, state changes inside a call) and `:from`/`:to`
  (timestamps, inclusive), and for events stored whole by
  `DataAccess.store_event/2` (maps and structs), `:event_type` and
  `:ast_node_id` (their fields of that name, any term; matched by a
  63-bit hash of the term, as `DataAccess` keys ids). Options: `:limit` (1,000), `:order` (`:asc` or
  `:desc`, in store order: each process's event order), `:cursor` (the
  `cursor` of the previous page; `nil` when there is no more), `:as`
  (`:correlated`, default: `DataAccess.get_correlated/2` maps; `:event`:
  the stored events; `:entry`: `ElixirScope.Analysis.Entry` records).

  The plan is reported (`:correlation`, `:linked_to`, `:pid`, `:function`,
  `:event_type`, `:ast_node`, `:time` or `:scan`) with its `estimate` of the records it visits: the
  planner estimates each usable index and walks the smallest; an index
  that would visit more than a quarter of the store is replaced by a scan
  in chunks of 50,000 records (each chunk one dirty-scheduler call holding
  the store lock).
  """
  @spec query(DataAccess.t() | pipeline(), keyword()) :: {:ok, map()} | {:error, term()}
  def query(store, spec) do
    unless is_list(spec) and Keyword.keyword?(spec),
      do: raise(ArgumentError, "a query must be a keyword list, got: #{inspect(spec, limit: 5)}")

    {opts, filter} = Keyword.split(spec, @query_keys)

    o =
      ElixirScope.Args.keyword_opts!(
        opts,
        [
          linked_to: nil,
          from: nil,
          to: nil,
          event_type: nil,
          ast_node_id: nil,
          limit: 1000,
          order: :asc,
          cursor: nil,
          as: :correlated
        ],
        "query"
      )

    f = compile_filter!(filter)

    for k <- [:linked_to, :from, :to], v = o[k], v != nil do
      unless is_integer(v), do: bad_filter!(k, v, "an integer")
    end

    limit = o[:limit]

    unless is_integer(limit) and limit >= 0,
      do: bad_filter!(:limit, limit, "a non-negative integer")

    unless o[:order] in [:asc, :desc], do: bad_filter!(:order, o[:order], ":asc or :desc")

    unless o[:as] in [:correlated, :event, :entry],
      do: bad_filter!(:as, o[:as], ":correlated, :event or :entry")

    cursor = o[:cursor]

    unless cursor == nil or (is_integer(cursor) and cursor >= 0),
      do: bad_filter!(:cursor, cursor, "nil or the cursor of a previous page")

    tag = fn k -> if o[k] == nil, do: nil, else: DataAccess.tag_key(o[k]) end

    f =
      Map.merge(f, %{
        linked_to: o[:linked_to],
        from: o[:from],
        to: o[:to],
        event_type: tag.(:event_type),
        ast_node: tag.(:ast_node_id)
      })

    with {:ok, s} <- store(store) do
      {:ok, run_query(s.ref, f, o[:order] == :desc, min(limit, 16_777_216), cursor, o[:as], [])}
    end
  end

  defp run_query(ref, f, desc, limit, cursor, as, acc) do
    # Small indexed queries on the caller's scheduler first (`:busy`:
    # the dirty NIF).
    {events, next, plan, estimate} =
      case Native.qry_query_quick(ref, f, desc, limit, cursor, as) do
        :busy -> Native.qry_query(ref, f, desc, limit, cursor, as)
        page -> page
      end

    acc = [events | acc]
    left = limit - length(events)

    # A scan stops after a chunk of records: continue until the page is full.
    if plan == :scan and next != nil and left > 0 do
      run_query(ref, f, desc, left, next, as, acc)
    else
      events =
        case acc do
          [one] -> one
          _ -> acc |> Enum.reverse() |> Enum.concat()
        end

      %{
        events: events,
        cursor: next,
        plan: plan,
        estimate: estimate
      }
    end
  end

  @doc """
  Everything related to event `id`, in one call:

    * `event` — the event; `call` — the call it belongs to (itself for a
      call, the call a return or exception completes, else the enclosing
      call); `return` — that call's return or exception;
    * `ancestors` — the callers, nearest first (at most `depth`);
    * `inside` — what happened inside the call, `depth` levels of nested
      calls down (calls and their returns, sends, receives, spawns, state
      changes), in store order;
    * `messages` — each message sent by the event or inside the call:
      `%{send, receive, receiver_call}` (the receive, when matched, and
      the call the receiving process was in);
    * `state_changes` — the state changes made inside the call;
    * `truncated` — whether `limit` cut `inside` short.

  All events are `DataAccess.get_correlated/2` maps. Options: `:depth`
  (default 3), `:limit` (10,000). `{:ok, map}` or `{:error, :not_found}`.
  Cost: the size of the answer (index walks).
  """
  @spec correlation_search(DataAccess.t() | pipeline(), non_neg_integer(), keyword()) ::
          {:ok, map()} | {:error, term()}
  def correlation_search(store, id, opts \\ [])

  def correlation_search(store, id, opts) when is_integer(id) and id >= 0 do
    o = ElixirScope.Args.keyword_opts!(opts, [depth: 3, limit: 10_000], "correlation_search")

    for k <- [:depth, :limit] do
      v = o[k]

      unless is_integer(v) and v >= 1,
        do:
          raise(
            ArgumentError,
            "correlation_search option #{inspect(k)} must be a positive integer, got: #{inspect(v)}"
          )
    end

    with {:ok, s} <- store(store), do: Native.qry_related(s.ref, id, o[:depth], o[:limit])
  end

  def correlation_search(_store, id, _opts),
    do: raise(ArgumentError, "event id must be a non-negative integer, got: #{inspect(id)}")

  defp store(%DataAccess{} = s), do: {:ok, s}

  defp store(pipeline) do
    case server(pipeline) do
      {:ok, _} -> {:ok, PipelineManager.data_access(pipeline)}
      err -> err
    end
  catch
    :exit, _ -> {:error, :unknown_pipeline}
  end

  # ---- match/1 compilation -----------------------------------------------------

  @doc false
  def ms_pattern({:_, _, ctx}, vars) when is_atom(ctx), do: {:_, vars}

  def ms_pattern({name, _, ctx} = _var, vars) when is_atom(name) and is_atom(ctx) do
    if String.starts_with?(Atom.to_string(name), "_") do
      {:_, vars}
    else
      case vars do
        %{^name => v} ->
          {v, vars}

        _ ->
          v = :"$#{map_size(vars) + 1}"
          {v, Map.put(vars, name, v)}
      end
    end
  end

  def ms_pattern({:^, _, [pinned]}, vars), do: {pinned, vars}

  def ms_pattern({:{}, _, elems}, vars) do
    {elems, vars} = Enum.map_reduce(elems, vars, &ms_pattern/2)
    {{:{}, [], elems}, vars}
  end

  def ms_pattern({a, b}, vars) do
    {a, vars} = ms_pattern(a, vars)
    {b, vars} = ms_pattern(b, vars)
    {{a, b}, vars}
  end

  def ms_pattern({:%{}, _, kvs}, vars) do
    {kvs, vars} =
      Enum.map_reduce(kvs, vars, fn {k, v}, vars ->
        {v, vars} = ms_pattern(v, vars)
        {{k, v}, vars}
      end)

    {{:%{}, [], kvs}, vars}
  end

  def ms_pattern(list, vars) when is_list(list) do
    case List.last(list) do
      {:|, _, [h, t]} ->
        {init, vars} = Enum.map_reduce(Enum.drop(list, -1), vars, &ms_pattern/2)
        {h, vars} = ms_pattern(h, vars)
        {t, vars} = ms_pattern(t, vars)
        {init ++ [{:|, [], [h, t]}], vars}

      _ ->
        Enum.map_reduce(list, vars, &ms_pattern/2)
    end
  end

  def ms_pattern(literal, vars)
      when is_atom(literal) or is_number(literal) or is_binary(literal),
      do: {literal, vars}

  def ms_pattern(other, _vars),
    do: raise(ArgumentError, "unsupported pattern in match/1: #{Macro.to_string(other)}")

  @guard_ops %{
    ==: :==,
    !=: :"/=",
    ===: :"=:=",
    !==: :"=/=",
    <: :<,
    >: :>,
    <=: :"=<",
    >=: :>=,
    and: :andalso,
    or: :orelse,
    not: :not,
    +: :+,
    -: :-,
    *: :*,
    div: :div,
    rem: :rem,
    hd: :hd,
    tl: :tl,
    length: :length,
    tuple_size: :tuple_size,
    map_size: :map_size,
    abs: :abs,
    is_atom: :is_atom,
    is_integer: :is_integer,
    is_float: :is_float,
    is_number: :is_number,
    is_binary: :is_binary,
    is_list: :is_list,
    is_tuple: :is_tuple,
    is_map: :is_map,
    is_pid: :is_pid,
    is_reference: :is_reference,
    is_function: :is_function,
    is_port: :is_port,
    is_boolean: :is_boolean
  }

  @doc false
  def ms_guard({name, _, ctx}, vars) when is_atom(name) and is_atom(ctx) do
    Map.get(vars, name) ||
      raise ArgumentError, "guard variable #{name} is not bound in the pattern of match/1"
  end

  def ms_guard({:^, _, [pinned]}, _vars), do: quote(do: {:const, unquote(pinned)})

  def ms_guard({:elem, _, [t, i]}, vars) when is_integer(i),
    do: {:{}, [], [:element, i + 1, ms_guard(t, vars)]}

  def ms_guard({:is_map_key, _, [m, k]}, vars),
    do: {:{}, [], [:is_map_key, ms_guard(k, vars), ms_guard(m, vars)]}

  def ms_guard({op, _, args}, vars) when is_atom(op) and is_list(args) do
    case Map.fetch(@guard_ops, op) do
      {:ok, erl} ->
        {:{}, [], [erl | Enum.map(args, &ms_guard(&1, vars))]}

      :error ->
        raise ArgumentError,
              "unsupported guard #{op}/#{length(args)} in match/1; supported: #{inspect(Map.keys(@guard_ops) ++ [:elem, :is_map_key])}"
    end
  end

  def ms_guard(literal, _vars) when is_atom(literal) or is_number(literal) or is_binary(literal),
    do: literal

  def ms_guard(other, _vars), do: quote(do: {:const, unquote(other)})

  # ---- filters -------------------------------------------------------------------

  @doc false
  # The filter map the native side takes (see sub_nif.rs).
  def compile_filter!(filter) do
    unless is_list(filter) and Keyword.keyword?(filter) do
      raise ArgumentError,
            "a filter must be a keyword list of #{inspect(@filter_keys)}, got: #{inspect(filter, limit: 5)}"
    end

    case Keyword.keys(filter) -- @filter_keys do
      [] ->
        :ok

      unknown ->
        raise ArgumentError,
              "unknown filter key(s) #{inspect(unknown)}; known: #{inspect(@filter_keys)}"
    end

    f = Map.new(filter)

    pid = Map.get(f, :pid)
    unless pid == nil or is_pid(pid), do: bad_filter!(:pid, pid, "a pid")

    for k <- [:module, :function], v = Map.get(f, k), v != nil do
      unless is_atom(v), do: bad_filter!(k, v, "an atom")
    end

    arity = Map.get(f, :arity)

    unless arity == nil or (is_integer(arity) and arity >= 0 and arity <= 255),
      do: bad_filter!(:arity, arity, "an integer in 0..255")

    corr = Map.get(f, :correlation_id)

    unless corr == nil or (is_integer(corr) and corr >= 0 and corr < bsl(1, 62)),
      do: bad_filter!(:correlation_id, corr, "a stored correlation id (a non-negative integer)")

    {local, remote} =
      case Map.get(f, :node) do
        nil -> {false, nil}
        n when n == node() -> {true, nil}
        n when is_atom(n) -> {false, Atom.to_string(n)}
        n -> bad_filter!(:node, n, "a node name (an atom)")
      end

    %{
      pid: pid,
      module: Map.get(f, :module),
      function: Map.get(f, :function),
      arity: arity,
      types: types!(Map.get(f, :types)),
      correlation_id: corr,
      local_node: local,
      remote_node: remote,
      args: spec!(:args, Map.get(f, :args)),
      message: spec!(:message, Map.get(f, :message))
    }
  end

  @doc false
  def types!(nil), do: 0
  def types!([]), do: bad_filter!(:types, [], "a non-empty list of event types")

  def types!(types) when is_list(types) do
    Enum.reduce(types, 0, fn t, acc ->
      case Map.fetch(@type_bits, t) do
        {:ok, bit} ->
          bor(acc, bsl(1, bit))

        :error ->
          raise ArgumentError,
                "unknown event type #{inspect(t)} in filter :types; known: #{inspect(Map.keys(@type_bits))}"
      end
    end)
  end

  def types!(other), do: bad_filter!(:types, other, "a list of event types")

  defp spec!(_k, nil), do: nil

  defp spec!(k, [_ | _] = spec) do
    ok =
      Enum.all?(spec, fn
        {_head, guards, body} when is_list(guards) and is_list(body) -> true
        _ -> false
      end)

    if ok,
      do: spec,
      else:
        bad_filter!(
          k,
          spec,
          "a match specification [{head, guards, body}] (see pattern/1 and match/1)"
        )
  end

  defp spec!(k, other),
    do:
      bad_filter!(
        k,
        other,
        "a match specification [{head, guards, body}] (see pattern/1 and match/1)"
      )

  defp bad_filter!(k, v, what) do
    raise ArgumentError, "filter #{inspect(k)} must be #{what}, got: #{inspect(v, limit: 5)}"
  end

  # ---- pipelines -------------------------------------------------------------------

  # The pipeline's coordinator server, or {:error, :unknown_pipeline}.
  defp server(pipeline)
       when is_pid(pipeline) or (is_atom(pipeline) and pipeline != nil) or
              (is_tuple(pipeline) and elem(pipeline, 0) in [:via, :global]) do
    children = Supervisor.which_children(pipeline)

    case Enum.find_value(children, fn
           {__MODULE__.Server, pid, _, _} when is_pid(pid) -> pid
           _ -> nil
         end) do
      nil -> {:error, :unknown_pipeline}
      pid -> {:ok, pid}
    end
  catch
    # A dead or unregistered name, a process that is no supervisor, a
    # :via module that does not exist.
    kind, _ when kind in [:exit, :error] -> {:error, :unknown_pipeline}
  end

  defp server(_other), do: {:error, :unknown_pipeline}

  defp pipe(pipeline) do
    with {:ok, _} <- server(pipeline) do
      {:ok, PipelineManager.handles(pipeline).pipe}
    end
  catch
    :exit, _ -> {:error, :unknown_pipeline}
  end

  defmodule Server do
    @moduledoc false
    # A pipeline's coordinator process (a PipelineManager child): creates
    # subscriptions, monitors subscribers (an exit unsubscribes), and
    # answers the delivery thread's backlog requests with the subscriber's
    # message queue length.
    use GenServer

    alias ElixirScope.Native

    def start_link(pipeline), do: GenServer.start_link(__MODULE__, pipeline)

    @impl GenServer
    def init(pipeline) do
      pipe = pipeline.pipe
      :ok = Native.sub_set_watcher(pipe, self())

      # After a restart: monitor the subscribers the pipeline already has.
      monitors =
        for %{id: id, subscriber: pid} <- Native.sub_list(pipe), into: %{} do
          {Process.monitor(pid), id}
        end

      {:ok,
       %{pipe: pipe, monitors: monitors, by_id: Map.new(monitors, fn {m, id} -> {id, m} end)}}
    end

    @impl GenServer
    def handle_call({:subscribe, pid, filter, max_queue}, _from, s) do
      case Native.sub_new(s.pipe, pid, filter, max_queue) do
        {:ok, ref, id} ->
          mref = Process.monitor(pid)

          {:reply, {:ok, ref},
           %{s | monitors: Map.put(s.monitors, mref, id), by_id: Map.put(s.by_id, id, mref)}}

        {:error, _} = err ->
          {:reply, err, s}
      end
    rescue
      e in ArgumentError -> {:reply, {:error, {:bad_filter, Exception.message(e)}}, s}
    end

    @impl GenServer
    def handle_info({:elixir_scope_backlog, ref, pid, sent}, s) do
      case Process.info(pid, :message_queue_len) do
        {:message_queue_len, len} -> Native.sub_backlog(ref, sent, len)
        nil -> Native.sub_cancel(ref)
      end

      {:noreply, s}
    end

    def handle_info({:DOWN, mref, :process, _pid, _reason}, s) do
      case Map.pop(s.monitors, mref) do
        {nil, _} ->
          {:noreply, s}

        {id, monitors} ->
          _ = safe(fn -> Native.sub_cancel_id(s.pipe, id) end)
          {:noreply, %{s | monitors: monitors, by_id: Map.delete(s.by_id, id)}}
      end
    end

    def handle_info({:elixir_scope_forget, id}, s) do
      case Map.pop(s.by_id, id) do
        {nil, _} ->
          {:noreply, s}

        {mref, by_id} ->
          Process.demonitor(mref, [:flush])
          {:noreply, %{s | by_id: by_id, monitors: Map.delete(s.monitors, mref)}}
      end
    end

    def handle_info(_other, s), do: {:noreply, s}

    # The pipeline may have been shut down under us.
    defp safe(fun) do
      fun.()
    rescue
      ArgumentError -> :ok
    end
  end
end

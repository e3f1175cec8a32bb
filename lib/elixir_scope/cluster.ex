defmodule ElixirScope.Cluster do
  @moduledoc """
  Cluster traces: `ElixirScope.trace(targets, nodes: [node() | Node.list()])`
  traces on every named node at once, over Erlang distribution.

  Each node records into its own local pipeline and store, with its own
  tracer (the one `ElixirScope.trace/2` starts there): events never cross
  the network while tracing. This process (started by the `:elixir_scope`
  application on every node; the one on the node that calls `trace/2` is
  the coordinator) only starts and stops the nodes' tracers with `:erpc`,
  monitors them, and estimates each node's clock offset at the start and at
  the stop (see `ElixirScope.Cluster.Clock`). Queries read every node's
  store where it is (`ElixirScope.Analysis` with `nodes:`).

  The library (its beam files and the NIF) must be on every node, as any
  dependency; the `:elixir_scope` application is started there if it is
  not running.

  ## Faults

    * A node without the library (or whose NIF did not load), or whose
      tracer refuses (an unknown module there, a trace already running):
      with `on_missing: :skip` (the default) the others trace and the result
      names the node and its reason under `:missing`; with `on_missing:
      :abort` nothing is left tracing and `{:error, {:nodes_failed,
      [{node, reason}]}}` is returned.
    * Limits (`:max_events`, `:max_rate`, `:duration`) hold on each node
      by itself; a limit that trips on one node stops that node only, and
      is reported with the node (`trace_status/0`'s `:trips`, the
      `[:elixir_scope, :cluster, :node_stopped]` telemetry event).
    * A node that goes down mid-trace: the others keep tracing; its events
      are reported unavailable (`:down` in the status and in the stop
      summary; queries name it missing). It is not traced again when it
      comes back, until the next `trace/2`.
    * Every node's tracer monitors the coordinator: if the coordinator's
      node goes down or is cut off (a netsplit, also during `stop_trace/0`),
      that node stops its own trace and switches the VM's tracing off
      (reason `:owner_down`). A node's `:duration` limit holds anyway.
  """
  use GenServer

  alias ElixirScope.Cluster.{Clock, Remote}

  @cluster_defaults [nodes: nil, on_missing: :skip, timeout: 30_000, clock_samples: 16]
  @counters [:traced, :dropped, :shed, :over_limit, :after_stop, :truncated, :offered, :states]

  @doc false
  def start_link(_ \\ []), do: GenServer.start_link(__MODULE__, :ok, name: __MODULE__)

  @doc false
  def child_spec(arg),
    do: %{id: __MODULE__, start: {__MODULE__, :start_link, [arg]}, shutdown: 10_000}

  # ---- client -------------------------------------------------------------------

  @doc false
  # `ElixirScope.trace/2` with `nodes:` (see there).
  def trace(targets, opts) do
    {copts, topts} = Keyword.split(opts, Keyword.keys(@cluster_defaults))
    copts = ElixirScope.Args.keyword_opts!(copts, @cluster_defaults, "ElixirScope.trace/2")
    nodes = nodes!(copts[:nodes])

    unless copts[:on_missing] in [:skip, :abort],
      do:
        raise(
          ArgumentError,
          "on_missing must be :skip or :abort, got: #{inspect(copts[:on_missing])}"
        )

    timeout = timeout!(copts[:timeout])

    unless is_integer(copts[:clock_samples]) and copts[:clock_samples] in 1..1000,
      do:
        raise(
          ArgumentError,
          "clock_samples must be in 1..1000, got: #{inspect(copts[:clock_samples])}"
        )

    per_node = split_pids!(nodes, Keyword.get(topts, :pids, :all))

    case Enum.reject(nodes, &connected?/1) do
      [] ->
        call({:trace, targets, topts, per_node, nodes, Map.new(copts)}, timeout)

      not_connected ->
        {:error, {:not_connected, not_connected}}
    end
  end

  @doc false
  def stop(timeout \\ nil), do: call({:stop, timeout}, timeout || 30_000)

  @doc false
  def status(timeout \\ 5_000), do: call({:status, timeout}, timeout)

  @doc """
  The last cluster trace: `%{nodes:, clocks: %{node => %{start:, stop:}},
  down: %{node => reason}, missing: %{node => reason}}`, or nil when the
  last trace was a single-node one (or there was none). Read without a
  message (a `:persistent_term`).
  """
  @spec last() :: map() | nil
  def last, do: :persistent_term.get({__MODULE__, :last}, nil)

  @doc "True while a cluster trace runs on some node."
  @spec active?() :: boolean()
  def active? do
    case last() do
      %{active: true} -> true
      _ -> false
    end
  end

  @doc false
  # A single-node trace started: it is the last trace now.
  def forget do
    if :persistent_term.get({__MODULE__, :last}, nil) != nil,
      do: :persistent_term.erase({__MODULE__, :last})

    :ok
  end

  defp call(msg, timeout) do
    case Process.whereis(__MODULE__) do
      nil ->
        raise ArgumentError,
              "ElixirScope.Cluster is not running: start the :elixir_scope application"

      pid ->
        # Every step inside has its own timeout; this bounds the sum.
        GenServer.call(pid, msg, 4 * timeout + 30_000)
    end
  end

  defp nodes!(nodes) do
    unless is_list(nodes) and nodes != [] and Enum.all?(nodes, &is_atom/1) do
      raise ArgumentError,
            "nodes must be a non-empty list of node names, got: #{inspect(nodes)}"
    end

    Enum.each(nodes, fn n ->
      unless n == node() or String.contains?(Atom.to_string(n), "@"),
        do: raise(ArgumentError, "unknown node #{inspect(n)}: a node name is name@host")
    end)

    case nodes -- Enum.uniq(nodes) do
      [] -> nodes
      dups -> raise ArgumentError, "duplicate nodes: #{inspect(Enum.uniq(dups))}"
    end
  end

  defp timeout!(t) when is_integer(t) and t > 0, do: t

  defp timeout!(t),
    do: raise(ArgumentError, "timeout must be a positive integer (ms), got: #{inspect(t)}")

  defp connected?(n), do: n == node() or n in Node.list()

  # `pids:` per node: :all / :new for every node, or each node's own pids.
  defp split_pids!(nodes, spec) when spec in [:all, :new], do: Map.new(nodes, &{&1, spec})
  defp split_pids!(nodes, pid) when is_pid(pid), do: split_pids!(nodes, [pid])

  defp split_pids!(nodes, pids) when is_list(pids) do
    Enum.each(pids, fn p ->
      unless is_pid(p),
        do:
          raise(
            ArgumentError,
            "pids must be :all, :new, a pid or a list of pids, got: #{inspect(p)}"
          )
    end)

    groups = Enum.group_by(pids, &node/1)

    case (Map.keys(groups) -- nodes) ++ (nodes -- Map.keys(groups)) do
      [] ->
        groups

      _ ->
        raise ArgumentError,
              "with nodes:, pids must hold pids of the traced nodes only, at least one per node " <>
                "(or be :all / :new); pids are on #{inspect(Map.keys(groups))}, nodes are #{inspect(nodes)}"
    end
  end

  defp split_pids!(_nodes, other),
    do:
      raise(
        ArgumentError,
        "pids must be :all, :new, a pid or a list of pids, got: #{inspect(other)}"
      )

  # ---- server ---------------------------------------------------------------------

  @impl true
  def init(:ok), do: {:ok, %{session: nil}}

  @impl true
  def handle_call({:trace, _, _, _, _, _}, _from, %{session: %{active: true}} = s),
    do: {:reply, {:error, :already_tracing}, s}

  def handle_call({:trace, targets, topts, per_node, nodes, copts}, _from, s) do
    case start(targets, topts, per_node, nodes, copts) do
      {:ok, session, info} ->
        publish(session)
        {:reply, {:ok, info}, %{s | session: session}}

      {:error, _} = err ->
        {:reply, err, s}
    end
  end

  def handle_call({:stop, timeout}, _from, %{session: %{active: true} = session} = s) do
    session = finish(session, timeout || session.timeout)
    publish(session)
    {:reply, {:ok, stop_summary(session)}, %{s | session: session}}
  end

  def handle_call({:stop, _}, _from, s), do: {:reply, {:error, :not_tracing}, s}

  def handle_call({:status, _}, _from, %{session: nil} = s), do: {:reply, %{state: :idle}, s}

  def handle_call({:status, timeout}, _from, %{session: %{active: false} = session} = s),
    do: {:reply, status_of(session, session.summaries, timeout), s}

  def handle_call({:status, timeout}, _from, %{session: session} = s) do
    live = live_nodes(session)
    statuses = multicall(live, Remote, :status, [], timeout)
    {:reply, status_of(session, statuses, timeout), s}
  end

  @impl true
  def handle_info(
        {:elixir_scope_node_stopped, node, reason, _summary},
        %{session: %{active: true} = session} = s
      ) do
    ElixirScope.Telemetry.execute(
      [:elixir_scope, :cluster, :node_stopped],
      %{count: 1},
      %{node: node, reason: reason}
    )

    session = %{session | trips: Map.put(session.trips, node, reason)}
    publish(session)
    {:noreply, %{s | session: session}}
  end

  def handle_info({:DOWN, mon, :process, _, reason}, %{session: %{} = session} = s) do
    case Map.pop(session.monitors, mon) do
      {nil, _} ->
        {:noreply, s}

      {node, monitors} ->
        session = %{
          session
          | monitors: monitors,
            down: Map.put_new(session.down, node, down_reason(reason))
        }

        if session.active do
          ElixirScope.Telemetry.execute(
            [:elixir_scope, :cluster, :node_down],
            %{count: 1},
            %{node: node, reason: down_reason(reason)}
          )
        end

        publish(session)
        {:noreply, %{s | session: session}}
    end
  end

  def handle_info(_, s), do: {:noreply, s}

  defp down_reason(:noconnection), do: :nodedown
  defp down_reason(other), do: {:tracer_down, other}

  # ---- start / stop ---------------------------------------------------------------

  defp start(targets, topts, per_node, nodes, copts) do
    timeout = copts.timeout
    # 1. The library on every node.
    checks = multicall(nodes, Remote, :check, [], timeout)

    {ok_nodes, missing} =
      Enum.reduce(nodes, {[], %{}}, fn n, {ok, miss} ->
        case checks[n] do
          {:ok, {:ok, _}} -> {[n | ok], miss}
          {:ok, {:error, reason}} -> {ok, Map.put(miss, n, reason)}
          {:error, reason} -> {ok, Map.put(miss, n, reason)}
        end
      end)

    ok_nodes = Enum.reverse(ok_nodes)

    cond do
      missing != %{} and copts.on_missing == :abort ->
        {:error, {:nodes_failed, Enum.sort(Map.to_list(missing))}}

      ok_nodes == [] ->
        {:error, {:nodes_failed, Enum.sort(Map.to_list(missing))}}

      true ->
        start_on(targets, topts, per_node, ok_nodes, missing, nodes, copts)
    end
  end

  defp start_on(targets, topts, per_node, ok_nodes, missing, nodes, copts) do
    timeout = copts.timeout
    clocks = Clock.sample_all(ok_nodes, copts.clock_samples, timeout)

    started =
      ok_nodes
      |> Enum.map(fn n ->
        opts = Keyword.put(topts, :pids, per_node[n])
        {n, Task.async(fn -> erpc(n, Remote, :start, [targets, opts, self_pid()], timeout) end)}
      end)
      |> await_all(timeout)

    {traced, failed} =
      Enum.reduce(ok_nodes, {%{}, missing}, fn n, {tr, fl} ->
        case started[n] do
          {:ok, {:ok, info}} -> {Map.put(tr, n, info), fl}
          {:ok, {:error, reason}} -> {tr, Map.put(fl, n, reason)}
          {:error, reason} -> {tr, Map.put(fl, n, reason)}
        end
      end)

    # A node whose start did not answer may still start: stop it then.
    for {n, {:error, _}} <- started, do: stop_late(n)

    if traced == %{} or (copts.on_missing == :abort and map_size(failed) > 0) do
      # Nothing is left tracing: stop what started.
      _ = multicall(Map.keys(traced), Remote, :stop, [], timeout)
      {:error, {:nodes_failed, Enum.sort(Map.to_list(failed))}}
    else
      monitors =
        for n <- Map.keys(traced), into: %{} do
          {Process.monitor({ElixirScope.Tracer, n}), n}
        end

      session = %{
        id: make_ref(),
        active: true,
        nodes: nodes,
        traced: Map.keys(traced) |> Enum.sort(),
        infos: traced,
        missing: failed,
        down: %{},
        trips: %{},
        monitors: monitors,
        clocks:
          Map.new(Map.keys(traced), fn n ->
            {n, %{start: ok_or_nil(clocks[n]), stop: nil}}
          end),
        summaries: %{},
        timeout: copts.timeout,
        samples: copts.clock_samples,
        started_at: System.monotonic_time(:millisecond),
        stopped_at: nil
      }

      info = %{
        nodes: traced,
        missing: failed,
        clocks: Map.new(session.clocks, fn {n, c} -> {n, c.start} end)
      }

      {:ok, session, info}
    end
  end

  defp finish(session, timeout) do
    live = live_nodes(session)
    results = multicall(live, Remote, :stop, [], timeout)
    clocks = Clock.sample_all(live, session.samples, timeout)

    summaries =
      Map.new(live, fn n ->
        case results[n] do
          {:ok, {:ok, summary}} -> {n, summary}
          {:ok, {:error, reason}} -> {n, %{state: :unknown, reason: reason}}
          {:error, reason} -> {n, %{state: :unreachable, reason: reason}}
        end
      end)

    # Nodes that did not answer the stop: their events are unavailable.
    unreachable = for {n, %{state: :unreachable, reason: r}} <- summaries, into: %{}, do: {n, r}

    Enum.each(session.monitors, fn {mon, _} -> Process.demonitor(mon, [:flush]) end)

    %{
      session
      | active: false,
        summaries: summaries,
        monitors: %{},
        down: Map.merge(unreachable, session.down),
        clocks: Map.new(session.clocks, fn {n, c} -> {n, %{c | stop: ok_or_nil(clocks[n])}} end),
        stopped_at: System.monotonic_time(:millisecond)
    }
  end

  defp stop_late(node) do
    owner = self()

    spawn(fn ->
      try do
        :erpc.call(node, Remote, :stop_owned, [owner], 600_000)
      catch
        _, _ -> :ok
      end
    end)
  end

  defp live_nodes(session), do: Enum.reject(session.traced, &Map.has_key?(session.down, &1))

  defp stop_summary(session) do
    per_node =
      Map.new(session.traced, fn n ->
        case session.down[n] do
          nil -> {n, Map.put(session.summaries[n], :node, n)}
          reason -> {n, %{node: n, state: :down, reason: reason, events: :unavailable}}
        end
      end)

    %{
      state: :stopped,
      nodes: per_node,
      totals: totals(per_node),
      missing: session.missing,
      down: session.down,
      trips: session.trips,
      clocks: clock_report(session.clocks),
      started_at: session.started_at,
      stopped_at: session.stopped_at
    }
  end

  defp status_of(session, statuses, _timeout) do
    per_node =
      Map.new(session.traced, fn n ->
        v =
          case {session.down[n], statuses[n]} do
            {nil, {:ok, st}} -> st
            {nil, %{} = st} -> st
            {nil, {:error, reason}} -> %{state: :unreachable, reason: reason}
            {nil, nil} -> %{state: :unknown}
            {reason, _} -> %{state: :down, reason: reason, events: :unavailable}
          end

        {n, Map.put(v, :node, n)}
      end)

    %{
      state: if(session.active, do: :tracing, else: :stopped),
      cluster: true,
      nodes: per_node,
      totals: totals(per_node),
      missing: session.missing,
      down: session.down,
      trips: session.trips,
      clocks: clock_report(session.clocks),
      started_at: session.started_at,
      stopped_at: session.stopped_at
    }
  end

  # Sums over the nodes that answered; `:unavailable` names the others.
  defp totals(per_node) do
    answered = for {_, %{traced: _} = m} <- per_node, do: m
    sums = Map.new(@counters, fn k -> {k, Enum.sum(Enum.map(answered, &Map.get(&1, k, 0)))} end)

    Map.put(
      sums,
      :unavailable,
      for({n, m} <- per_node, not Map.has_key?(m, :traced), do: n) |> Enum.sort()
    )
  end

  # Each node's samples, and the offset its times are corrected with.
  defp clock_report(clocks) do
    Map.new(clocks, fn {n, c} ->
      best = Clock.best(c)
      {n, Map.merge(c, %{offset_ns: best && best.offset_ns, error_ns: best && best.error_ns})}
    end)
  end

  # What queries and trace_status/0 read without a message.
  defp publish(session) do
    :persistent_term.put({__MODULE__, :last}, %{
      id: session.id,
      active: session.active,
      nodes: session.traced,
      clocks: session.clocks,
      down: session.down,
      missing: session.missing,
      trips: session.trips
    })
  end

  # ---- erpc -----------------------------------------------------------------------

  defp self_pid, do: Process.whereis(__MODULE__)

  @doc false
  # `%{node => {:ok, value} | {:error, reason}}`: `m.f(a...)` on every node
  # at once, each within `timeout` ms (`:erpc.multicall/5`); the reason of
  # a node that did not answer is `:timeout`, `:noconnection` (down or
  # cut off) or `:library_missing` (the module is not there).
  def multicall([], _m, _f, _a, _timeout), do: %{}

  def multicall(nodes, m, f, a, timeout) do
    results = :erpc.multicall(nodes, m, f, a, timeout)
    nodes |> Enum.zip(results) |> Map.new(fn {n, r} -> {n, result(r, m, f, a)} end)
  end

  defp erpc(node, m, f, a, timeout) do
    {:ok, :erpc.call(node, m, f, a, timeout)}
  catch
    class, reason -> result({class, reason}, m, f, a)
  end

  defp result({:ok, v}, _m, _f, _a), do: {:ok, v}
  defp result({:error, {:erpc, reason}}, _m, _f, _a), do: {:error, reason}

  defp result({:error, {:exception, :undef, [{m, f, _, _} | _]}}, m, f, _a),
    do: {:error, :library_missing}

  defp result({:error, {:exception, reason, _stack}}, _m, _f, _a),
    do: {:error, {:exception, reason}}

  defp result({:exit, {:exception, reason}}, _m, _f, _a), do: {:error, {:exit, reason}}
  defp result({:exit, reason}, _m, _f, _a), do: {:error, {:exit, reason}}
  defp result({:throw, v}, _m, _f, _a), do: {:error, {:throw, v}}
  defp result({:error, reason}, _m, _f, _a), do: {:error, reason}

  defp await_all(tasks, timeout) do
    Map.new(tasks, fn {n, task} ->
      case Task.yield(task, timeout + 1_000) || Task.shutdown(task, :brutal_kill) do
        {:ok, r} -> {n, r}
        _ -> {n, {:error, :timeout}}
      end
    end)
  end

  defp ok_or_nil({:ok, v}), do: v
  defp ok_or_nil(_), do: nil
end

defmodule ElixirScope.Analysis.Cluster do
  @moduledoc false
  # `ElixirScope.Analysis` over several nodes (`nodes:`): each node's
  # store is read where it is, over `:erpc`, all nodes at once; results are
  # merged on this node with every time moved to this node's clock (each
  # node's offset, `ElixirScope.Cluster.Clock`). A node that is down, not
  # traced, or slower than `timeout:` is named in `{:partial, result,
  # %{node => reason}}`; nothing waits longer than the timeout.
  #
  # Cross-node messages: a send whose receiver is on another node (a pid,
  # `{name, node}`, or an alias reference of a `GenServer.call` reply) is
  # matched to that node's receives that no local send explains, with the
  # local rules: the same receiver (when known) and equal contents, the
  # oldest first; confidence 1/n when n identical messages were candidates.

  alias ElixirScope.Analysis.{Entry, State}
  alias ElixirScope.Cluster
  alias ElixirScope.Cluster.Clock

  @default_timeout 5_000

  # ---- which nodes ------------------------------------------------------------------

  @doc false
  # `{nodes | nil, opts}`: the nodes to ask (nil: this node's store only)
  # and the options without `:nodes` (and `:timeout`, unless `keep` lists
  # it as the function's own option).
  def split(opts, keep \\ [])

  def split(opts, keep) when is_list(opts) do
    nodes =
      cond do
        Keyword.has_key?(opts, :nodes) -> nodes!(Keyword.get(opts, :nodes))
        Keyword.get(opts, :store) != nil -> nil
        true -> default_nodes()
      end

    drop = if :timeout in keep, do: [:nodes], else: [:nodes, :timeout]
    rest = Keyword.drop(opts, drop)

    case nodes do
      nil ->
        {nil, rest}

      nodes ->
        if Keyword.get(opts, :store) != nil,
          do: raise(ArgumentError, "give nodes: or store:, not both")

        # Read only here: a local query (the common case) skips the
        # application-env lookup.
        default = Application.get_env(:elixir_scope, :cluster_query_timeout, @default_timeout)
        timeout = Keyword.get(opts, :timeout, default)
        {ctx(nodes, timeout!(timeout)), rest}
    end
  end

  def split(opts, _keep), do: {nil, opts}

  defp default_nodes do
    case Cluster.last() do
      %{nodes: nodes} -> nodes
      _ -> nil
    end
  end

  defp nodes!(nil), do: nil

  defp nodes!(nodes) when is_list(nodes) and nodes != [] do
    unless Enum.all?(nodes, &is_atom/1),
      do: raise(ArgumentError, "nodes must be a list of node names, got: #{inspect(nodes)}")

    case nodes -- Enum.uniq(nodes) do
      [] -> nodes
      dups -> raise ArgumentError, "duplicate nodes: #{inspect(Enum.uniq(dups))}"
    end
  end

  defp nodes!(other),
    do:
      raise(ArgumentError, "nodes must be a non-empty list of node names, got: #{inspect(other)}")

  defp timeout!(t) when is_integer(t) and t > 0, do: t

  defp timeout!(t),
    do: raise(ArgumentError, "timeout must be a positive integer (ms), got: #{inspect(t)}")

  # What a query over `nodes` needs: their clocks (the last cluster trace's
  # samples; a node outside it is sampled now) and the nodes known missing.
  defp ctx(nodes, timeout) do
    last = Cluster.last() || %{clocks: %{}, down: %{}, missing: %{}}

    known_missing =
      Enum.reduce(nodes, %{}, fn n, acc ->
        cond do
          Map.has_key?(last.down, n) -> Map.put(acc, n, last.down[n])
          Map.has_key?(last.missing, n) -> Map.put(acc, n, {:not_traced, last.missing[n]})
          true -> acc
        end
      end)

    clocks =
      Map.new(nodes -- Map.keys(known_missing), fn n ->
        case Map.fetch(last.clocks, n) do
          {:ok, c} -> {n, c}
          :error -> {n, sample_now(n, timeout)}
        end
      end)

    %{nodes: nodes, clocks: clocks, timeout: timeout, missing: known_missing}
  end

  defp sample_now(n, timeout) do
    case Clock.sample(n, 4, timeout) do
      {:ok, s} -> %{start: s, stop: nil}
      {:error, _} -> nil
    end
  end

  # ---- running on the nodes ------------------------------------------------------------

  # `{%{node => value (times on this node's clock)}, missing}`: `build.(node)`
  # gives the `{function, args}` to run there (`ElixirScope.Cluster.Remote`).
  defp run(ctx, nodes, build) do
    asked = Enum.reject(nodes, &Map.has_key?(ctx.missing, &1))
    missing = Map.take(ctx.missing, nodes)

    tasks =
      Enum.map(asked, fn n ->
        {f, args} = build.(n)
        {n, Task.async(fn -> call(n, f, args, ctx.timeout) end)}
      end)

    results = Task.yield_many(Enum.map(tasks, &elem(&1, 1)), ctx.timeout + 2_000)

    Enum.zip(tasks, results)
    |> Enum.reduce({%{}, missing}, fn {{n, task}, {task, res}}, {ok, miss} ->
      case res || Task.shutdown(task, :brutal_kill) do
        {:ok, {:ok, v}} -> {Map.put(ok, n, shift(v, ctx.clocks[n])), miss}
        {:ok, {:raise, e, st}} -> reraise e, st
        {:ok, {:error, reason}} -> {ok, Map.put(miss, n, reason)}
        _ -> {ok, Map.put(miss, n, :timeout)}
      end
    end)
  end

  defp call(n, f, args, timeout) do
    :erpc.call(n, ElixirScope.Cluster.Remote, :query, [f, args], timeout)
  catch
    :error, {:erpc, :timeout} ->
      {:error, :timeout}

    :error, {:erpc, :noconnection} ->
      {:error, :nodedown}

    :error, {:erpc, reason} ->
      {:error, reason}

    :error, {:exception, :undef, [{ElixirScope.Cluster.Remote, _, _, _} | _]} ->
      {:error, :library_missing}

    :error, {:exception, %ArgumentError{} = e, st} ->
      {:raise, e, st}

    :error, {:exception, reason, _} ->
      {:error, {:exception, reason}}

    :exit, {:exception, reason} ->
      {:error, {:exit, reason}}

    kind, reason ->
      {:error, {kind, reason}}
  end

  defp done(value, missing) when missing == %{}, do: value
  defp done(value, missing), do: {:partial, value, missing}

  # Times of a node's results moved to this node's clock: the entries and
  # states of the shapes the queries return (never inside recorded data).
  defp shift(v, nil), do: v
  defp shift(%Entry{} = e, c), do: %{e | timestamp: Clock.to_local(e.timestamp, c)}
  defp shift(%State{} = s, c), do: %{s | timestamp: s.timestamp && Clock.to_local(s.timestamp, c)}

  defp shift(%{send: %Entry{}, sent_at: _} = row, c) do
    %{
      row
      | send: shift(row.send, c),
        receive: shift(row.receive, c),
        sent_at: row.sent_at && Clock.to_local(row.sent_at, c),
        received_at: row.received_at && Clock.to_local(row.received_at, c)
    }
  end

  defp shift(%{call: %Entry{}, children: kids} = tree, c) do
    %{tree | call: shift(tree.call, c), result: shift(tree.result, c), children: shift(kids, c)}
  end

  defp shift(%{tree: %{call: _} = t} = top, c), do: %{top | tree: shift(t, c)}
  defp shift(list, c) when is_list(list), do: Enum.map(list, &shift(&1, c))
  defp shift({tag, v}, c) when is_atom(tag), do: {tag, shift(v, c)}
  defp shift(other, _c), do: other

  defp remote_time(nil, _c), do: nil
  defp remote_time(t, c) when is_integer(t), do: Clock.to_remote(t, c)
  defp remote_time(t, _c), do: t

  # The node an event (or `{node, id}`) belongs to, and its id.
  defp locate!(%Entry{pid: pid, id: id}) when is_pid(pid), do: {node(pid), id}
  defp locate!(%State{pid: pid, id: id}) when is_pid(pid), do: {node(pid), id}
  defp locate!({node, id}) when is_atom(node) and is_integer(id) and id > 0, do: {node, id}

  defp locate!(other),
    do:
      raise(
        ArgumentError,
        "with nodes:, an event is an Entry (its pid names its node) or {node, id}, got: #{inspect(other)}"
      )

  defp order(entries), do: Enum.sort_by(entries, &{&1.timestamp, node_of(&1), &1.id})

  defp node_of(%{pid: pid}) when is_pid(pid), do: node(pid)
  defp node_of(_), do: nil

  # ---- queries ------------------------------------------------------------------------

  def select(ctx, opts), do: filter(ctx, nil, opts)

  def filter(ctx, pred, opts) do
    limit = Keyword.get(opts, :limit, 100_000)

    nodes =
      case Keyword.get(opts, :pid) do
        pid when is_pid(pid) -> Enum.filter(ctx.nodes, &(&1 == node(pid)))
        _ -> ctx.nodes
      end

    {by_node, missing} =
      run(ctx, nodes, fn n ->
        c = ctx.clocks[n]

        o =
          opts
          |> Keyword.replace_lazy(:from, &remote_time(&1, c))
          |> Keyword.replace_lazy(:to, &remote_time(&1, c))

        if pred, do: {:filter, [pred, o]}, else: {:select, [o]}
      end)

    by_node |> Map.values() |> List.flatten() |> order() |> Enum.take(limit) |> done(missing)
  end

  # One node's answer (the node of `ref`).
  defp on_node(ctx, ref, f, args_fun) do
    {n, id} = locate!(ref)

    unless n in ctx.nodes,
      do: raise(ArgumentError, "#{inspect(n)} is not among the nodes #{inspect(ctx.nodes)}")

    {by_node, missing} = run(ctx, [n], fn n -> {f, args_fun.(id, ctx.clocks[n])} end)
    done(Map.get(by_node, n), missing)
  end

  def get(ctx, ref, opts), do: on_node(ctx, ref, :get, fn id, _ -> [id, opts] end)
  def traceback(ctx, ref, opts), do: on_node(ctx, ref, :traceback, fn id, _ -> [id, opts] end)
  def range(ctx, ref, opts), do: on_node(ctx, ref, :range, fn id, _ -> [id, opts] end)

  # The replay's own timeout is the call's; the node's answer may take that
  # long and more.
  def replay(ctx, ref, opts),
    do: on_node(%{ctx | timeout: ctx.timeout + 5_000}, ref, :replay, fn id, _ -> [id, opts] end)

  def step(ctx, ref, opts, forward) do
    case Keyword.get(opts, :scope, :process) do
      :global -> step_global(ctx, ref, opts, forward)
      _ -> on_node(ctx, ref, if(forward, do: :next, else: :prev), fn id, _ -> [id, opts] end)
    end
  end

  # The next (previous) event of any node in corrected time.
  defp step_global(ctx, ref, opts, forward) do
    {n0, id} = locate!(ref)

    here =
      case ref do
        %Entry{} = e -> e
        _ -> unwrap(get(ctx, {n0, id}, opts))
      end

    if here == nil do
      nil
    else
      t = here.timestamp

      {by_node, missing} =
        run(ctx, ctx.nodes, fn n ->
          c = ctx.clocks[n]
          bound = if forward, do: [from: remote_time(t, c)], else: [to: remote_time(t, c)]
          {:neighbours, [bound, forward]}
        end)

      key = &{&1.timestamp, node_of(&1), &1.id}
      me = key.(here)

      candidates =
        by_node
        |> Map.values()
        |> List.flatten()
        |> Enum.filter(&if(forward, do: key.(&1) > me, else: key.(&1) < me))

      pick =
        case candidates do
          [] -> nil
          l -> if forward, do: Enum.min_by(l, key), else: Enum.max_by(l, key)
        end

      done(pick, missing)
    end
  end

  defp unwrap({:partial, v, _}), do: v
  defp unwrap(v), do: v

  def call_stat(ctx, opts) do
    {by_node, missing} = run(ctx, ctx.nodes, fn _ -> {:call_stat, [opts]} end)

    by_node
    |> Map.values()
    |> List.flatten()
    |> Enum.group_by(& &1.key)
    |> Enum.map(fn {key, rows} ->
      %{
        key: key,
        count: Enum.sum(Enum.map(rows, & &1.count)),
        acc_ns: Enum.sum(Enum.map(rows, & &1.acc_ns)),
        own_ns: Enum.sum(Enum.map(rows, & &1.own_ns))
      }
    end)
    |> Enum.sort_by(&{-&1.acc_ns, &1.key})
    |> done(missing)
  end

  def top_call_trees(ctx, opts) do
    max = Keyword.get(opts, :max, 10)
    # Each node's candidates (a tree repeating once on each of two nodes
    # repeats in the cluster): ask with min_count 1, filter after merging.
    min_count = Keyword.get(opts, :min_count, 2)
    o = Keyword.merge(opts, min_count: 1, max: max * 4)
    {by_node, missing} = run(ctx, ctx.nodes, fn _ -> {:top_call_trees, [o]} end)

    by_node
    |> Map.values()
    |> List.flatten()
    |> Enum.group_by(&tree_key(&1.tree))
    |> Enum.map(fn {_, [first | _] = tops} ->
      first = Enum.min_by(tops, & &1.tree.call.timestamp, fn -> first end)

      %{
        first
        | count: Enum.sum(Enum.map(tops, & &1.count)),
          total_ns: Enum.sum(Enum.map(tops, & &1.total_ns))
      }
    end)
    |> Enum.filter(&(&1.count >= min_count))
    |> Enum.sort_by(&(-&1.total_ns))
    |> Enum.take(max)
    |> done(missing)
  end

  defp tree_key(%{call: c, result: r, children: kids}) do
    {c.module, c.function, c.arity, c.data, r && {r.type, r.data},
     for(%{call: _} = k <- kids, do: tree_key(k))}
  end

  def state_at(ctx, pid, time, opts) do
    on_pid(ctx, pid, :state_at, fn c -> [pid, remote_time(time, c), opts] end)
  end

  def state_history(ctx, pid, opts) do
    on_pid(ctx, pid, :state_history, fn c ->
      o =
        opts
        |> Keyword.replace_lazy(:from, &remote_time(&1, c))
        |> Keyword.replace_lazy(:to, &remote_time(&1, c))

      [pid, o]
    end)
  end

  defp on_pid(ctx, pid, f, args) do
    n = node(pid)

    unless n in ctx.nodes,
      do:
        raise(
          ArgumentError,
          "#{inspect(pid)} is on #{n}, not among the nodes #{inspect(ctx.nodes)}"
        )

    {by_node, missing} = run(ctx, [n], fn n -> {f, args.(ctx.clocks[n])} end)
    done(Map.get(by_node, n), missing)
  end

  def state_processes(ctx, opts) do
    {by_node, missing} = run(ctx, ctx.nodes, fn _ -> {:state_processes, [opts]} end)
    by_node |> Map.values() |> List.flatten() |> done(missing)
  end

  # ---- messages across nodes ---------------------------------------------------------------

  def messages(ctx, opts) do
    limit = Keyword.get(opts, :limit, 10_000)
    {by_node, missing} = run(ctx, ctx.nodes, fn _ -> {:messages, [opts]} end)
    rows = by_node |> Map.values() |> List.flatten()
    {rows, missing} = link_rows(ctx, rows, missing)

    rows
    |> Enum.sort_by(&{&1.sent_at, node_of(&1.send), &1.send.id})
    |> Enum.take(limit)
    |> done(missing)
  end

  # Rows of sends to other nodes get their receive there.
  defp link_rows(ctx, rows, missing) do
    remote =
      for r <- rows, r.receive == nil, dest_node(r.send) not in [nil, node_of(r.send)], do: r

    dests = remote |> Enum.map(&dest_node(&1.send)) |> Enum.uniq()
    known = Enum.filter(dests, &(&1 in ctx.nodes))
    {receives, missing2} = unexplained_receives(ctx, known)
    links = match(Enum.map(remote, & &1.send), receives, ctx)

    rows =
      Enum.map(rows, fn r ->
        case Map.get(links, {node_of(r.send), r.send.id}) do
          {recv, conf} ->
            %{r | receive: recv, received_at: recv.timestamp} |> Map.put(:confidence, conf)

          nil ->
            Map.put(r, :confidence, if(r.receive, do: 1.0, else: nil))
        end
      end)

    {rows, Map.merge(missing, missing2)}
  end

  # The receives of `nodes` that no send of their own node explains.
  defp unexplained_receives(_ctx, []), do: {%{}, %{}}

  defp unexplained_receives(ctx, nodes) do
    run(ctx, nodes, fn _ -> {:unexplained_receives, [100_000]} end)
  end

  @doc false
  # `%{{send_node, send_id} => {receive, confidence}}`: each send matched
  # with the oldest receive on its receiver's node (its receiver when known)
  # with equal contents, no earlier than the send less both clocks' error.
  def match(sends, receives_by_node, ctx) do
    sends = Enum.sort_by(sends, &{&1.timestamp, node_of(&1), &1.id})

    counts = Enum.frequencies_by(sends, fn s -> {dest_node(s), receiver(s), content(s.data)} end)

    {links, _used} =
      Enum.reduce(sends, {%{}, MapSet.new()}, fn s, {links, used} ->
        d = dest_node(s)
        to = receiver(s)
        key = content(s.data)

        slack =
          (Clock.bound_ns(ctx.clocks[node_of(s)]) || 0) + (Clock.bound_ns(ctx.clocks[d]) || 0)

        found =
          receives_by_node
          |> Map.get(d, [])
          |> Enum.find(fn r ->
            not MapSet.member?(used, {d, r.id}) and (to == nil or r.pid == to) and
              content(r.data) == key and r.timestamp >= s.timestamp - slack
          end)

        case found do
          nil ->
            {links, used}

          r ->
            n = Map.get(counts, {d, to, key}, 1)
            conf = if key == nil, do: 0.5 / n, else: 1.0 / n
            {Map.put(links, {node_of(s), s.id}, {r, conf}), MapSet.put(used, {d, r.id})}
        end
      end)

    links
  end

  defp content(nil), do: nil
  defp content(data), do: {:c, data}

  defp dest_node(%Entry{peer: p}) when is_pid(p) or is_reference(p) or is_port(p), do: node(p)
  defp dest_node(%Entry{peer: {name, n}}) when is_atom(name) and is_atom(n), do: n
  defp dest_node(_), do: nil

  defp receiver(%Entry{peer: p}) when is_pid(p), do: p
  defp receiver(_), do: nil

  # ---- call trees and causes across nodes ------------------------------------------------------

  def call_tree(ctx, ref, opts) do
    case on_node(ctx, ref, :call_tree, fn id, _ -> [id, opts] end) do
      {:partial, v, missing} -> {:partial, v, missing}
      nil -> nil
      tree -> expand(ctx, tree, 8) |> then(fn {t, missing} -> done(t, missing) end)
    end
  end

  # Sends to other nodes that triggered an OTP callback there: that
  # callback's tree follows the send, with `node:` and `via:`.
  defp expand(_ctx, tree, 0), do: {tree, %{}}

  defp expand(ctx, %{children: kids} = tree, depth) do
    {kids, missing} =
      Enum.flat_map_reduce(kids, %{}, fn
        %{call: _} = sub, miss ->
          {t, m} = expand(ctx, sub, depth)
          {[t], Map.merge(miss, m)}

        %Entry{type: :send} = s, miss ->
          case follow(ctx, s) do
            {:ok, sub} ->
              {t, m} = expand(ctx, sub, depth - 1)
              {[s, t], Map.merge(miss, m)}

            {:missing, m} ->
              {[s], Map.merge(miss, m)}

            :none ->
              {[s], miss}
          end

        other, miss ->
          {[other], miss}
      end)

    {%{tree | children: kids}, missing}
  end

  defp follow(ctx, %Entry{} = s) do
    d = dest_node(s)

    cond do
      d == nil or d == node_of(s) ->
        :none

      d not in ctx.nodes ->
        :none

      true ->
        {recvs, missing} = run(ctx, [d], fn _ -> {:receives_like, [s.data, 1000]} end)

        case Map.get(recvs, d) do
          nil ->
            {:missing, missing}

          list ->
            c = %{ctx | clocks: ctx.clocks}

            case match([s], %{d => list}, c) |> Map.values() do
              [{r, conf}] -> callback_tree(ctx, d, s, r, conf)
              [] -> :none
            end
        end
    end
  end

  defp callback_tree(ctx, d, s, r, conf) do
    {res, missing} = run(ctx, [d], fn _ -> {:callback_tree, [r.id]} end)

    case Map.get(res, d) do
      %{call: _} = t ->
        {:ok, Map.merge(t, %{node: d, via: %{send: s, receive: r, confidence: conf}})}

      nil when missing != %{} ->
        {:missing, missing}

      _ ->
        :none
    end
  end

  def why(ctx, ref, opts) do
    case on_node(ctx, ref, :why, fn id, _ -> [id, opts] end) do
      {:partial, v, m} -> {:partial, v, m}
      nil -> nil
      chain -> continue_why(ctx, chain, 8)
    end
  end

  # A chain that ends at a receive no local send explains continues at
  # the send on another node.
  defp continue_why(_ctx, chain, 0), do: chain

  defp continue_why(ctx, chain, depth) do
    case List.last(chain) do
      {:received, %Entry{type: :receive, link_id: nil} = r} ->
        others = ctx.nodes -- [node_of(r)]
        {sends, missing} = run(ctx, others, fn _ -> {:sends_like, [r.data, node_of(r), 1000]} end)
        candidates = sends |> Map.values() |> List.flatten()
        d = node_of(r)

        hit =
          candidates
          |> Enum.filter(fn s ->
            slack =
              (Clock.bound_ns(ctx.clocks[node_of(s)]) || 0) + (Clock.bound_ns(ctx.clocks[d]) || 0)

            s.timestamp <= r.timestamp + slack and receiver(s) in [nil, r.pid]
          end)
          |> Enum.max_by(&{&1.timestamp, &1.id}, fn -> nil end)

        case hit do
          nil ->
            done(chain, missing)

          s ->
            case on_node(ctx, s, :why, fn id, _ -> [id, []] end) do
              [{_, _} | rest] ->
                continue_why(ctx, chain ++ [{:sent, s} | rest], depth - 1)
                |> with_missing(missing)

              _ ->
                done(chain ++ [{:sent, s}], missing)
            end
        end

      _ ->
        chain
    end
  end

  defp with_missing(v, m) when m == %{}, do: v
  defp with_missing({:partial, v, m0}, m), do: {:partial, v, Map.merge(m0, m)}
  defp with_missing(v, m), do: {:partial, v, m}
end

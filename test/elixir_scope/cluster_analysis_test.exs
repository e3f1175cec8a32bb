defmodule ElixirScope.ClusterAnalysisTest do
  # ElixirScope.Analysis over a 3-node cluster trace (this VM and two
  # peers on loopback): a client here calls a server on b, which calls a
  # worker on c. Not async: the VM is distributed only while this runs.
  use ExUnit.Case, async: false

  alias ElixirScope.Analysis
  alias ElixirScope.Analysis.Entry
  alias ElixirScope.ClusterApp.{Client, Server, Worker}
  alias ElixirScope.ClusterHelpers, as: H

  @moduletag :distributed
  @moduletag timeout: 180_000

  case H.distribution_available() do
    :ok -> :ok
    {:error, why} -> @moduletag skip: "this machine cannot run Erlang distribution: #{why}"
  end

  setup_all do
    [{_, b}, {_, c}] = H.start_cluster!(["b", "c"])
    {:ok, w} = :erpc.call(c, Worker, :start, [])
    {:ok, s} = :erpc.call(b, Server, :start, [w])
    nodes = [node(), b, c]
    # The client: a process of its own here, calling the server 3 times.
    task =
      Task.async(fn ->
        receive do
          :go -> for x <- [21, 22, 23], do: Client.run(s, x)
        end
      end)

    # The app's three processes only (each node traces its own).
    {:ok, info} =
      ElixirScope.trace([Client, Server, Worker], nodes: nodes, pids: [task.pid, s, w])

    send(task.pid, :go)
    results = Task.await(task, 120_000)
    {:ok, summary} = ElixirScope.stop_trace()

    %{
      b: b,
      c: c,
      s: s,
      w: w,
      client: task.pid,
      nodes: nodes,
      info: info,
      summary: summary,
      results: results
    }
  end

  defp calls_of(tree, depth \\ 0) do
    [
      {depth, node(tree.call.pid), {tree.call.module, tree.call.function, tree.call.arity}}
      | Enum.flat_map(tree.children, fn
          %{call: _} = t -> calls_of(t, depth + 1)
          _ -> []
        end)
    ]
  end

  test "the app ran and every node traced", ctx do
    assert ctx.results == [{:ok, 42}, {:ok, 44}, {:ok, 46}]
    assert ctx.summary.totals.unavailable == []
    assert ctx.summary.missing == %{}

    for n <- ctx.nodes do
      st = ctx.summary.nodes[n]
      assert st.reason == :stopped and st.traced > 0, "#{n}: #{inspect(st)}"
    end
  end

  test "select merges the nodes' events by corrected time", ctx do
    calls = Analysis.select(types: [:call], limit: 1_000)
    assert is_list(calls)

    ours =
      Enum.filter(
        calls,
        &(&1.function in [:run, :handle_call] and &1.module in [Client, Server, Worker])
      )

    # Each node's events in their order, all nodes' in corrected time (how
    # they interleave is only known within the clocks' error bounds).
    assert Enum.frequencies_by(ours, &{node(&1.pid), &1.module, &1.function}) == %{
             {node(), Client, :run} => 3,
             {ctx.b, Server, :handle_call} => 3,
             {ctx.c, Worker, :handle_call} => 3
           }

    for n <- ctx.nodes do
      mine = Enum.filter(ours, &(node(&1.pid) == n))
      assert Enum.map(mine, & &1.data) |> Enum.map(&hd/1) |> length() == 3
      assert Enum.map(mine, & &1.id) == Enum.sort(Enum.map(mine, & &1.id))
    end

    bound = fn n -> ElixirScope.Cluster.Clock.bound_ns(ElixirScope.Cluster.last().clocks[n]) end
    [first_run | _] = Enum.filter(ours, &(&1.module == Client))
    [first_work | _] = Enum.filter(ours, &(&1.module == Worker))
    # The first run started before the first work it caused.
    assert first_run.timestamp <= first_work.timestamp + bound.(node()) + bound.(ctx.c)

    ts = Enum.map(calls, & &1.timestamp)
    assert ts == Enum.sort(ts)
    # One node: the same as asking it alone.
    on_c = Analysis.select(types: [:call], nodes: [ctx.c])

    assert Enum.map(on_c, & &1.id) ==
             Enum.map(
               :erpc.call(ctx.c, Analysis, :select, [[types: [:call], nodes: nil]]),
               & &1.id
             )

    # pid: asks the pid's node only.
    assert [_ | _] = by_w = Analysis.select(pid: ctx.w)
    assert Enum.all?(by_w, &(&1.pid == ctx.w))
    # limit holds over the merge.
    assert length(Analysis.select(limit: 5)) == 5
  end

  test "the exact cross-node call tree", ctx do
    [run | _] = Analysis.select(module: Client, function: :run, types: [:call])
    tree = Analysis.call_tree(run)

    assert calls_of(tree) == [
             {0, node(), {Client, :run, 2}},
             {1, node(), {Server, :ask, 2}},
             {2, ctx.b, {Server, :handle_call, 3}},
             {3, ctx.b, {Worker, :work, 2}},
             {4, ctx.c, {Worker, :handle_call, 3}},
             {5, ctx.c, {Worker, :double, 1}}
           ]

    ask = hd(tree.children)
    [send, remote | _] = ask.children
    assert %Entry{type: :send, peer: s} = send
    assert s == ctx.s
    assert remote.node == ctx.b
    assert remote.via.send == send and remote.via.confidence == 1.0
    assert remote.via.receive.pid == ctx.s
    assert {:"$gen_call", _, {:ask, 21}} = remote.via.receive.data
    assert remote.result.data == {:reply, {:ok, 42}, ctx.w}
    # The client's receive of the reply closes Server.ask.
    assert %Entry{type: :receive, data: {_, {:ok, 42}}} = List.last(ask.children)
    assert ask.result.data == {:ok, 42}
    # Corrected times are consistent: each send before its receive (within
    # the clocks' error bounds).
    err = fn n -> ElixirScope.Cluster.Clock.bound_ns(ElixirScope.Cluster.last().clocks[n]) end
    assert send.timestamp <= remote.via.receive.timestamp + err.(node()) + err.(ctx.b)
  end

  test "every message between the app's processes is linked across nodes", ctx do
    rows = Analysis.messages()
    assert is_list(rows)
    pids = [ctx.client, ctx.s, ctx.w]

    app =
      Enum.filter(rows, fn r ->
        (r.from in pids and
           match?({:"$gen_call", _, _}, r.message)) or
          (r.from in [ctx.s, ctx.w] and match?({[:alias | _], _}, r.message))
      end)

    # 3 runs × (request + reply) × 2 hops.
    assert length(app) == 12

    for r <- app do
      assert %Entry{type: :receive} = r.receive, "unlinked: #{inspect(r.message)}"
      assert r.confidence == 1.0
      assert r.receive.data == r.message
      assert node(r.receive.pid) != node(r.send.pid)
    end

    requests = for r <- app, match?({:"$gen_call", _, _}, r.message), do: {r.from, r.receive.pid}

    assert Enum.frequencies(requests) == %{{ctx.client, ctx.s} => 3, {ctx.s, ctx.w} => 3}
    sent = Enum.map(rows, & &1.sent_at)
    assert sent == Enum.sort(sent)
  end

  test "why continues across nodes, back to the client's call", ctx do
    [_snapshot, st | _] = Analysis.state_history(ctx.w)
    assert st.state == 1
    chain = Analysis.why(st)
    roles = Enum.map(chain, fn {role, e} -> {role, node(e.pid)} end)
    b = ctx.b
    c = ctx.c
    me = node()

    assert [{:state, ^c}, {:callback, ^c}, {:received, ^c}, {:sent, ^b} | rest] = roles
    assert {:sent, me} in rest
    assert List.last(roles) == {:call, me}
    {:call, first} = List.last(chain)
    assert {first.module, first.function} == {Client, :run}
    assert {:received, b} in rest
  end

  test "call_stat and top_call_trees add up the nodes", ctx do
    stats = Analysis.call_stat()
    by = Map.new(stats, &{&1.key, &1.count})
    assert by[{Client, :run, 2}] == 3
    assert by[{Server, :handle_call, 3}] == 3
    assert by[{Worker, :handle_call, 3}] == 3
    assert by[{Worker, :double, 1}] == 3

    per_node =
      for n <- ctx.nodes,
          row <- :erpc.call(n, Analysis, :call_stat, [[nodes: nil]]),
          reduce: %{} do
        acc -> Map.update(acc, row.key, row.acc_ns, &(&1 + row.acc_ns))
      end

    assert Map.new(stats, &{&1.key, &1.acc_ns}) == per_node
    assert is_list(Analysis.top_call_trees())
  end

  test "state queries go to the pid's node, times on this node's clock", ctx do
    history = Analysis.state_history(ctx.w)
    assert Enum.map(history, & &1.state) == [0, 1, 2, 3]
    last = List.last(history)
    assert {:ok, %{state: 3}} = Analysis.state_at(ctx.w, last.timestamp)
    assert {:ok, %{state: 2}} = Analysis.state_at(ctx.w, last.timestamp - 1)

    assert [{pid, _}] =
             Analysis.state_processes(nodes: [ctx.c]) |> Enum.filter(&(elem(&1, 0) == ctx.w))

    assert pid == ctx.w
  end

  test "navigation over the cluster", _ctx do
    [run | _] = Analysis.select(module: Client, function: :run, types: [:call])
    assert %Entry{} = nxt = Analysis.next(run)
    assert nxt.pid == run.pid
    assert %Entry{} = g = Analysis.next(run, scope: :global)
    assert g.timestamp >= run.timestamp
    assert Analysis.prev(g, scope: :global).timestamp <= g.timestamp
    assert [%Entry{} | _] = Analysis.traceback(nxt)
    assert %Entry{id: id} = Analysis.get({node(), run.id})
    assert id == run.id

    assert_raise ArgumentError, ~r/with nodes:, an event is an Entry/, fn ->
      Analysis.get(run.id)
    end
  end

  test "bad node lists" do
    assert_raise ArgumentError, ~r/duplicate nodes/, fn ->
      Analysis.select(nodes: [node(), node()])
    end

    assert_raise ArgumentError, ~r/nodes must be/, fn -> Analysis.select(nodes: []) end
    assert_raise ArgumentError, ~r/timeout/, fn -> Analysis.select(timeout: 0) end
  end
end

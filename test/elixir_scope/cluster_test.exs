defmodule ElixirScope.ClusterTest do
  # Cluster traces over real Erlang distribution: this VM becomes a node
  # on 127.0.0.1 (epmd started here) and peer nodes run with `:peer`. Not
  # async: the VM is distributed only while this module runs.
  use ExUnit.Case, async: false

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
    %{b: b, c: c}
  end

  setup do
    on_exit(fn ->
      if ElixirScope.Cluster.active?(), do: ElixirScope.stop_trace()
    end)

    :ok
  end

  # Worker on c, server on b, the client runs here.
  defp start_app(b, c) do
    {:ok, w} = :erpc.call(c, Worker, :start, [])
    {:ok, s} = :erpc.call(b, Server, :start, [w])

    on_exit(fn ->
      for {n, pid} <- [{c, w}, {b, s}] do
        try do
          :erpc.call(n, Process, :exit, [pid, :kill])
        catch
          _, _ -> :ok
        end
      end
    end)

    {s, w}
  end

  describe "start and stop across nodes" do
    test "every node records locally; stop returns per-node counters and totals", %{b: b, c: c} do
      nodes = [node(), b, c]
      {s, _w} = start_app(b, c)
      assert {:ok, info} = ElixirScope.trace([Client, Server, Worker], nodes: nodes)
      assert Map.keys(info.nodes) |> Enum.sort() == Enum.sort(nodes)
      assert info.missing == %{}

      for n <- nodes do
        assert %{offset_ns: _, error_ns: e, rtt_ns: rtt} = info.clocks[n]
        assert e >= 0 and rtt >= 0
      end

      assert info.clocks[node()].offset_ns == 0

      for x <- 1..5, do: assert({:ok, 2 * x} == Client.run(s, x))

      assert ElixirScope.trace_status().state == :tracing
      assert {:ok, summary} = ElixirScope.stop_trace()
      assert summary.state == :stopped
      assert Map.keys(summary.nodes) |> Enum.sort() == Enum.sort(nodes)

      for n <- nodes do
        st = summary.nodes[n]
        assert st.node == n and st.state == :stopped and st.reason == :stopped
        assert st.offered == st.traced + st.dropped + st.shed + st.over_limit
      end

      for k <- [:traced, :dropped, :shed, :over_limit, :offered] do
        assert summary.totals[k] == Enum.sum(for n <- nodes, do: summary.nodes[n][k])
      end

      assert summary.totals.unavailable == []

      # Each node's events are in its own store: the calls of each node's
      # part of the app, counted where they ran.
      calls = fn n, m ->
        :erpc.call(n, ElixirScope.Analysis, :select, [[module: m, types: [:call], nodes: nil]])
        |> Enum.filter(&(&1.function in [:run, :handle_call]))
        |> length()
      end

      assert calls.(node(), Client) == 5
      assert calls.(b, Server) == 5
      assert calls.(c, Worker) == 5
      assert calls.(node(), Server) == 0
      assert calls.(b, Worker) == 0

      # Every tracer's flags are off again.
      for n <- nodes, do: assert(:erpc.call(n, ElixirScope.Tracer, :status, []).state == :stopped)
      assert ElixirScope.stop_trace() == {:error, :not_tracing}
    end

    test "clock offsets: the estimate's interval holds the true offset", %{b: b, c: c} do
      {:ok, info} = ElixirScope.trace(Client, nodes: [b, c], events: [:calls])
      {:ok, summary} = ElixirScope.stop_trace()

      for n <- [b, c] do
        # An independent bracket: the node's clock read between t0 and t1
        # here puts its offset within [r - t1, r - t0].
        brackets =
          for _ <- 1..5 do
            t0 = ElixirScope.Utils.monotonic_timestamp()
            r = :erpc.call(n, ElixirScope.Utils, :monotonic_timestamp, [])
            t1 = ElixirScope.Utils.monotonic_timestamp()
            {r - t1, r - t0}
          end

        lo = brackets |> Enum.map(&elem(&1, 0)) |> Enum.max()
        hi = brackets |> Enum.map(&elem(&1, 1)) |> Enum.min()

        for sample <- [info.clocks[n], summary.clocks[n].start, summary.clocks[n].stop] do
          assert sample.offset_ns - sample.error_ns <= hi
          assert sample.offset_ns + sample.error_ns >= lo
          assert sample.samples == 16
        end

        assert summary.clocks[n].error_ns ==
                 min(summary.clocks[n].start.error_ns, summary.clocks[n].stop.error_ns)
      end
    end

    test "a limit that trips on one node stops that node only, reported with the node",
         %{b: b, c: c} do
      {:ok, _} =
        ElixirScope.trace({Client, :spin, 1},
          nodes: [node(), b, c],
          max_events: 100,
          events: [:calls]
        )

      :erpc.call(b, Client, :spin, [1_000])

      status =
        H.eventually(fn ->
          st = ElixirScope.trace_status()
          st.trips[b] && st
        end)

      assert status.trips == %{b => :max_events}
      assert status.nodes[b].state == :stopped and status.nodes[b].reason == :max_events
      assert status.nodes[b].traced == 100
      assert status.nodes[c].state == :tracing
      assert status.nodes[node()].state == :tracing

      Client.spin(10)
      {:ok, summary} = ElixirScope.stop_trace()
      assert summary.trips == %{b => :max_events}
      assert summary.nodes[b].reason == :max_events
      assert summary.nodes[node()].reason == :stopped and summary.nodes[node()].traced == 11
      assert summary.nodes[c].traced == 0
      assert summary.totals.traced == 111
    end
  end

  describe "faults" do
    test "a node killed mid-trace: the others keep tracing, its events are unavailable",
         %{b: b} do
      {peer, d} = H.start_peer("killed")
      {:ok, _} = ElixirScope.trace({Client, :spin, 1}, nodes: [node(), b, d], events: [:calls])
      :erpc.call(d, Client, :spin, [10])
      Process.unlink(peer)
      H.stop_peer(peer)

      H.eventually(fn -> ElixirScope.Cluster.last().down[d] end)
      status = ElixirScope.trace_status()
      assert status.down == %{d => :nodedown}
      assert %{state: :down, events: :unavailable} = status.nodes[d]
      assert status.nodes[b].state == :tracing

      :erpc.call(b, Client, :spin, [5])

      # The node comes back (same name): it is not traced again.
      [name, _host] = d |> Atom.to_string() |> String.split("@")
      {peer2, ^d} = H.start_peer("back", name: String.to_atom(name))
      on_exit(fn -> H.stop_peer(peer2) end)
      assert :erpc.call(d, ElixirScope.Tracer, :status, []) == %{state: :idle}
      :erpc.call(d, Client, :spin, [5])
      assert ElixirScope.trace_status().nodes[d].state == :down

      {:ok, summary} = ElixirScope.stop_trace()
      assert summary.nodes[d].events == :unavailable
      assert summary.nodes[b].traced == 6
      assert summary.totals.unavailable == [d]
      assert summary.totals.traced == summary.nodes[b].traced + summary.nodes[node()].traced
    end

    test "a node missing the library: the others trace, or with on_missing: :abort none", %{b: b} do
      {peer, bare} = H.start_peer("bare", with_library: false)
      on_exit(fn -> H.stop_peer(peer) end)

      {:ok, info} = ElixirScope.trace(Client, nodes: [node(), b, bare], events: [:calls])
      assert info.missing == %{bare => :library_missing}
      assert Map.keys(info.nodes) |> Enum.sort() == Enum.sort([node(), b])
      {:ok, summary} = ElixirScope.stop_trace()
      assert summary.missing == %{bare => :library_missing}
      refute Map.has_key?(summary.nodes, bare)

      assert {:error, {:nodes_failed, [{^bare, :library_missing}]}} =
               ElixirScope.trace(Client,
                 nodes: [node(), b, bare],
                 events: [:calls],
                 on_missing: :abort
               )

      refute ElixirScope.Cluster.active?()
      assert :erpc.call(b, ElixirScope.Tracer, :status, []).state != :tracing
    end

    test "a node whose tracer refuses is reported with its reason", %{b: b} do
      # Tracing already on b (its own single-node trace).
      {:ok, _} = :erpc.call(b, ElixirScope, :trace, [Client, [events: [:calls]]])

      try do
        {:ok, info} = ElixirScope.trace(Client, nodes: [node(), b], events: [:calls])
        assert info.missing == %{b => :already_tracing}
        {:ok, _} = ElixirScope.stop_trace()

        assert {:error, {:nodes_failed, [{^b, :already_tracing}]}} =
                 ElixirScope.trace(Client, nodes: [node(), b], on_missing: :abort)

        assert ElixirScope.Tracer.status().state == :stopped
      after
        :erpc.call(b, ElixirScope, :stop_trace, [])
      end
    end

    test "a node cut off during stop_trace: the reachable ones are stopped, it stops itself",
         %{b: b} do
      {peer, d} = H.start_peer("split")
      on_exit(fn -> H.stop_peer(peer) end)

      {:ok, _} =
        ElixirScope.trace({Client, :spin, 1},
          nodes: [node(), b, d],
          events: [:calls],
          timeout: 2_000,
          duration: 10_000
        )

      os_pid = :erpc.call(d, :os, :getpid, []) |> List.to_string()
      {_, 0} = System.cmd("kill", ["-STOP", os_pid])

      H.eventually(fn ->
        {stat, 0} = System.cmd("ps", ["-o", "stat=", "-p", os_pid])
        String.starts_with?(stat, "T")
      end)

      {:ok, summary} =
        try do
          ElixirScope.stop_trace()
        after
          System.cmd("kill", ["-CONT", os_pid])
        end

      assert %{state: :down, events: :unavailable} = summary.nodes[d]
      assert summary.totals.unavailable == [d]

      # The reachable nodes' flags are off at once.
      for n <- [node(), b] do
        assert summary.nodes[n].state == :stopped
        pid = :erpc.call(n, Process, :whereis, [:erl_prim_loader])
        assert :erpc.call(n, :erlang, :trace_info, [pid, :flags]) == {:flags, []}
      end

      # The cut-off node stops by itself (the stop that reached it late, or
      # its duration limit), its flags off.
      H.eventually(
        fn -> :erpc.call(d, ElixirScope.Tracer, :status, []).state == :stopped end,
        30_000
      )

      pid = :erpc.call(d, Process, :whereis, [:erl_prim_loader])
      assert :erpc.call(d, :erlang, :trace_info, [pid, :flags]) == {:flags, []}
    end

    test "the coordinator gone: a node stops its own trace (no flags left on)", %{c: c} do
      # A node coordinates a trace of itself and c, then goes down.
      {peer, e} = H.start_peer("coordinator")
      true = :erpc.call(e, Node, :connect, [c])

      {:ok, _} =
        :erpc.call(e, ElixirScope, :trace, [{Client, :spin, 1}, [nodes: [e, c], events: [:calls]]])

      assert :erpc.call(c, ElixirScope.Tracer, :status, []).state == :tracing
      Process.unlink(peer)
      H.stop_peer(peer)

      st =
        H.eventually(fn ->
          st = :erpc.call(c, ElixirScope.Tracer, :status, [])
          st.state == :stopped && st
        end)

      assert st.reason == :owner_down
      # c's processes carry no trace flags any more.
      pid = :erpc.call(c, Process, :whereis, [:erl_prim_loader])
      assert :erpc.call(c, :erlang, :trace_info, [pid, :flags]) == {:flags, []}
      :erpc.call(c, Client, :spin, [3])
      assert :erpc.call(c, ElixirScope.Tracer, :status, []).traced == 0
    end
  end

  describe "queries with a node unreachable" do
    test "a slow node gives a partial result within timeout:, a down node too", _ctx do
      {peer, d} = H.start_peer("slow")
      {:ok, _} = ElixirScope.trace({Client, :spin, 1}, nodes: [node(), d], events: [:calls])
      :erpc.call(d, Client, :spin, [3])
      Client.spin(2)
      {:ok, _} = ElixirScope.stop_trace()
      assert length(ElixirScope.Analysis.select()) == 7

      os_pid = :erpc.call(d, :os, :getpid, [])
      {_, 0} = System.cmd("kill", ["-STOP", List.to_string(os_pid)])

      H.eventually(fn ->
        {stat, 0} = System.cmd("ps", ["-o", "stat=", "-p", List.to_string(os_pid)])
        String.starts_with?(stat, "T")
      end)

      try do
        assert {:partial, rows, %{^d => :timeout}} = ElixirScope.Analysis.select(timeout: 300)
        assert length(rows) == 3 and Enum.all?(rows, &(node(&1.pid) == node()))
        assert {:partial, _, %{^d => :timeout}} = ElixirScope.Analysis.call_stat(timeout: 300)
      after
        System.cmd("kill", ["-CONT", List.to_string(os_pid)])
      end

      assert length(ElixirScope.Analysis.select()) == 7
      Process.unlink(peer)
      H.stop_peer(peer)
      H.eventually(fn -> d not in Node.list() end)
      assert {:partial, rows, %{^d => :nodedown}} = ElixirScope.Analysis.select(timeout: 1_000)
      assert length(rows) == 3
    end
  end

  describe "late starts" do
    test "a start the coordinator gave up on is stopped by its owner only", %{b: b} do
      owner = spawn(fn -> Process.sleep(:infinity) end)
      other = spawn(fn -> Process.sleep(:infinity) end)

      {:ok, _} =
        :erpc.call(b, ElixirScope.Cluster.Remote, :start, [Client, [events: [:calls]], owner])

      assert :erpc.call(b, ElixirScope.Cluster.Remote, :stop_owned, [other]) ==
               {:error, :not_tracing}

      assert :erpc.call(b, ElixirScope.Tracer, :status, []).state == :tracing
      assert {:ok, _} = :erpc.call(b, ElixirScope.Cluster.Remote, :stop_owned, [owner])
      assert :erpc.call(b, ElixirScope.Tracer, :status, []).state == :stopped
    end
  end

  describe "bad input" do
    test "unknown, unconnected and duplicate nodes" do
      assert_raise ArgumentError, ~r/unknown node :nohost/, fn ->
        ElixirScope.trace(Client, nodes: [:nohost])
      end

      assert_raise ArgumentError, ~r/duplicate nodes/, fn ->
        ElixirScope.trace(Client, nodes: [node(), node()])
      end

      assert_raise ArgumentError, ~r/nodes must be a non-empty list/, fn ->
        ElixirScope.trace(Client, nodes: [])
      end

      # nodes: nil is this node only.
      assert {:ok, _} = ElixirScope.trace(Client, nodes: nil, events: [:calls])
      refute ElixirScope.Cluster.active?()
      assert {:ok, %{state: :stopped}} = ElixirScope.stop_trace()

      assert_raise ArgumentError, ~r/on_missing/, fn ->
        ElixirScope.trace(Client, nodes: [node()], on_missing: :maybe)
      end

      assert ElixirScope.trace(Client, nodes: [node(), :"nobody@127.0.0.1"]) ==
               {:error, {:not_connected, [:"nobody@127.0.0.1"]}}

      refute ElixirScope.Cluster.active?()
    end

    test "a cluster trace while one runs", %{b: b} do
      {:ok, _} = ElixirScope.trace(Client, nodes: [node(), b], events: [:calls])
      assert ElixirScope.trace(Client, nodes: [b]) == {:error, :already_tracing}
      {:ok, _} = ElixirScope.stop_trace()
    end
  end
end

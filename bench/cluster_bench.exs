# Cluster traces (ElixirScope.trace/2 with nodes:) beside single-node ones,
# in the same run, on three nodes of this machine (this VM and two peers on
# loopback, OTP's :peer; epmd started here).
#
#   mix run bench/cluster_bench.exs   # CLUSTER_BENCH_N=200000 BENCH_SAMPLES=5
#                                     # CLUSTER_BENCH_EVENTS=1500000
#
# 1. Per-event trace cost on each node: ClusterBench.Work.loop(n) (n local
#    calls of step/1, traced with returns: 2n events) timed inside the node
#    that runs it, (a) untraced, (b) under a single-node trace of that node,
#    (c) under a cluster trace of all three nodes (each node's workload run
#    in turn). ns per event; samples interleaved; medians.
# 2. call_stat over a cluster trace of CLUSTER_BENCH_EVENTS events (a third
#    on each node) beside call_stat over a single-node trace of the same
#    number of events on this node.
# 3. A merged select of 1,000 events (limit: 1000) over the three nodes,
#    beside the same select on this node's store alone.
Code.require_file("support/harness.exs", __DIR__)

{:module, _, work_bin, _} =
  defmodule ClusterBench.Work do
    @moduledoc false
    def loop(n), do: loop(n, 0)
    def loop(0, acc), do: acc
    def loop(n, acc), do: loop(n - 1, step(acc))
    def step(x), do: x + 1

    # The loop's wall time inside this node, ns.
    def timed(n) do
      t0 = System.monotonic_time(:nanosecond)
      loop(n)
      System.monotonic_time(:nanosecond) - t0
    end
  end

defmodule ClusterBench do
  @moduledoc false
  alias ElixirScope.Analysis
  alias ElixirScope.Bench.Harness
  alias ClusterBench.Work

  @target {Work, :step, 1}
  @opts [events: [:calls, :returns], max_rate: 1_000_000_000, duration: 600_000]

  def run(work_bin) do
    {_, 0} = System.cmd("epmd", ["-daemon"], stderr_to_stdout: true)
    {:ok, _} = :net_kernel.start([:"cluster_bench_#{:os.getpid()}@127.0.0.1", :longnames])
    {:ok, _} = Application.ensure_all_started(:elixir_scope)
    nodes = [node() | Enum.map(["b", "c"], &peer(&1, work_bin))]
    n = Harness.env_int("CLUSTER_BENCH_N", 200_000)
    samples = Harness.env_int("BENCH_SAMPLES", 5)
    total = Harness.env_int("CLUSTER_BENCH_EVENTS", 1_500_000)

    IO.puts("# Cluster traces: #{Harness.machine()}")

    IO.puts(
      "nodes: #{inspect(nodes)}; n = #{n} calls (#{2 * n} events) per sample, #{samples} samples"
    )

    IO.puts("load: #{String.trim(elem(System.cmd("uptime", []), 0))}")

    per_event(nodes, n, samples)
    queries(nodes, total, samples)
    Enum.each(tl(nodes), &:erpc.call(&1, :init, :stop, []))
  end

  defp per_event(nodes, n, samples) do
    opts = Keyword.put(@opts, :max_events, 2 * n + 1_000)

    rows =
      for _ <- 1..samples, reduce: %{} do
        acc ->
          acc =
            Enum.reduce(nodes, acc, fn nd, acc ->
              untraced = :erpc.call(nd, Work, :timed, [n], :infinity)
              {:ok, _} = :erpc.call(nd, ElixirScope, :trace, [@target, opts])
              single = :erpc.call(nd, Work, :timed, [n], :infinity)
              {:ok, s} = :erpc.call(nd, ElixirScope, :stop_trace, [])
              true = s.offered == 2 * n

              acc
              |> add({nd, :untraced}, untraced / (2 * n))
              |> add({nd, :single}, single / (2 * n))
              |> add({nd, :single_dropped}, s.dropped)
            end)

          {:ok, _} = ElixirScope.trace(@target, [nodes: nodes] ++ opts)
          times = Enum.map(nodes, &{&1, :erpc.call(&1, Work, :timed, [n], :infinity)})
          {:ok, s} = ElixirScope.stop_trace()
          true = s.totals.offered == 2 * n * length(nodes)

          Enum.reduce(times, acc, fn {nd, t}, acc ->
            acc
            |> add({nd, :cluster}, t / (2 * n))
            |> add({nd, :cluster_dropped}, s.nodes[nd].dropped)
          end)
      end

    IO.puts(
      "\n## 1. Per-event trace cost (ns per event, median of #{samples}; target: cluster ≤ 1.1 × single)\n"
    )

    IO.puts(
      "| node | untraced | single-node trace | cluster trace | cluster / single | dropped (ring full) single / cluster |"
    )

    IO.puts("|---|---:|---:|---:|---:|---:|")

    for nd <- nodes do
      [u, s, c] = for k <- [:untraced, :single, :cluster], do: median(rows[{nd, k}])
      [ds, dc] = for k <- [:single_dropped, :cluster_dropped], do: Enum.sum(rows[{nd, k}])
      IO.puts("| #{nd} | #{f(u)} | #{f(s)} | #{f(c)} | #{f2(c / s)} | #{ds} / #{dc} |")
    end
  end

  defp queries(nodes, total, samples) do
    per_node = div(total, 2 * length(nodes))
    opts = Keyword.put(@opts, :max_events, 2 * per_node + 1_000)
    {:ok, _} = ElixirScope.trace(@target, [nodes: nodes] ++ opts)
    Enum.each(nodes, &:erpc.call(&1, Work, :loop, [per_node], :infinity))
    {:ok, s} = ElixirScope.stop_trace()
    cluster_events = s.totals.traced

    # (Events a full ring dropped under load are not counted.)
    cluster_stat = time(samples, fn -> [%{key: @target}] = Analysis.call_stat() end)
    cluster_select = time(samples * 4, fn -> 1000 = length(Analysis.select(limit: 1000)) end)
    # The floor: one empty :erpc call to every node at once.
    floor = time(samples * 4, fn -> :erpc.multicall(nodes, :erlang, :node, []) end)

    # The same number of events on this node alone.
    calls = div(cluster_events, 2)
    {:ok, _} = ElixirScope.trace(@target, Keyword.put(@opts, :max_events, cluster_events + 1_000))
    Work.loop(calls)
    {:ok, s1} = ElixirScope.stop_trace()
    single_stat = time(samples, fn -> [%{key: @target}] = Analysis.call_stat() end)
    single_select = time(samples * 4, fn -> 1000 = length(Analysis.select(limit: 1000)) end)

    IO.puts("\n## 2. call_stat (ms, median; target: cluster ≤ 1.5 × single)\n")
    IO.puts("| trace | events | call_stat ms |")
    IO.puts("|---|---:|---:|")
    IO.puts("| single node | #{s1.traced} | #{f2(single_stat)} |")
    IO.puts("| #{length(nodes)} nodes | #{cluster_events} | #{f2(cluster_stat)} |")
    IO.puts("cluster / single: #{f2(cluster_stat / single_stat)}")

    IO.puts("\n## 3. select(limit: 1000) (ms, median; target: merged over 3 nodes ≤ 5 ms)\n")
    IO.puts("| store | select ms |")
    IO.puts("|---|---:|")
    IO.puts("| this node alone | #{f2(single_select)} |")
    IO.puts("| merged over #{length(nodes)} nodes | #{f2(cluster_select)} |")
    IO.puts("| (an empty :erpc.multicall to the #{length(nodes)} nodes) | #{f2(floor)} |")
  end

  defp time(samples, fun) do
    fun.()

    for(_ <- 1..samples, do: elem(:timer.tc(fun), 0) / 1000)
    |> median()
  end

  defp add(acc, k, v), do: Map.update(acc, k, [v], &[v | &1])
  defp median(l), do: Harness.stats(l).median
  defp f(x), do: :erlang.float_to_binary(x / 1, decimals: 1)
  defp f2(x), do: :erlang.float_to_binary(x / 1, decimals: 2)

  defp peer(tag, work_bin) do
    paths =
      :code.get_path()
      |> Enum.reject(&List.starts_with?(&1, :code.root_dir()))
      |> Enum.flat_map(&[~c"-pa", &1])

    {:ok, _, nd} =
      :peer.start(%{
        name: :"bench_#{tag}_#{:os.getpid()}",
        host: ~c"127.0.0.1",
        longnames: true,
        args: paths ++ [~c"-setcookie", Atom.to_charlist(Node.get_cookie())]
      })

    {:ok, _} = :erpc.call(nd, Application, :ensure_all_started, [:elixir_scope])
    {:module, _} = :erpc.call(nd, :code, :load_binary, [Work, ~c"cluster_bench.exs", work_bin])
    nd
  end
end

ClusterBench.run(work_bin)

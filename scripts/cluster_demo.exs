# ElixirScope Native cluster demo.
#
# Run it with `bash scripts/cluster_demo.sh` (or `mix run scripts/cluster_demo.exs`).
#
# Starts three local nodes on loopback (127.0.0.1, `epmd` started here, OTP's
# `:peer`): a client node, a shop node and a pricer node, and loads the app of
# scripts/cluster_app.ex on them: the client orders through the shop, which
# prices every item with the pricer (a GenServer.call across nodes each) and
# casts an audit note to it. This VM coordinates a cluster trace of the three
# nodes (`ElixirScope.trace/2` with `nodes:`): each node records into its own
# store. Then it prints the cross-node call tree of an order with its message
# arrows, the merged message flow, each node's clock offset and accounting.
#
# The demo checks what it shows against the app's ground truth and exits with
# status 1 if anything is off.

defmodule ClusterDemo.Run do
  alias ElixirScope.Analysis
  alias ElixirScope.Analysis.{Entry, Format}

  def run do
    {_, 0} = System.cmd("epmd", ["-daemon"], stderr_to_stdout: true)
    {:ok, _} = :net_kernel.start([:"cluster_demo_#{:os.getpid()}@127.0.0.1", :longnames])
    mods = Code.compile_file("cluster_app.ex", __DIR__)

    [client, shop, pricer] = nodes = Enum.map(["client", "shop", "pricer"], &start_node(&1, mods))

    IO.puts("== Three nodes on loopback: #{Enum.join(nodes, ", ")}")

    {:ok, pr} = :erpc.call(pricer, ClusterDemo.Pricer, :start, [])
    {:ok, sh} = :erpc.call(shop, ClusterDemo.Shop, :start, [pr])
    mods = [ClusterDemo.Client, ClusterDemo.Shop, ClusterDemo.Pricer]

    {:ok, info} = ElixirScope.trace(mods, nodes: nodes)

    IO.puts(
      "  tracing #{inspect(mods)} on #{map_size(info.nodes)} nodes, each into its own store"
    )

    {:ok, 8} = :erpc.call(client, ClusterDemo.Client, :buy, [sh, [:apple, :pear]])
    {:ok, 7} = :erpc.call(client, ClusterDemo.Client, :buy, [sh, [:fig]])
    {:ok, summary} = ElixirScope.stop_trace()

    header("Clocks (offset to this node's monotonic clock, min-RTT ping)")

    for n <- nodes do
      c = summary.clocks[n]

      IO.puts(
        "  #{n}: offset #{c.offset_ns} ns ± #{c.error_ns} ns " <>
          "(start #{c.start.offset_ns}, stop #{c.stop.offset_ns}: drift #{c.stop.offset_ns - c.start.offset_ns} ns)"
      )
    end

    header("The first order: the client's call, the shop's callback, the pricer's callbacks")
    [buy | _] = buys = Analysis.select(module: ClusterDemo.Client, function: :buy, types: [:call])
    tree = Analysis.call_tree(buy)
    Format.print_tree(tree)

    header("Merged message flow of the app (corrected time order)")
    app = Enum.map(buys, & &1.pid) ++ [sh, pr]

    flows =
      Analysis.messages()
      |> Enum.filter(
        &(&1.from in app and (&1.to in app or is_reference(&1.to) or &1.receive != nil))
      )
      |> Enum.filter(&(&1.receive == nil or &1.receive.pid in app))

    Format.print_messages(flows)

    header("Per-node accounting")

    for n <- nodes do
      st = summary.nodes[n]
      pm = :erpc.call(n, ElixirScope, :trace_pipeline, [])
      line = :erpc.call(n, ElixirScope.Capture.PipelineManager, :accounting_line, [pm])

      IO.puts(
        "  #{n}: offered #{st.offered} = traced #{st.traced} + dropped #{st.dropped} + " <>
          "shed #{st.shed} + over limit #{st.over_limit}\n    pipeline: #{line}"
      )
    end

    t = summary.totals
    IO.puts("  all nodes: traced #{t.traced}, dropped #{t.dropped}, offered #{t.offered}")

    check(tree, flows, summary, [client, shop, pricer], [buy.pid, sh, pr])
    Enum.each(nodes, &:erpc.call(&1, :init, :stop, []))
  end

  defp check(tree, flows, summary, [client, shop, pricer] = nodes, [_cl, sh, pr]) do
    calls = tree_calls(tree, 0)

    expected = [
      {0, client, {ClusterDemo.Client, :buy, 2}},
      {1, client, {ClusterDemo.Shop, :order, 2}},
      {2, shop, {ClusterDemo.Shop, :handle_call, 3}},
      # Enum.map's fun, in the Shop module: traced too.
      {3, shop, {ClusterDemo.Shop, :"-handle_call/3-fun-0-", 2}},
      {4, shop, {ClusterDemo.Pricer, :price, 2}},
      {5, pricer, {ClusterDemo.Pricer, :handle_call, 3}},
      {6, pricer, {ClusterDemo.Pricer, :list_price, 1}},
      {3, shop, {ClusterDemo.Shop, :"-handle_call/3-fun-0-", 2}},
      {4, shop, {ClusterDemo.Pricer, :price, 2}},
      {5, pricer, {ClusterDemo.Pricer, :handle_call, 3}},
      {6, pricer, {ClusterDemo.Pricer, :list_price, 1}},
      {3, shop, {ClusterDemo.Pricer, :audit, 2}},
      # The cast's callback on the pricer node.
      {4, pricer, {ClusterDemo.Pricer, :handle_cast, 2}}
    ]

    # Two orders: 2 + 1 price calls and 2 orders, request and reply each,
    # plus 2 audit casts: 12 messages, every one received on another node.
    linked = Enum.count(flows, &(&1.receive != nil and &1.confidence == 1.0))
    casts = Enum.count(flows, &match?({:"$gen_cast", _}, &1.message))
    ok_nodes = Enum.all?(nodes, &(summary.nodes[&1].state == :stopped))
    sum_ok = summary.totals.traced == Enum.sum(for n <- nodes, do: summary.nodes[n].traced)

    problems =
      [
        {calls == expected, "call tree: #{inspect(calls)}"},
        {length(flows) == 12 and linked == 12, "#{linked} of #{length(flows)} messages linked"},
        {casts == 2, "#{casts} audit casts"},
        {ok_nodes and sum_ok, "per-node accounting"},
        {Enum.all?(flows, &(&1.receive == nil or node(&1.receive.pid) != node(&1.send.pid))),
         "a message linked within a node"},
        {sh != pr, "pids"}
      ]
      |> Enum.reject(&elem(&1, 0))

    header("Checks")

    case problems do
      [] ->
        IO.puts("  call tree, message links and accounting match the app's ground truth")

      _ ->
        Enum.each(problems, fn {_, what} -> IO.puts("  MISMATCH: #{what}") end)
        System.halt(1)
    end
  end

  defp tree_calls(%{call: %Entry{} = c, children: kids}, depth) do
    [
      {depth, node(c.pid), {c.module, c.function, c.arity}}
      | Enum.flat_map(kids, fn
          %{call: _} = t -> tree_calls(t, depth + 1)
          _ -> []
        end)
    ]
  end

  # A peer on loopback with this VM's code path (the library) and the app.
  defp start_node(role, mods) do
    paths =
      :code.get_path()
      |> Enum.reject(&List.starts_with?(&1, :code.root_dir()))
      |> Enum.flat_map(&[~c"-pa", &1])

    {:ok, _peer, node} =
      :peer.start(%{
        name: :"demo_#{role}_#{:os.getpid()}",
        host: ~c"127.0.0.1",
        longnames: true,
        args: paths ++ [~c"-setcookie", Atom.to_charlist(Node.get_cookie())]
      })

    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:elixir_scope])

    for {m, bin} <- mods,
        do: {:module, ^m} = :erpc.call(node, :code, :load_binary, [m, ~c"cluster_app.ex", bin])

    node
  end

  defp header(text), do: IO.puts("\n== #{text}")
end

ClusterDemo.Run.run()

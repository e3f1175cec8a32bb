# Time travel: state queries and the cost of capturing states.
#
#   mix run bench/state_bench.exs
#
# Part 1 (queries) traces a GenServer workload with ElixirScope.trace/2
# (payload: :full, states captured: the default for targets with OTP
# callbacks) until about STATE_BENCH_EVENTS events are stored, with one
# state record per STATE_BENCH_EVENTS / STATE_BENCH_STATES events: a client
# process calls StateBench.Server.bump/3 in a loop; each handle_call/3 runs
# a traced recursion (StateBench.Work.amount/2) and returns a new state of
# a few hundred bytes (a map with counters and the last 16 operations).
# Then it times, against a baseline computed in the same run:
#
#   state_at(server, t) at random times  vs  the same answer by scanning
#     with Analysis.select (the server's handle_call/3 returns up to t, the
#     last one's state);
#   state_history(server, from: t, limit: 10_000)  vs  Analysis.select of
#     the same 10,000 returns and extracting their states.
#
# Every timed answer is compared with its baseline's on a sample of points.
#
# Part 2 (capture cost) runs a GenServer-heavy workload (the client's
# N calls of bump/3 with no nested work: per call the client's call and
# return, the $gen_call send and its receive, handle_call/3's call and
# return, the reply's send and receive) untraced, traced with payload: :full
# and state: false, and traced with payload: :full and states captured
# (state: :snapshot), samples interleaved, for two sizes of state: a small
# one, and one that the payload cap (512 bytes) cuts in handle_call/3's
# return when states are not captured. Per event: the client's wall time
# for the N calls / events traced; the trace cost per event is that minus
# the untraced time per event (medians). Also the VM's CPU time (all its
# threads, the pipeline's included) from the workload's start until every
# event is stored, per event.
#
# Environment: STATE_BENCH_EVENTS (default 2_000_000), STATE_BENCH_STATES
# (default 100_000), BENCH_SAMPLES (default 7), STATE_BENCH_N (calls per
# capture sample, default 50_000), STATE_BENCH_PARTS (default
# "queries,capture").
Code.require_file("support/harness.exs", __DIR__)

defmodule StateBench.Work do
  @moduledoc false
  # A non-tail recursion of depth d: d + 1 calls, 2 (d + 1) events.
  def amount(0, k), do: rem(k, 97) + 1
  def amount(d, k), do: amount(d - 1, k) + 0
end

defmodule StateBench.Server do
  @moduledoc false
  use GenServer

  # keep: how many recent operations the state holds (its size).
  def start(keep), do: GenServer.start(__MODULE__, keep)

  # depth: the nested recursion handle_call/3 runs (traced events).
  def bump(pid, k, depth), do: GenServer.call(pid, {:bump, k, depth})

  @impl true
  def init(keep), do: {:ok, %{n: 0, total: 0, recent: [], keep: keep, label: "bench account #1"}}

  @impl true
  def handle_call({:bump, k, depth}, _from, s) do
    amount = StateBench.Work.amount(depth, k)
    recent = Enum.take([{k, amount, :deposit} | s.recent], s.keep)
    s = %{s | n: s.n + 1, total: s.total + amount, recent: recent}
    {:reply, s.total, s}
  end
end

defmodule StateBench.Client do
  @moduledoc false
  # Untraced: the loop lives here, so only bump/3 is traced in the client.
  def loop(_server, i, n, _depth) when i > n, do: :ok

  def loop(server, i, n, depth) do
    StateBench.Server.bump(server, i, depth)
    loop(server, i + 1, n, depth)
  end

  # A client that waits for :go, runs n calls and reports its wall time.
  def spawn_client(server, n, depth) do
    parent = self()

    spawn(fn ->
      receive do
        :go -> :ok
      end

      t0 = System.monotonic_time(:nanosecond)
      loop(server, 1, n, depth)
      send(parent, {:client_done, self(), System.monotonic_time(:nanosecond) - t0})
    end)
  end

  def run(client) do
    :erlang.garbage_collect()
    send(client, :go)

    receive do
      {:client_done, ^client, ns} -> ns
    end
  end
end

defmodule StateBench do
  @moduledoc false
  alias ElixirScope.Analysis
  alias ElixirScope.Bench.Harness
  alias ElixirScope.Capture.PipelineManager
  alias StateBench.{Client, Server, Work}

  defdelegate env_int(name, default), to: Harness

  # ---- part 1: the trace ----------------------------------------------------------

  defp build_trace(events, states) do
    # Events per bump/3 with nested depth d: 8 + 2 (d + 1).
    depth = max(div(div(events, states) - 10, 2), 0)
    {:ok, server} = Server.start(16)
    client = Client.spawn_client(server, states, depth)

    {:ok, info} =
      ElixirScope.trace([Server, Work],
        pids: [client, server],
        payload: :full,
        max_events: events * 2,
        max_rate: 1_000_000_000,
        max_stored: events + div(events, 10),
        # Room for the whole trace: a store falling behind under load
        # would drop events (the trace is built, not measured, here).
        ring_size: 1_048_576,
        duration: 900_000
      )

    t0 = System.monotonic_time(:nanosecond)
    work_ns = Client.run(client)
    {:ok, summary} = ElixirScope.stop_trace()
    flush = ElixirScope.flush_trace(300_000)
    total_ns = System.monotonic_time(:nanosecond) - t0
    metrics = PipelineManager.get_metrics(ElixirScope.trace_pipeline())
    [{_, n_states}] = Enum.filter(Analysis.state_processes(), &(elem(&1, 0) == server))

    IO.puts(
      "## Trace: #{states} calls of Server.bump/3 (handle_call/3 nests #{depth + 1} traced " <>
        "calls), states captured: #{info.states}, snapshots #{inspect(info.snapshots)}\n"
    )

    IO.puts(
      "workload #{ms(work_ns)} traced; until stored and queryable #{ms(total_ns)} " <>
        "(flush_trace: #{inspect(flush)})"
    )

    IO.puts(
      "stop summary: traced #{summary.traced}, dropped #{summary.dropped}, " <>
        "truncated #{summary.truncated}; stored #{metrics.accounting.stored} " <>
        "(store memory #{mib(metrics.memory_bytes)}); state records of the server: #{n_states}"
    )

    IO.puts("accounting: #{PipelineManager.accounting_line(ElixirScope.trace_pipeline())}")

    if summary.dropped != 0, do: IO.puts("WARNING: #{summary.dropped} events dropped")

    %{server: server, stored: metrics.accounting.stored, states: n_states}
  end

  # ---- part 1: the queries ----------------------------------------------------------

  # The baseline: the state in force at t by scanning, with Analysis.select,
  # the server's handle_call/3 returns up to t; the last one's state.
  defp scan_state_at(server, t) do
    Analysis.select(
      pid: server,
      module: Server,
      function: :handle_call,
      types: [:return],
      to: t,
      limit: 10_000_000
    )
    |> List.last()
    |> reply_state()
  end

  defp reply_state(nil), do: nil
  defp reply_state(%{data: {:reply, _, s}}), do: s

  defp queries(trace) do
    samples = env_int("BENCH_SAMPLES", 7)
    server = trace.server
    store = ElixirScope.trace_store()
    all = Analysis.state_history(server, limit: trace.states)
    # From the first handle_call/3 return (after the snapshot) to the last.
    [_snapshot, first | _] = all
    last = List.last(all)
    sizes = Enum.map(Enum.take_every(all, 997), &:erlang.external_size(&1.state))
    :rand.seed(:exsss, {11, 12, 13})
    span = last.timestamp - first.timestamp
    times = for _ <- 1..1000, do: first.timestamp + :rand.uniform(span + 1) - 1
    scan_times = Enum.take(times, 3)

    IO.puts(
      "\nstates of the server: #{length(all)}, external size #{Enum.min(sizes)}–" <>
        "#{Enum.max(sizes)} bytes; queries at 1,000 random times over #{ms(span)}"
    )

    # The answers first: state_at against the scan at 40 of the times.
    mismatches =
      for t <- Enum.take(times, 40),
          {:ok, st} = Analysis.state_at(server, t),
          st.state != scan_state_at(server, t),
          do: t

    # state_history of 10,000 states from the middle of the trace.
    mid = Enum.at(all, div(length(all), 2))
    hist = Analysis.state_history(server, from: mid.timestamp, limit: 10_000)

    hist_sel =
      Analysis.select(
        pid: server,
        module: Server,
        function: :handle_call,
        types: [:return],
        from: mid.timestamp,
        limit: 10_000
      )

    hist_ok = hist != [] and Enum.map(hist, & &1.state) == Enum.map(hist_sel, &reply_state/1)

    IO.puts(
      "check: state_at = scan at 40 times: #{if mismatches == [], do: "yes", else: "NO #{inspect(mismatches)}"}; " <>
        "state_history of #{length(hist)} states = the select's: #{if hist_ok, do: "yes", else: "NO"}"
    )

    jobs = [
      %{
        name: "state_at",
        n: length(times),
        run: fn _ -> Enum.each(times, &Analysis.state_at(server, &1)) end
      },
      %{
        name: "state_at store:",
        n: length(times),
        run: fn _ -> Enum.each(times, &Analysis.state_at(server, &1, store: store)) end
      },
      %{
        name: "scan",
        n: length(scan_times),
        run: fn _ -> Enum.each(scan_times, &scan_state_at(server, &1)) end
      },
      %{
        name: "state_history",
        n: 1,
        run: fn _ -> Analysis.state_history(server, from: mid.timestamp, limit: 10_000) end
      },
      %{
        name: "select 10k",
        n: 1,
        run: fn _ ->
          Analysis.select(
            pid: server,
            module: Server,
            function: :handle_call,
            types: [:return],
            from: mid.timestamp,
            limit: 10_000
          )
          |> Enum.map(&reply_state/1)
        end
      }
    ]

    IO.puts("\ntiming: #{samples} samples, interleaved ...")
    r = Harness.run(jobs, samples: samples, warmup: 1)

    IO.puts("\n## State queries on #{trace.stored} stored events, #{trace.states} states\n")

    IO.puts(
      "| query | median | p99 | min | target | met? | baseline (same run) | baseline ÷ ours |"
    )

    IO.puts("|---|---:|---:|---:|---:|---|---:|---:|")

    row = fn label, name, target, base_label, base ->
      %{median: md, p99: p, min: mn} = r[name]

      met =
        cond do
          target == nil -> "–"
          md <= target -> "met"
          true -> "MISSED"
        end

      IO.puts(
        "| #{label} | #{dur(md)} | #{dur(p)} | #{dur(mn)} | " <>
          "#{if target, do: "≤ " <> dur(target), else: "–"} | #{met} | " <>
          "#{if base, do: "#{base_label}: #{dur(r[base].median)}", else: "–"} | " <>
          "#{if base, do: speedup(r[base].median / md), else: "–"} |"
      )
    end

    row.("state_at (random time)", "state_at", 20.0e3, "scan with select", "scan")
    row.("state_at, store: given", "state_at store:", 20.0e3, "scan with select", "scan")
    row.("scan with select (baseline)", "scan", nil, nil, nil)

    row.(
      "state_history, 10,000 states",
      "state_history",
      20.0e6,
      "select of the same returns",
      "select 10k"
    )

    row.("select of the 10,000 returns (baseline)", "select 10k", nil, nil, nil)

    # The VM's CPU time (all its threads) per call: what the query costs
    # when other programs share the cores.
    cpu = fn n, f ->
      {_, _} = :erlang.statistics(:runtime)
      for _ <- 1..n, do: f.()
      {_, ms} = :erlang.statistics(:runtime)
      ms * 1.0e6 / n
    end

    cpu_at = cpu.(20, fn -> Enum.each(times, &Analysis.state_at(server, &1)) end) / length(times)

    cpu_hist =
      cpu.(20, fn -> Analysis.state_history(server, from: mid.timestamp, limit: 10_000) end)

    IO.puts(
      "\nVM CPU time (all threads, :erlang.statistics(:runtime)) per call: state_at " <>
        "#{dur(cpu_at)}, state_history of 10,000 states #{dur(cpu_hist)}"
    )

    IO.puts(
      "\nPer operation: state_at ×#{length(times)} per sample (random times, each call " <>
        "looks the store up with trace_store/0 unless store: is given), scan ×" <>
        "#{length(scan_times)} (the first 3 times), state_history and its select ×1."
    )
  end

  # ---- part 2: the cost of capturing states ----------------------------------------

  @variants ["untraced", "full, state: false", "full, states"]

  # The VM's CPU time (ms, all its threads: schedulers, dirty schedulers
  # and the pipeline's native threads) since the previous call.
  defp cpu_ms do
    {_, ms} = :erlang.statistics(:runtime)
    ms
  end

  defp capture_sample({"untraced", keep}, n) do
    {:ok, server} = Server.start(keep)
    client = Client.spawn_client(server, n, 0)
    _ = cpu_ms()
    ns = Client.run(client)
    cpu = cpu_ms()
    GenServer.stop(server)
    %{work: ns, total: ns, cpu: cpu * 1.0e6, traced: nil, dropped: 0}
  end

  defp capture_sample({variant, keep}, n) do
    {:ok, server} = Server.start(keep)
    client = Client.spawn_client(server, n, 0)
    state = if variant == "full, states", do: :snapshot, else: false

    {:ok, info} =
      ElixirScope.trace(Server,
        pids: [client, server],
        payload: :full,
        state: state,
        max_events: 20 * n,
        max_rate: 1_000_000_000,
        max_stored: 10 * n,
        ring_size: 524_288,
        duration: 900_000
      )

    true = info.states == (state == :snapshot)
    t0 = System.monotonic_time(:nanosecond)
    _ = cpu_ms()
    ns = Client.run(client)
    {:ok, summary} = ElixirScope.stop_trace()
    :ok = ElixirScope.flush_trace(300_000)
    cpu = cpu_ms()
    total = System.monotonic_time(:nanosecond) - t0
    states = Analysis.state_processes() |> Enum.map(&elem(&1, 1)) |> Enum.sum()
    stats = PipelineManager.get_metrics(ElixirScope.trace_pipeline())
    GenServer.stop(server)

    %{
      work: ns,
      total: total,
      cpu: cpu * 1.0e6,
      traced: summary.traced,
      truncated: summary.truncated,
      dropped: summary.dropped,
      states: states,
      memory: stats.memory_bytes
    }
  end

  # The state after `calls` calls with `keep` recent operations: its size.
  defp state_size(keep, calls) do
    {:ok, server} = Server.start(keep)
    for k <- 1..calls, do: Server.bump(server, k, 0)
    bytes = :erlang.external_size(:sys.get_state(server))
    GenServer.stop(server)
    bytes
  end

  defp capture(n) do
    samples = env_int("BENCH_SAMPLES", 7)
    # Two GenServer states: a small one (both traces record it whole in
    # handle_call/3's return) and one of about 1 KiB of payload (cut at
    # the 512-byte payload cap without state capture, kept whole with it).
    keeps = [2, 24]
    runs = for keep <- keeps, v <- @variants, do: {v, keep}
    # Warm-up: every variant once, small.
    for r <- runs, do: capture_sample(r, 2_000)

    IO.puts(
      "\n## Capture cost: #{n} GenServer calls per sample (no nested work), " <>
        "#{samples} samples, interleaved"
    )

    results =
      for s <- 1..samples, {v, keep} = r <- runs, reduce: %{} do
        acc ->
          x = capture_sample(r, n)

          IO.puts(
            "sample #{s} keep #{keep} #{String.pad_trailing(v, 20)} client #{ms(x.work)}, " <>
              "until stored #{ms(x.total)}, VM CPU #{ms(x.cpu)}, traced #{inspect(x.traced)}, " <>
              "dropped #{x.dropped}" <>
              if(x[:states],
                do:
                  ", truncated #{x.truncated}, state records #{x.states}, store #{mib(x.memory)}",
                else: ""
              )
          )

          Map.update(acc, r, [x], &[x | &1])
      end

    for keep <- keeps, do: capture_table(results, keep, n)
  end

  defp capture_table(results, keep, n) do
    # Events per sample: what the traced runs recorded (the same workload).
    events =
      results[{"full, state: false", keep}]
      |> Enum.map(& &1.traced)
      |> Harness.stats()
      |> Map.get(:median)

    med = fn v, key ->
      Harness.stats(Enum.map(results[{v, keep}], &(&1[key] / events))).median
    end

    m = Map.new(@variants, fn v -> {v, Map.new([:work, :total, :cpu], &{&1, med.(v, &1)})} end)
    base = m["untraced"]

    IO.puts(
      "\n### State of #{state_size(keep, keep + 1)} bytes (external size; #{keep} recent " <>
        "operations): #{events} events per sample (#{f1(events / n)} per call)\n"
    )

    IO.puts(
      "| variant | client ns/event | trace cost ns/event (− untraced) | until stored ns/event | " <>
        "VM CPU ns/event | CPU trace cost ns/event (− untraced) | truncated | dropped |"
    )

    IO.puts("|---|---:|---:|---:|---:|---:|---:|---:|")

    for {v, label} <- [
          {"untraced", "untraced"},
          {"full, state: false", "payload: :full, state: false (baseline)"},
          {"full, states", "payload: :full, states captured"}
        ] do
      rs = results[{v, keep}]
      dropped = rs |> Enum.map(& &1.dropped) |> Enum.sum()
      truncated = if v == "untraced", do: "–", else: hd(rs).truncated
      x = m[v]
      cost = fn key -> if v == "untraced", do: "–", else: f1(x[key] - base[key]) end

      IO.puts(
        "| #{label} | #{f1(x.work)} | #{cost.(:work)} | #{f1(x.total)} | #{f1(x.cpu)} | " <>
          "#{cost.(:cpu)} | #{truncated} | #{dropped} |"
      )
    end

    added = fn key ->
      on = m["full, states"][key] - base[key]
      off = m["full, state: false"][key] - base[key]
      (on / off - 1) * 100
    end

    verdict = fn pct -> if pct <= 15, do: "met", else: "MISSED" end

    IO.puts(
      "\ncapturing states adds #{f1(added.(:work))}% to the per-event trace cost in the " <>
        "client's wall time (target ≤ 15%: #{verdict.(added.(:work))}), " <>
        "#{f1(added.(:cpu))}% in VM CPU time (#{verdict.(added.(:cpu))}); until stored: " <>
        "#{f1((m["full, states"].total / m["full, state: false"].total - 1) * 100)}% per event"
    )
  end

  # ---- formatting ---------------------------------------------------------------------

  defp ms(ns), do: "#{:erlang.float_to_binary(ns / 1.0e6, decimals: 1)} ms"
  defp mib(b), do: "#{:erlang.float_to_binary(b / 1_048_576, decimals: 1)} MiB"
  defp f1(x), do: :erlang.float_to_binary(x / 1, decimals: 1)

  defp dur(ns) when ns >= 1.0e6, do: "#{:erlang.float_to_binary(ns / 1.0e6, decimals: 2)} ms"
  defp dur(ns) when ns >= 1.0e3, do: "#{:erlang.float_to_binary(ns / 1.0e3, decimals: 2)} µs"
  defp dur(ns), do: "#{round(ns)} ns"

  defp speedup(x), do: "#{:erlang.float_to_binary(x, decimals: 1)}×"

  def main do
    parts = System.get_env("STATE_BENCH_PARTS", "queries,capture") |> String.split(",")
    IO.puts("# ElixirScope state bench — #{Harness.machine()}")

    {load, _} = System.cmd("cat", ["/proc/loadavg"])
    IO.puts("# #{DateTime.utc_now() |> DateTime.truncate(:second)}, load average #{load}")

    if "queries" in parts do
      trace =
        build_trace(
          env_int("STATE_BENCH_EVENTS", 2_000_000),
          env_int("STATE_BENCH_STATES", 100_000)
        )

      queries(trace)
    end

    if "capture" in parts, do: capture(env_int("STATE_BENCH_N", 50_000))
  end
end

StateBench.main()

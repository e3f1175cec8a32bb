# The store at scale (issue #15 items 6 and 7), measured through the
# Elixir API in one run.
#
#   mix run bench/scale_bench.exs
#   SCALE_BENCH_SIZES=100000,1000000 mix run bench/scale_bench.exs   # quick
#
# Part "store": for each size N (SCALE_BENCH_SIZES, default
# 100000,1000000,10000000) a DataAccess store with max_events: N is filled
# with N FunctionExecution events (64 busy processes; one sparse process
# whose 1,000 events, calls of one function, are spread evenly over the
# store). All stores are kept at once, so every figure's samples are
# interleaved across the sizes. Per size: the store rate (store_events/2
# of 1,000-event batches into the full store, each insert evicting one),
# bytes per event (memory_usage / total_events), and the latency of
# get_event/2 (random ids), query_by_process/3 (the sparse process: 1,000
# hits), query_by_time_range/4 (a 1,000-event window at a random place)
# and query_by_function/4 (the sparse function: 1,000 hits). Then each
# store is destroyed and the VM's RSS (/proc/self/status) is printed
# before and after. Traceback, range and state / prev / next at 100k, 1M
# and 10M are measured in the engine by
# `cargo bench -p elixir_scope_core --bench scale`.
#
# Part "ingest": a traced process (Work.step/1 in bursts of 200 calls,
# then `:erlang.yield/0`; SCALE_BENCH_BURST_SLEEP_MS > 0 sleeps instead)
# feeds a trace whose store keeps the last SCALE_BENCH_PASS_EVENTS
# (default 2,000,000) events. The ingest rate (the store's `inserted`
# counter per second) is sampled over windows with no query running and
# over the whole run of one Analysis.call_stat/1 (a pass over the full
# store) made from another process, interleaved, SCALE_BENCH_PASS_SAMPLES
# (default 5) of each.
Code.require_file("support/harness.exs", __DIR__)

defmodule ScaleBench.Work do
  @moduledoc false
  def step(x), do: x + 1
end

defmodule ScaleBench.Driver do
  @moduledoc false
  # Untraced: calls the traced step/1 in bursts until told to stop.
  def loop(sleep_ms) do
    receive do
      :stop -> :ok
    after
      0 ->
        burst(200)
        if sleep_ms > 0, do: Process.sleep(sleep_ms), else: :erlang.yield()
        loop(sleep_ms)
    end
  end

  defp burst(0), do: :ok

  defp burst(n) do
    ScaleBench.Work.step(n)
    burst(n - 1)
  end
end

defmodule ScaleBench do
  @moduledoc false
  alias ElixirScope.Analysis
  alias ElixirScope.Bench.Harness
  alias ElixirScope.Events.FunctionExecution
  alias ElixirScope.Storage.DataAccess

  @step 100
  @sparse_fn :sparse

  def env_int(name, default) do
    case System.get_env(name) do
      nil -> default
      v -> v |> String.replace("_", "") |> String.to_integer()
    end
  end

  def rss_mib do
    {:ok, s} = File.read("/proc/self/status")
    [_, kb] = Regex.run(~r/VmRSS:\s+(\d+)/, s)
    String.to_integer(kb) / 1024
  end

  def load, do: :os.cmd(~c"uptime") |> to_string() |> String.trim()

  defp pids do
    case :persistent_term.get({__MODULE__, :pids}, nil) do
      nil ->
        ps = for _ <- 1..65, do: spawn(fn -> Process.sleep(:infinity) end)
        t = List.to_tuple(ps)
        :persistent_term.put({__MODULE__, :pids}, t)
        t

      t ->
        t
    end
  end

  # Event i of a store of size n: the sparse process every n / 1000 events.
  def event(i, n) do
    every = max(div(n, 1000), 1)
    sparse? = rem(i, every) == div(every, 2)
    ps = pids()

    %FunctionExecution{
      id: i,
      timestamp: i * @step,
      wall_time: 0,
      module: ScaleBench.M,
      function:
        if(sparse?, do: @sparse_fn, else: elem({:a, :b, :c, :d, :e, :f, :g, :h}, rem(i, 8))),
      arity: 1,
      args: [i],
      caller_pid: if(sparse?, do: elem(ps, 64), else: elem(ps, rem(i, 64))),
      correlation_id: i,
      event_type: :call
    }
  end

  defp fill(s, from, count, n) do
    from
    |> Stream.iterate(&(&1 + 1000))
    |> Enum.take_while(&(&1 < from + count))
    |> Enum.each(fn b ->
      batch = for i <- b..min(b + 999, from + count - 1), do: event(i, n)
      {:ok, _} = DataAccess.store_events(s, batch)
    end)
  end

  def store_part(sizes, samples) do
    IO.puts("\n## Part store: DataAccess at #{Enum.join(sizes, ", ")} stored events\n")
    IO.puts("load before filling: #{load()}")
    rss0 = rss_mib()

    stores =
      for n <- sizes do
        {:ok, s} = DataAccess.new(max_events: n)
        t0 = System.monotonic_time(:nanosecond)
        fill(s, 1, n, n)
        dt = (System.monotonic_time(:nanosecond) - t0) / 1.0e9
        IO.puts("filled #{n} in #{Float.round(dt, 1)} s (#{round(n / dt)} events/s)")
        %{n: n, s: s, next: n + 1}
      end

    IO.puts("RSS: #{round(rss0)} MiB before, #{round(rss_mib())} MiB with every store filled")
    IO.puts("load after filling: #{load()}")
    :rand.seed(:exsss, {1, 2, 3})
    batch = 1000
    rate_batches = 50

    # Store rate: interleaved samples; each stores 50 batches of 1,000
    # (built before the timed region) into the full store.
    rate =
      for _ <- 1..samples, st <- stores, reduce: %{} do
        acc ->
          next = :persistent_term.get({__MODULE__, :next, st.n}, st.next)

          batches =
            for b <- 0..(rate_batches - 1),
                do: for(i <- (next + b * batch)..(next + (b + 1) * batch - 1), do: event(i, st.n))

          :erlang.garbage_collect()
          t0 = System.monotonic_time(:nanosecond)
          for b <- batches, do: {:ok, _} = DataAccess.store_events(st.s, b)
          dt = System.monotonic_time(:nanosecond) - t0
          :persistent_term.put({__MODULE__, :next, st.n}, next + rate_batches * batch)

          Map.update(
            acc,
            st.n,
            [rate_batches * batch / (dt / 1.0e9)],
            &[rate_batches * batch / (dt / 1.0e9) | &1]
          )
      end

    ops = 200
    sparse = elem(pids(), 64)

    queries = [
      {"get_event (random id)",
       fn st ->
         lo = :persistent_term.get({__MODULE__, :next, st.n}, st.next) - st.n
         {:ok, _} = DataAccess.get_event(st.s, lo + :rand.uniform(st.n - 1))
       end},
      {"query_by_process (1,000 hits)",
       fn st ->
         {:ok, l} = DataAccess.query_by_process(st.s, sparse, limit: 1000)
         l
       end},
      {"query_by_time_range (1,000 events)",
       fn st ->
         hi = :persistent_term.get({__MODULE__, :next, st.n}, st.next) - 1
         t0 = (hi - st.n + :rand.uniform(st.n - 1000)) * @step
         {:ok, l} = DataAccess.query_by_time_range(st.s, t0, t0 + 999 * @step, limit: 1000)
         1000 = length(l)
       end},
      {"query_by_function (1,000 hits)",
       fn st ->
         {:ok, l} = DataAccess.query_by_function(st.s, ScaleBench.M, @sparse_fn, limit: 1000)
         l
       end}
    ]

    lat =
      for _ <- 1..samples, st <- stores, {name, q} <- queries, reduce: %{} do
        acc ->
          t0 = System.monotonic_time(:nanosecond)
          for _ <- 1..ops, do: q.(st)
          us = (System.monotonic_time(:nanosecond) - t0) / ops / 1000
          Map.update(acc, {name, st.n}, [us], &[us | &1])
      end

    med = fn l -> Harness.stats(l).median end
    first = hd(sizes)
    IO.puts("\nload after sampling: #{load()}\n")
    IO.puts("| figure | " <> Enum.map_join(sizes, " | ", &"#{&1}") <> " | last / first | goal |")
    IO.puts("|---|" <> String.duplicate("---:|", length(sizes)) <> "---:|---|")

    row = fn name, vals, goal, fmt ->
      IO.puts(
        "| #{name} | " <>
          Enum.map_join(vals, " | ", fmt) <>
          " | #{Float.round(List.last(vals) / hd(vals), 2)} | #{goal} |"
      )
    end

    row.("store rate, M events/s", Enum.map(sizes, &(med.(rate[&1]) / 1.0e6)), ">= 0.9", &fmt3/1)

    bytes =
      for st <- stores do
        stats = DataAccess.get_stats(st.s)
        stats.memory_usage / stats.total_events
      end

    row.("bytes per event", bytes, "<= 110 each", &fmt3/1)

    for {name, _} <- queries do
      row.("#{name}, µs", Enum.map(sizes, &med.(lat[{name, &1}])), "<= 1.2", &fmt3/1)
    end

    IO.puts("\n(medians of #{samples} interleaved samples; queries: mean of #{ops} per sample)")
    _ = first

    for st <- Enum.reverse(stores) do
      :erlang.garbage_collect()
      before = rss_mib()
      :ok = DataAccess.destroy(st.s)
      Process.sleep(200)
      IO.puts("destroy #{st.n}: RSS #{round(before)} -> #{round(rss_mib())} MiB")
    end
  end

  defp fmt3(x), do: :erlang.float_to_binary(x / 1, decimals: 3)

  # ---- part ingest ----------------------------------------------------------------

  def ingest_part(events, samples, sleep_ms) do
    IO.puts("\n## Part ingest: ingest rate during call_stat over #{events} events\n")
    driver = spawn(fn -> receive(do: (:go -> ScaleBench.Driver.loop(sleep_ms))) end)

    {:ok, _} =
      ElixirScope.trace(ScaleBench.Work,
        pids: [driver],
        events: [:calls, :returns],
        payload: :arity,
        max_events: 1_000_000_000,
        max_rate: 1_000_000_000,
        max_stored: events,
        ring_size: 1_048_576,
        duration: 3_600_000
      )

    store = ElixirScope.trace_store()
    send(driver, :go)
    wait_full(store, events)
    IO.puts("store full (#{events}); load: #{load()}")

    inserted = fn -> DataAccess.get_stats(store).inserted end

    idle = fn ->
      a = inserted.()
      t0 = System.monotonic_time(:nanosecond)
      Process.sleep(400)
      (inserted.() - a) / ((System.monotonic_time(:nanosecond) - t0) / 1.0e9)
    end

    during = fn ->
      a = inserted.()
      t0 = System.monotonic_time(:nanosecond)
      task = Task.async(fn -> Analysis.call_stat() end)
      [%{count: c}] = Task.await(task, 600_000)
      dt = System.monotonic_time(:nanosecond) - t0
      {(inserted.() - a) / (dt / 1.0e9), dt / 1.0e6, c}
    end

    rows =
      for _ <- 1..samples do
        i = idle.()
        {d, ms, c} = during.()
        {i, d, ms, c}
      end

    send(driver, :stop)
    ElixirScope.stop_trace()
    st = fn l -> Harness.stats(l).median end
    i = st.(Enum.map(rows, &elem(&1, 0)))
    d = st.(Enum.map(rows, &elem(&1, 1)))
    ms = st.(Enum.map(rows, &elem(&1, 2)))

    IO.puts("load after: #{load()}")
    IO.puts("\n| | ingest, events/s | |")
    IO.puts("|---|---:|---|")
    IO.puts("| no query running | #{round(i)} | |")

    IO.puts(
      "| during call_stat (#{Float.round(ms, 1)} ms per pass) | #{round(d)} | #{Float.round(d / i, 2)}x (goal >= 0.7) |"
    )

    IO.puts("\nper sample (idle, during, pass ms, step/1 calls counted):")
    for r <- rows, do: IO.puts("  #{inspect(r)}")
  end

  defp wait_full(store, n) do
    if DataAccess.get_stats(store).total_events < n do
      Process.sleep(100)
      wait_full(store, n)
    end
  end

  def main do
    IO.puts(Harness.machine())
    parts = System.get_env("SCALE_BENCH_PARTS", "store,ingest") |> String.split(",")

    sizes =
      System.get_env("SCALE_BENCH_SIZES", "100000,1000000,10000000")
      |> String.split(",")
      |> Enum.map(&(&1 |> String.trim() |> String.replace("_", "") |> String.to_integer()))

    samples = env_int("BENCH_SAMPLES", 5)
    if "store" in parts, do: store_part(sizes, samples)

    if "ingest" in parts,
      do:
        ingest_part(
          env_int("SCALE_BENCH_PASS_EVENTS", 2_000_000),
          env_int("SCALE_BENCH_PASS_SAMPLES", 5),
          env_int("SCALE_BENCH_BURST_SLEEP_MS", 0)
        )
  end
end

ScaleBench.main()

# The native pipeline end to end, beside a pure-Elixir GenServer+ETS
# pipeline doing the same correlation and indexing
# (bench/baseline/baseline_pipeline.ex), measured in the same run.
#
#   mix run bench/pipeline_bench.exs
#
# Environment: BENCH_EVENTS (end-to-end events, default 1_200_000),
# BENCH_PRODUCERS (default 4), BENCH_WORKERS (native workers, default 2),
# BENCH_RUNS (default 3), BENCH_QUERY_SIZES (default "100000,1000000"),
# BENCH_SECTIONS (default "1,2,3,4,5"), BENCH_SKIP_BASELINE=1.
#
# Sections:
#   1. end-to-end sustained events/s, N producer processes → queryable
#      (flush returned), zero loss checked;
#   2. write → queryable latency p50/p99 at a paced 1M events/s;
#   3. bytes per stored event;
#   4. query latencies at 100k and 1M stored;
#   5. store rate with the store full at 100k vs at 1M (steady eviction).
Code.require_file("support/harness.exs", __DIR__)
Code.require_file("baseline/baseline_pipeline.ex", __DIR__)

defmodule ElixirScope.Bench.Pipeline do
  import Bitwise, only: [<<<: 2]
  alias ElixirScope.Bench.{BaselinePipeline, Harness}
  alias ElixirScope.Capture.{Ingestor, PipelineManager}
  alias ElixirScope.{Analysis, Native}
  alias ElixirScope.Storage.{DataAccess, QueryCoordinator}

  defdelegate env_int(name, default), to: ElixirScope.Bench.Harness

  # ---- workloads -------------------------------------------------------------

  # One round = 6 events: call, nested call, send to self, receive, return,
  # return (properly nested, unique correlation ids). A write refused by a
  # full ring (`{:error, :buffer_full}`) is retried after sleeping 1 ms:
  # the producer is slowed down, nothing is lost (refusals are counted in
  # the pipeline's `buffer_full`).
  def ours_rounds(_buf, _me, 0, _k), do: :ok

  def ours_rounds(buf, me, n, k) do
    call(buf, Bench.Worker, :handle, [k, :req], me, k)
    call(buf, Bench.Worker, :compute, [k], me, -k)
    msg = {:result, k}
    send_(buf, me, me, msg)
    recv(buf, me, msg)
    ret(buf, {:ok, k}, 100, -k)
    ret(buf, :done, 200, k)
    ours_rounds(buf, me, n - 1, k + 1)
  end

  # One function per event kind, retrying after 1 ms while the shard is
  # full (no closure per event: the producer's own cost stays minimal).
  def call(buf, m, f, a, me, c) do
    case Ingestor.ingest_function_call(buf, m, f, a, me, c) do
      :ok -> :ok
      {:error, :buffer_full} -> backoff(fn -> call(buf, m, f, a, me, c) end)
    end
  end

  def ret(buf, v, d, c) do
    case Ingestor.ingest_function_return(buf, v, d, c) do
      :ok -> :ok
      {:error, :buffer_full} -> backoff(fn -> ret(buf, v, d, c) end)
    end
  end

  def send_(buf, from, to, msg) do
    case Ingestor.ingest_message_send(buf, from, to, msg) do
      :ok -> :ok
      {:error, :buffer_full} -> backoff(fn -> send_(buf, from, to, msg) end)
    end
  end

  def recv(buf, me, msg) do
    case Ingestor.ingest_message_receive(buf, me, msg) do
      :ok -> :ok
      {:error, :buffer_full} -> backoff(fn -> recv(buf, me, msg) end)
    end
  end

  # Back off without burning the CPU the workers need.
  def backoff(retry) do
    Process.sleep(1)
    retry.()
  end

  # The same events for the baseline, handed over 100 rounds per cast (its
  # faster mode).
  def base_rounds(_p, _me, 0, _k, _id), do: :ok

  def base_rounds(p, me, n, k, id) do
    r = min(n, 100)

    evs =
      for j <- 0..(r - 1), reduce: [] do
        acc ->
          kk = k + j
          i = id + j * 6

          [
            {:return, i + 5, me, :done, kk},
            {:return, i + 4, me, {:ok, kk}, -kk},
            {:receive, i + 3, me, {:result, kk}},
            {:send, i + 2, me, me, {:result, kk}},
            {:call, i + 1, me, Bench.Worker, :compute, [kk], -kk},
            {:call, i, me, Bench.Worker, :handle, [kk, :req], kk} | acc
          ]
      end

    :ok = BaselinePipeline.ingest_batch(p, Enum.reverse(evs))
    base_rounds(p, me, n - r, k + r, id + r * 6)
  end

  def start_ours(opts) do
    defaults = [
      name: nil,
      shards: 16,
      ring_size: 65_536,
      async_writer_pool_size: env_int("BENCH_WORKERS", 2),
      batch_size: 1000,
      flush_interval_us: 200,
      max_events: 1_000_000,
      overflow_strategy: :drop_newest,
      max_event_bytes: 512
    ]

    {:ok, pm} = PipelineManager.start_link(Keyword.merge(defaults, opts))
    Process.unlink(pm)
    pm
  end

  # Runs `producers` processes, each doing `rounds` rounds with `fun`;
  # returns µs until every one finished.
  def run_producers(producers, fun) do
    parent = self()

    pids =
      for i <- 1..producers do
        spawn_link(fn ->
          receive do
            :go -> :ok
          end

          fun.(i)
          send(parent, {:done, self()})
        end)
      end

    t0 = System.monotonic_time(:microsecond)
    Enum.each(pids, &send(&1, :go))
    for p <- pids, do: receive(do: ({:done, ^p} -> :ok))
    t0
  end

  # ---- 1. end to end ---------------------------------------------------------

  def e2e_ours(total, producers, opts \\ []) do
    pm = start_ours(opts)
    buf = PipelineManager.ring_buffer(pm)
    rounds = div(total, 6 * producers)
    :erlang.garbage_collect()

    t0 =
      run_producers(producers, fn i ->
        ours_rounds(buf, self(), rounds, i * 10_000_000)
      end)

    :ok = PipelineManager.flush(pm, 120_000)
    us = System.monotonic_time(:microsecond) - t0
    m = PipelineManager.get_metrics(pm)
    PipelineManager.shutdown(pm)
    n = rounds * 6 * producers
    acc = m.accounting

    unless acc.unaccounted == 0 and acc.in_flight == 0 do
      raise "accounting broken: #{inspect(acc)}"
    end

    unless acc.stored + acc.evicted == n, do: raise("lost events: #{inspect(acc)}")

    %{
      rate: n / us * 1.0e6,
      n: n,
      refused: acc.buffer_full,
      stored: acc.stored,
      evicted: acc.evicted,
      store: m.native.store
    }
  end

  def e2e_base(total, producers, opts \\ []) do
    {:ok, p} = BaselinePipeline.start_link(Keyword.merge([max_events: 1_000_000], opts))
    rounds = div(total, 6 * producers)
    :erlang.garbage_collect()

    t0 =
      run_producers(producers, fn i ->
        base_rounds(p, self(), rounds, i * 10_000_000, i * 100_000_000_000)
      end)

    :ok = BaselinePipeline.flush(p, 600_000)
    us = System.monotonic_time(:microsecond) - t0
    st = BaselinePipeline.stats(p)
    BaselinePipeline.stop(p)
    n = rounds * 6 * producers
    %{rate: n / us * 1.0e6, n: n, stored: st.stored, bytes: st.bytes_per_event}
  end

  def section_e2e(total, producers, runs, skip_base) do
    IO.puts("\n## 1. End to end: #{producers} producers, #{total} events → queryable\n")

    results =
      for r <- 1..runs do
        o = e2e_ours(total, producers)

        b =
          if skip_base,
            do: nil,
            else: e2e_base(min(total, 600_000), producers)

        IO.puts(
          "run #{r}: ours #{fmt_rate(o.rate)} (stored #{o.stored} of #{o.n}, " <>
            "writes refused by a full shard and retried: #{o.refused})" <>
            if(b, do: ", baseline #{fmt_rate(b.rate)}", else: "")
        )

        {o, b}
      end

    ours = median(Enum.map(results, fn {o, _} -> o.rate end))
    IO.puts("\n| pipeline | median events/s | runs |")
    IO.puts("|---|---:|---|")
    IO.puts("| ours (Ingestor → native pipeline) | #{fmt_rate(ours)} | #{runs} |")

    unless skip_base do
      base = median(Enum.map(results, fn {_, b} -> b.rate end))
      IO.puts("| baseline (GenServer + ETS, batched casts) | #{fmt_rate(base)} | #{runs} |")
      IO.puts("\nratio ours / baseline: #{Float.round(ours / base, 1)}×")
    end

    {o, _} = List.last(results)
    o
  end

  # ---- 2. latency at a paced rate -------------------------------------------

  def paced(rate, seconds, producers, write_fun) do
    # Every producer writes `per_tick` rounds every millisecond.
    per_tick = max(div(rate, 1000 * producers * 6), 1)
    ticks = seconds * 1000

    t0 =
      run_producers(producers, fn i ->
        start = System.monotonic_time(:microsecond)

        Enum.each(0..(ticks - 1), fn t ->
          write_fun.(per_tick, i * 100_000_000 + t * per_tick)
          target = start + (t + 1) * 1000
          wait = target - System.monotonic_time(:microsecond)
          if wait > 1000, do: Process.sleep(div(wait, 1000))
        end)
      end)

    elapsed = System.monotonic_time(:microsecond) - t0
    {per_tick * 6 * producers * ticks, elapsed}
  end

  def section_latency(skip_base) do
    IO.puts("\n## 2. Write → queryable latency at a paced 1M events/s (2 s)\n")
    pm = start_ours([])
    buf = PipelineManager.ring_buffer(pm)
    # warm up, then measure from a clean histogram
    paced(200_000, 1, 2, fn r, k -> ours_rounds(buf, self(), r, k) end)
    :ok = PipelineManager.flush(pm)
    ElixirScope.Native.pipe_reset_latency(PipelineManager.handles(pm).pipe)
    {n, us} = paced(1_000_000, 2, 2, fn r, k -> ours_rounds(buf, self(), r, k) end)
    :ok = PipelineManager.flush(pm)
    lat = PipelineManager.get_metrics(pm).latency
    PipelineManager.shutdown(pm)

    IO.puts("| pipeline | offered events/s | p50 | p99 | samples |")
    IO.puts("|---|---:|---:|---:|---:|")

    IO.puts(
      "| ours | #{fmt_rate(n / us * 1.0e6)} | #{fmt_us(lat.p50_ns)} | #{fmt_us(lat.p99_ns)} | #{lat.samples} |"
    )

    unless skip_base do
      {:ok, p} = BaselinePipeline.start_link(max_events: 1_000_000)

      {n, us} = paced(1_000_000, 1, 2, fn r, k -> base_rounds(p, self(), r, k, k * 6) end)

      :ok = BaselinePipeline.flush(p, 600_000)
      st = BaselinePipeline.stats(p)
      BaselinePipeline.stop(p)

      IO.puts(
        "| baseline (1 s) | #{fmt_rate(n / us * 1.0e6)} | #{fmt_us(st.latency_p50_ns)} | #{fmt_us(st.latency_p99_ns)} | #{st.latency.samples} |"
      )
    end
  end

  # ---- 3. bytes per event ----------------------------------------------------

  def section_bytes(o, skip_base) do
    IO.puts("\n## 3. Bytes per stored event (#{o.stored} stored)\n")
    s = o.store
    headers = (s.memory_bytes - s.payload_bytes) / max(s.total_events, 1)
    all = s.memory_bytes / max(s.total_events, 1)
    IO.puts("| store | bytes/event without payload | with payload |")
    IO.puts("|---|---:|---:|")
    IO.puts("| ours | #{round(headers)} | #{round(all)} |")

    unless skip_base do
      b = e2e_base(300_000, 2)
      IO.puts("| baseline (ETS, all tables) | – | #{round(b.bytes)} |")
    end
  end

  # ---- 4. queries --------------------------------------------------------------

  # `size` events from size/1000 processes, 1000 each: 100 rounds of 5
  # nested calls and their 5 returns; functions spread so each has ~1000
  # hits.
  def fill_ours(size) do
    pm = start_ours(max_events: size, ring_size: 65_536)
    buf = PipelineManager.ring_buffer(pm)
    procs = div(size, 1000)
    funs = List.to_tuple(for i <- 0..(procs - 1), do: :"f#{i}")
    run_producers(procs, fn pi -> fill_proc(buf, self(), funs, pi - 1) end)
    :ok = PipelineManager.flush(pm, 120_000)
    pm
  end

  def fill_proc(buf, me, funs, pi) do
    n = tuple_size(funs)

    for r <- 0..99 do
      for d <- 0..4 do
        f = elem(funs, rem(pi * 100 + r * 5 + d, n))
        call(buf, Bench.Q, f, [d], me, {r, d})
      end

      for d <- 4..0//-1 do
        ret(buf, d, 1, {r, d})
      end
    end
  end

  def fill_base(size) do
    {:ok, p} = BaselinePipeline.start_link(max_events: size)
    procs = div(size, 1000)
    funs = List.to_tuple(for i <- 0..(procs - 1), do: :"f#{i}")
    n = tuple_size(funs)

    run_producers(procs, fn pi ->
      me = self()

      evs =
        for r <- 0..99, reduce: [] do
          acc ->
            base = pi * 1_000_000 + r * 10

            calls =
              for d <- 0..4 do
                f = elem(funs, rem((pi - 1) * 100 + r * 5 + d, n))
                {:call, base + d, me, Bench.Q, f, [d], {r, d}}
              end

            rets = for d <- 4..0//-1, do: {:return, base + 9 - d, me, d, {r, d}}
            Enum.reverse(calls ++ rets, acc)
        end

      :ok = BaselinePipeline.ingest_batch(p, Enum.reverse(evs))
    end)

    :ok = BaselinePipeline.flush(p, 600_000)
    p
  end

  def section_queries(sizes, skip_base) do
    IO.puts(
      "\n## 4. Query latency (µs, median of 30 in a fresh process; results are decoded events)\n"
    )

    IO.puts(
      "`before #15`: the same query through the dirty-scheduler NIF alone with the " <>
        "VM building every struct map (`enif_make_map_from_arrays`), as before #15, " <>
        "interleaved with ours in the same run (median of 3 rounds of both).\n"
    )

    IO.puts("| stored | query | ours | result events/s | before #15 | baseline |")
    IO.puts("|---:|---|---:|---:|---:|---:|")

    for size <- sizes do
      pm = fill_ours(size)
      store = PipelineManager.data_access(pm)
      st = DataAccess.get_stats(store)
      {:ok, [probe]} = DataAccess.query_by_function(store, Bench.Q, :f0, limit: 1)
      pid = probe.caller_pid
      span = st.newest_timestamp - st.oldest_timestamp
      {:ok, deep} = DataAccess.query_by_process(store, pid, limit: 5)
      # A window holding ~1,000 events, starting at a stored event's time.
      mid = hd(deep).timestamp

      w =
        calibrate(div(span * 1000, st.total_events), fn w ->
          length(elem(DataAccess.query_by_time_range(store, mid, mid + w, limit: 5000), 1))
        end)

      deep_id = List.last(deep).id
      top_id = hd(deep).id

      ours = %{
        "by pid" => fn -> DataAccess.query_by_process(store, pid, limit: 1000) end,
        "time window" => fn ->
          DataAccess.query_by_time_range(store, mid, mid + w, limit: 1000)
        end,
        "by function" => fn -> DataAccess.query_by_function(store, Bench.Q, :f1, limit: 1000) end,
        "causal chain (depth 5)" => fn -> DataAccess.causal_chain(store, deep_id) end
      }

      ref = store.ref

      before = %{
        "by pid" => fn -> Native.store_by_pid(ref, pid, 1000, false) end,
        "time window" => fn -> Native.store_by_time_range(ref, mid, mid + w, 1000, false) end,
        "by function" => fn -> Native.store_by_function(ref, Bench.Q, :f1, 1000, false) end,
        "causal chain (depth 5)" => fn -> Native.store_causal_chain(ref, deep_id) end,
        "QueryCoordinator, pid, as: :event" => fn ->
          Native.qry_query(ref, %{pid: pid}, false, 1000, nil, :event)
        end,
        "QueryCoordinator, pid, as: :correlated" => fn ->
          Native.qry_query(ref, %{pid: pid}, false, 1000, nil, :correlated)
        end,
        "QueryCoordinator, pid, as: :entry" => fn ->
          Native.qry_query(ref, %{pid: pid}, false, 1000, nil, :entry)
        end,
        "Analysis.select, time window" => fn ->
          Native.ana_select_time(ref, mid, -1, nil, nil, nil, 0, mid + w, 1000)
        end,
        "Analysis.range, a depth-0 call" => fn -> Native.ana_range(ref, top_id, 100_000) end,
        "Analysis.traceback, depth 5" => fn -> Native.ana_traceback(ref, deep_id) end
      }

      ours =
        Map.merge(ours, %{
          "QueryCoordinator, pid, as: :event" => fn ->
            QueryCoordinator.query(store, pid: pid, limit: 1000, as: :event)
          end,
          "QueryCoordinator, pid, as: :correlated" => fn ->
            QueryCoordinator.query(store, pid: pid, limit: 1000)
          end,
          "QueryCoordinator, pid, as: :entry" => fn ->
            QueryCoordinator.query(store, pid: pid, limit: 1000, as: :entry)
          end,
          "Analysis.select, time window" => fn ->
            Analysis.select(store: store, from: mid, to: mid + w, limit: 1000)
          end,
          "Analysis.range, a depth-0 call" => fn -> Analysis.range(top_id, store: store) end,
          "Analysis.traceback, depth 5" => fn -> Analysis.traceback(deep_id, store: store) end
        })

      hits = for {k, f} <- ours, into: %{}, do: {k, count_results(f.())}

      base =
        if skip_base do
          %{}
        else
          p = fill_base(size)
          rows = BaselinePipeline.query_by_function(p, Bench.Q, :f0, limit: 1)
          bpid = elem(hd(rows), 2)
          [first | _] = BaselinePipeline.query_by_time_range(p, -(1 <<< 62), 1 <<< 62, limit: 1)

          [last | _] =
            BaselinePipeline.query_by_time_range(p, -(1 <<< 62), 1 <<< 62, limit: 1, order: :desc)

          bspan = elem(last, 1) - elem(first, 1)
          deep_rows = BaselinePipeline.query_by_pid(p, bpid, limit: 5)
          deep = List.last(deep_rows)
          bmid = elem(hd(deep_rows), 1)

          bw =
            calibrate(div(bspan * 1000, size), fn w ->
              length(BaselinePipeline.query_by_time_range(p, bmid, bmid + w, limit: 5000))
            end)

          %{
            "by pid" => fn -> BaselinePipeline.query_by_pid(p, bpid, limit: 1000) end,
            "time window" => fn ->
              BaselinePipeline.query_by_time_range(p, bmid, bmid + bw, limit: 1000)
            end,
            "by function" => fn ->
              BaselinePipeline.query_by_function(p, Bench.Q, :f1, limit: 1000)
            end,
            "causal chain (depth 5)" => fn -> base_chain(p, elem(deep, 0)) end,
            :stop => fn -> BaselinePipeline.stop(p) end
          }
        end

      for q <- [
            "by pid",
            "time window",
            "by function",
            "causal chain (depth 5)",
            "QueryCoordinator, pid, as: :event",
            "QueryCoordinator, pid, as: :correlated",
            "QueryCoordinator, pid, as: :entry",
            "Analysis.select, time window",
            "Analysis.range, a depth-0 call",
            "Analysis.traceback, depth 5"
          ] do
        rounds =
          for _ <- 1..3 do
            Native.debug_shared_struct_keys(false)
            pre = time_us(before[q])
            Native.debug_shared_struct_keys(true)
            {time_us(ours[q]), pre}
          end

        o = median(Enum.map(rounds, &elem(&1, 0)))
        pre = median(Enum.map(rounds, &elem(&1, 1)))
        b = if f = base[q], do: fmt_num(time_us(f)), else: "–"
        rate = fmt_rate(hits[q] / o * 1.0e6)

        IO.puts(
          "| #{size} | #{q} (#{hits[q]} hits) | #{fmt_num(o)} | #{rate} | #{fmt_num(pre)} | #{b} |"
        )
      end

      if stop = base[:stop], do: stop.()
      PipelineManager.shutdown(pm)
    end
  end

  def count_results({:ok, %{events: evs}}), do: length(evs)
  def count_results({evs, _next, _plan, _estimate}), do: length(evs)
  def count_results({:ok, evs}) when is_list(evs), do: length(evs)
  def count_results({evs, _next}) when is_list(evs), do: length(evs)
  def count_results(evs) when is_list(evs), do: length(evs)

  # Adjusts a window width until it holds about 1,000 events.
  def calibrate(w, count, tries \\ 12) do
    c = count.(w)

    cond do
      tries == 0 or c in 950..1050 -> w
      c == 0 -> calibrate(w * 4, count, tries - 1)
      true -> calibrate(max(div(w * 1000, c), 1), count, tries - 1)
    end
  end

  # The baseline's chain: follow parent ids through the main table.
  def base_chain(p, id, acc \\ []) do
    case BaselinePipeline.get_event(p, id) do
      nil ->
        acc

      row ->
        if elem(row, 7) in [nil, 0],
          do: [row | acc],
          else: base_chain(p, elem(row, 7), [row | acc])
    end
  end

  # Median µs of `fun` over 30 calls, in a fresh process (so the bench
  # process's own big heap and garbage do not tax the result's GC).
  # `BENCH_CLOCK=process_cpu`: the CPU time of the whole VM process (every
  # thread: the caller's scheduler and the dirty scheduler a NIF hops to),
  # not the wall clock, which other load on the machine inflates.
  def time_us(fun) do
    parent = self()

    clock =
      if System.get_env("BENCH_CLOCK") == "process_cpu",
        do: &Native.debug_process_cpu_ns/0,
        else: fn -> System.monotonic_time(:nanosecond) end

    spawn_link(fn ->
      for _ <- 1..3, do: fun.()

      samples =
        for _ <- 1..30 do
          t0 = clock.()
          fun.()
          (clock.() - t0) / 1000
        end

      send(parent, {:timed, median(samples)})
    end)

    receive do
      {:timed, us} -> us
    end
  end

  # ---- 5. store rate at 100k vs 1M stored -----------------------------------

  def section_store_rate(producers, skip_base) do
    IO.puts("\n## 5. End-to-end rate with the store full (steady eviction)\n")
    IO.puts("| pipeline | full at 100k | full at 1M | ratio |")
    IO.puts("|---|---:|---:|---:|")
    n = 600_000

    rate = fn max ->
      # Prefill to the bound, then time `n` more events.
      pm = start_ours(max_events: max)
      buf = PipelineManager.ring_buffer(pm)

      run_producers(producers, fn i ->
        ours_rounds(buf, self(), div(max + 6 * producers, 6 * producers), i * 10_000_000)
      end)

      :ok = PipelineManager.flush(pm, 120_000)
      rounds = div(n, 6 * producers)

      t0 = run_producers(producers, fn i -> ours_rounds(buf, self(), rounds, i * 20_000_000) end)

      :ok = PipelineManager.flush(pm, 120_000)
      us = System.monotonic_time(:microsecond) - t0
      PipelineManager.shutdown(pm)
      rounds * 6 * producers / us * 1.0e6
    end

    r = for _ <- 1..3, do: {rate.(100_000), rate.(1_000_000)}
    a = median(Enum.map(r, &elem(&1, 0)))
    b = median(Enum.map(r, &elem(&1, 1)))
    IO.puts("| ours | #{fmt_rate(a)} | #{fmt_rate(b)} | #{Float.round(b / a, 2)}× |")

    unless skip_base do
      brate = fn max ->
        {:ok, p} = BaselinePipeline.start_link(max_events: max)

        run_producers(producers, fn i ->
          base_rounds(p, self(), div(max, 6 * producers) + 1, i, i * 1_000_000_000)
        end)

        :ok = BaselinePipeline.flush(p, 600_000)
        m = 150_000
        rounds = div(m, 6 * producers)

        t0 =
          run_producers(producers, fn i ->
            base_rounds(p, self(), rounds, i, i * 1_000_000_000 + 500_000_000)
          end)

        :ok = BaselinePipeline.flush(p, 600_000)
        us = System.monotonic_time(:microsecond) - t0
        BaselinePipeline.stop(p)
        rounds * 6 * producers / us * 1.0e6
      end

      a = brate.(100_000)
      b = brate.(1_000_000)

      IO.puts(
        "| baseline (1 run) | #{fmt_rate(a)} | #{fmt_rate(b)} | #{Float.round(b / a, 2)}× |"
      )
    end
  end

  # ---- formatting ----------------------------------------------------------------

  def median(xs) do
    s = Enum.sort(xs)
    Enum.at(s, div(length(s) - 1, 2))
  end

  def fmt_rate(r) when r >= 1.0e6, do: "#{Float.round(r / 1.0e6, 2)} M/s"
  def fmt_rate(r), do: "#{round(r / 1000)} k/s"
  def fmt_us(ns), do: "#{Float.round(ns / 1000, 1)} µs"
  def fmt_num(x), do: :erlang.float_to_binary(x / 1, decimals: 1)

  def main do
    total = env_int("BENCH_EVENTS", 1_200_000)
    producers = env_int("BENCH_PRODUCERS", 4)
    runs = env_int("BENCH_RUNS", 3)
    skip_base = System.get_env("BENCH_SKIP_BASELINE") == "1"

    sizes =
      System.get_env("BENCH_QUERY_SIZES", "100000,1000000")
      |> String.split(",", trim: true)
      |> Enum.map(&String.to_integer/1)

    sections =
      System.get_env("BENCH_SECTIONS", "1,2,3,4,5")
      |> String.split(",", trim: true)
      |> Enum.map(&String.to_integer/1)

    IO.puts("# ElixirScope pipeline bench — #{Harness.machine()}")
    IO.puts("# #{DateTime.utc_now() |> DateTime.truncate(:second)}")
    on = &(&1 in sections)
    o = if on.(1) or on.(3), do: section_e2e(total, producers, runs, skip_base)
    if on.(2), do: section_latency(skip_base)
    if on.(3), do: section_bytes(o, skip_base)
    if on.(4), do: section_queries(sizes, skip_base)
    if on.(5), do: section_store_rate(producers, skip_base)
  end
end

unless System.get_env("BENCH_NO_MAIN"), do: ElixirScope.Bench.Pipeline.main()

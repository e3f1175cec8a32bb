# Self-check and throughput figures for the pure-Elixir baseline pipeline
# (bench/baseline/baseline_pipeline.ex). From the project root:
#
#   mix run bench/baseline/baseline_selfcheck.exs
#   elixir bench/baseline/baseline_selfcheck.exs      # same, without compiling the project
#
# Env: BASELINE_PRODUCERS (4), BASELINE_EVENTS (250000 per producer),
#      BASELINE_WORKERS (System.schedulers_online()), BASELINE_ROUNDS (400),
#      BASELINE_RUNS (3 runs per throughput figure), BASELINE_SKIP_BENCH=1 to
#      run only the checks.
Code.require_file("baseline_pipeline.ex", __DIR__)

defmodule ElixirScope.Bench.BaselineSelfcheck do
  import Bitwise
  alias ElixirScope.Bench.BaselinePipeline, as: B

  def check!(true, _msg), do: :ok
  def check!(false, msg), do: raise("baseline self-check failed: " <> msg)

  defp env_int(name, default) do
    case System.get_env(name) do
      nil -> default
      v -> String.to_integer(v)
    end
  end

  ## 1. Correlation: 8 processes, nested calls, messages between them

  def correlation_check do
    nprocs = 8
    rounds = env_int("BASELINE_ROUNDS", 400)
    {:ok, p} = B.start_link(workers: 4, batch_size: 64)
    ids = :atomics.new(1, [])
    me = self()

    procs =
      for i <- 0..(nprocs - 1) do
        spawn_link(fn ->
          receive do
            {:go, pids} -> send(me, {:done, i, self(), producer(p, i, pids, ids, rounds)})
          end
        end)
      end

    pids = List.to_tuple(procs)
    Enum.each(procs, &send(&1, {:go, pids}))

    results =
      for _ <- procs do
        receive do
          {:done, i, pid, res} -> {i, pid, res}
        after
          60_000 -> raise "producer timed out"
        end
      end

    check!(B.flush(p) == :ok, "flush timed out")

    total = results |> Enum.map(fn {_, _, r} -> r.count end) |> Enum.sum()
    exps = Enum.flat_map(results, fn {_, _, r} -> r.exp end)
    sends = results |> Enum.flat_map(fn {_, _, r} -> r.sends end) |> Map.new()
    recvs = Enum.flat_map(results, fn {_, _, r} -> r.recvs end)
    s = B.stats(p)

    # Counts add up.
    check!(s.processed == total, "processed #{s.processed} != ingested #{total}")
    check!(s.stored + s.evicted == total, "stored + evicted != ingested")
    check!(s.evicted == 0 and s.invalid == 0, "unexpected eviction/invalid")

    # Every call / return / state change / send / receive has the expected fields.
    Enum.each(exps, fn {id, want} ->
      row = B.get_event(p, id) |> B.to_map()
      check!(row != nil, "event #{id} missing")

      Enum.each(want, fn {k, v} ->
        check!(
          Map.fetch!(row, k) == v,
          "event #{id}: #{k} = #{inspect(Map.fetch!(row, k))}, want #{inspect(v)}"
        )
      end)
    end)

    # Every receive is linked to its send.
    check!(map_size(sends) == length(recvs), "sends and receives do not pair up")

    Enum.each(recvs, fn {key, rid} ->
      sid = Map.fetch!(sends, key)
      row = B.get_event(p, rid)

      check!(
        elem(row, 6) == sid,
        "receive #{rid} (#{inspect(key)}) linked to #{elem(row, 6)}, want #{sid}"
      )

      got = p |> B.query_by_correlation(sid) |> Enum.map(&elem(&1, 0))
      check!(got == Enum.sort([sid, rid]), "query_by_correlation(#{sid}) = #{inspect(got)}")
    end)

    c = s.correlation
    nrecv = length(recvs)
    check!(c.matched_receives == nrecv, "matched #{c.matched_receives} != #{nrecv}")

    check!(
      c.pending_receives == 0 and c.queued_sends == 0,
      "messages left unmatched: #{inspect(c)}"
    )

    check!(c.unwound_frames == nprocs * rounds, "unwound #{c.unwound_frames}")
    check!(c.unmatched_returns == nprocs * div(rounds, 10), "unmatched #{c.unmatched_returns}")
    check!(c.orphaned_calls == nprocs * 2, "orphaned #{c.orphaned_calls}")

    t = B.tables(p)
    check!(:ets.info(t.stacks, :size) == 0, "call stacks left over")
    check!(:ets.info(t.msg_seq, :size) == 0, "message counters left over")
    check!(:ets.info(t.msg_slots, :size) == 0, "message slots left over")

    for idx <- [:by_pid, :by_time, :by_correlation],
        do: check!(:ets.info(t[idx], :size) == s.stored, "#{idx} size != stored")

    # Queries.
    Enum.each(results, fn {_i, pid, r} ->
      asc = B.query_by_pid(p, pid, limit: :infinity)
      check!(length(asc) == r.count, "query_by_pid count #{length(asc)} != #{r.count}")
      asc_ids = Enum.map(asc, &elem(&1, 0))
      check!(asc_ids == Enum.sort(asc_ids), "query_by_pid not ascending")
      desc_ids = p |> B.query_by_pid(pid, order: :desc, limit: 7) |> Enum.map(&elem(&1, 0))
      check!(desc_ids == asc_ids |> Enum.reverse() |> Enum.take(7), "query_by_pid desc/limit")
      check!(length(B.query_by_pid(p, pid)) == min(1000, r.count), "default limit")
      check!(B.process_parent(p, r.child) == pid, "process tree: parent of spawned child")
    end)

    f3 = B.query_by_function(p, M3, :f3, limit: :infinity)
    check!(length(f3) == 2 * nprocs * rounds, "query_by_function count #{length(f3)}")
    check!(Enum.count(f3, &(elem(&1, 3) == :return)) == nprocs * rounds, "f3 returns")

    all = B.query_by_time_range(p, -(1 <<< 62), 1 <<< 62, limit: :infinity)
    check!(length(all) == total, "time range count #{length(all)} != #{total}")
    keys = Enum.map(all, &{elem(&1, 1), elem(&1, 0)})
    check!(keys == Enum.sort(keys), "time range not in {ts, id} order")
    {ts, id} = Enum.at(keys, div(total, 2))
    one = B.query_by_time_range(p, ts, ts, limit: :infinity) |> Enum.map(&elem(&1, 0))
    check!(id in one, "point time range misses event")

    last5 =
      B.query_by_time_range(p, ts, 1 <<< 62, order: :desc, limit: 5)
      |> Enum.map(&{elem(&1, 1), elem(&1, 0)})

    check!(last5 == keys |> Enum.reverse() |> Enum.take(5), "time range desc/limit")
    check!(B.get_event(p, -1) == nil, "get_event of unknown id")

    B.stop(p)

    IO.puts(
      "correlation check: OK (#{total} events from #{nprocs} processes, #{nrecv} receives linked, " <>
        "#{length(exps)} rows checked; p50/p99 ingest->stored #{fmt_ns(s.latency_p50_ns)}/#{fmt_ns(s.latency_p99_ns)})"
    )
  end

  # One traced process: `rounds` rounds of nested calls and messages; even
  # producers use ingest/2, odd ones ingest_batch/2 (one batch per round).
  defp producer(p, i, pids, ids, rounds) do
    me = self()
    n = tuple_size(pids)
    nid = fn -> :atomics.add_get(ids, 1, 1) end
    batch? = rem(i, 2) == 1
    st = %{count: 0, exp: [], sends: [], recvs: [], buf: []}

    emit = fn st, ev ->
      st = %{st | count: st.count + 1}

      if batch?,
        do: %{st | buf: [ev | st.buf]},
        else:
          (
            B.ingest(p, ev)
            st
          )
    end

    flush_buf = fn st ->
      if batch? and st.buf != [], do: B.ingest_batch(p, Enum.reverse(st.buf))
      %{st | buf: []}
    end

    exp = fn st, id, want -> %{st | exp: [{id, want} | st.exp]} end

    st =
      Enum.reduce(1..rounds, st, fn r, st ->
        [a, b, sc, c, s1, s2, rc, d, e, rd, rb, rcv1, rcv2, ra] = for _ <- 1..14, do: nid.()
        to1 = elem(pids, rem(i + 1, n))
        to2 = elem(pids, rem(i + 3, n))

        st =
          st
          |> emit.({:call, a, me, M1, :f1, [r], {:a, r}})
          |> exp.(a, type: :call, correlation_id: a, parent_id: nil, root_id: a, module: M1)
          |> emit.({:call, b, me, M2, :f2, [], {:b, r}})
          |> exp.(b, correlation_id: b, parent_id: a, root_id: a)
          |> emit.({:state_change, sc, me, r, r + 1})
          |> exp.(sc, type: :state_change, correlation_id: sc, parent_id: b, root_id: a)
          |> emit.({:call, c, me, M3, :f3, [], {:c, r}})
          |> exp.(c, correlation_id: c, parent_id: b, root_id: a)
          |> emit.({:send, s1, me, to1, {:msg, i, r}})
          |> exp.(s1, type: :send, correlation_id: s1, parent_id: c, root_id: a)
          |> emit.({:send, s2, me, to2, :ping})
          |> exp.(s2, correlation_id: s2, parent_id: c, root_id: a)
          |> Map.update!(:sends, &[{{:u, i, r}, s1}, {{:ping, i, r}, s2} | &1])
          |> emit.({:return, rc, me, :ok, {:c, r}})
          |> exp.(rc,
            type: :return,
            correlation_id: c,
            parent_id: b,
            root_id: a,
            module: M3,
            function: :f3
          )
          # d then e; returning d unwinds e.
          |> emit.({:call, d, me, M4, :f4, [], {:d, r}})
          |> emit.({:call, e, me, M5, :f5, [], {:e, r}})
          |> exp.(e, correlation_id: e, parent_id: d, root_id: a)
          |> emit.({:return, rd, me, :ok, {:d, r}})
          |> exp.(rd, correlation_id: d, parent_id: b, root_id: a, module: M4)
          |> emit.({:return, rb, me, :ok, {:b, r}})
          |> exp.(rb, correlation_id: b, parent_id: a, root_id: a)
          # Messages sent to us this round by processes i-1 (unique) and i-3 (:ping).
          |> emit.({:receive, rcv1, me, {:msg, rem(i + n - 1, n), r}})
          |> exp.(rcv1, type: :receive, parent_id: a, root_id: a)
          |> emit.({:receive, rcv2, me, :ping})
          |> exp.(rcv2, parent_id: a, root_id: a)
          |> Map.update!(
            :recvs,
            &[{{:u, rem(i + n - 1, n), r}, rcv1}, {{:ping, rem(i + n - 3, n), r}, rcv2} | &1]
          )
          |> emit.({:return, ra, me, :ok, {:a, r}})
          |> exp.(ra, correlation_id: a, parent_id: nil, root_id: a, module: M1)

        st =
          if rem(r, 10) == 0 do
            u = nid.()

            st
            |> emit.({:return, u, me, :stray, :no_such_call})
            |> exp.(u, correlation_id: u, parent_id: nil, root_id: nil, module: nil)
          else
            st
          end

        flush_buf.(st)
      end)

    child = spawn(fn -> :ok end)
    [sp, x, y, ex] = for _ <- 1..4, do: nid.()

    st
    |> emit.({:spawn, sp, me, child})
    |> exp.(sp, type: :spawn, pid: me, payload: child, parent_id: nil)
    |> emit.({:call, x, me, M6, :f6, [], :x})
    |> emit.({:call, y, me, M6, :f6, [], :y})
    |> emit.({:exit, ex, me, :normal})
    |> exp.(ex, type: :exit, correlation_id: ex, payload: :normal)
    |> flush_buf.()
    |> Map.put(:child, child)
  end

  ## 2. max_events eviction

  def eviction_check do
    # Exact: one producer, one worker: the survivors are the newest events.
    {:ok, p} = B.start_link(workers: 1, max_events: 1000, batch_size: 100)
    for id <- 1..5000, do: B.ingest(p, {:state_change, id, self(), id, id + 1})
    check!(B.flush(p) == :ok, "flush")
    s = B.stats(p)
    check!(s.stored == 1000 and s.evicted == 4000, "exact eviction: #{s.stored}/#{s.evicted}")
    ids = p |> B.query_by_pid(self(), limit: :infinity) |> Enum.map(&elem(&1, 0))
    check!(ids == Enum.to_list(4001..5000), "survivors are not the newest 1000")

    check!(
      B.get_event(p, 4000) == nil and B.get_event(p, 4001) != nil,
      "get_event after eviction"
    )

    consistent!(p, 1000)
    B.stop(p)

    # Concurrent: 4 producers x 4 workers, mixed events with cross-producer
    # messages (links racing evictions).
    {:ok, p} = B.start_link(workers: 4, max_events: 5000, batch_size: 100)
    n = run_producers(p, 4, 10_000, false)
    check!(B.flush(p) == :ok, "flush")
    s = B.stats(p)
    check!(s.stored + s.evicted == n and s.processed == n, "stored + evicted != ingested")
    check!(s.stored == 5000, "concurrent eviction left #{s.stored} events")
    consistent!(p, 5000)
    B.stop(p)

    IO.puts(
      "eviction check: OK (exact newest-1000 of 5000; 4x4 concurrent: #{n} in, 5000 kept, indexes consistent)"
    )
  end

  # Every index entry points at a stored row, and every row is indexed.
  defp consistent!(p, stored) do
    t = B.tables(p)
    check!(:ets.info(t.main, :size) == stored, "main size")

    for {idx, id_of} <- [
          by_pid: fn {_, id} -> id end,
          by_time: fn {_, id} -> id end,
          by_correlation: fn {_, id} -> id end,
          by_function: fn {_, id} -> id end
        ] do
      keys = :ets.select(t[idx], [{{:"$1"}, [], [:"$1"]}])

      Enum.each(keys, fn k ->
        check!(:ets.member(t.main, id_of.(k)), "#{idx}: dangling #{inspect(k)}")
      end)

      if idx != :by_function,
        do: check!(length(keys) == stored, "#{idx} has #{length(keys)} entries")
    end

    :ets.foldl(
      fn {id, ts, pid, _, m, f, corr, _, _, _}, :ok ->
        check!(
          :ets.member(t.by_time, {ts, id}) and :ets.member(t.by_pid, {pid, id}) and
            :ets.member(t.by_correlation, {corr, id}),
          "row #{id} not fully indexed"
        )

        if m != nil,
          do: check!(:ets.member(t.by_function, {{m, f}, id}), "row #{id} not in by_function")

        :ok
      end,
      :ok,
      t.main
    )
  end

  ## 3. Throughput: N producers x M events of a mixed workload

  # Each producer simulates 8 traced processes. A 10-event cycle: call a,
  # call b, state change, send to the same-index process of the next
  # producer, return b, receive (the previous producer's send), a local
  # send + receive pair, state change, return a.
  def workload(pi, nprod, count) do
    fakes = for q <- 0..7, do: fake_pid(pi, q)
    nexts = for q <- 0..7, do: fake_pid(rem(pi + 1, nprod), q)
    fakes = List.to_tuple(fakes)
    nexts = List.to_tuple(nexts)
    prev = rem(pi + nprod - 1, nprod)
    cycles = div(count, 10)

    Enum.flat_map(0..(cycles - 1)//1, fn k ->
      q = rem(k, 8)
      me = elem(fakes, q)
      peer = elem(fakes, rem(q + 1, 8))
      base = k * 10 * nprod + pi

      id = fn j -> base + j * nprod end

      [
        {:call, id.(0), me, MyApp.Worker, :handle, [k, :two, "three"], {:a, k}},
        {:call, id.(1), me, MyApp.Repo, :get, [MyApp.User, k], {:b, k}},
        {:state_change, id.(2), me, %{n: k}, %{n: k + 1}},
        {:send, id.(3), me, elem(nexts, q), {:work, pi, k}},
        {:return, id.(4), me, {:ok, k}, {:b, k}},
        {:receive, id.(5), me, {:work, prev, k}},
        {:send, id.(6), me, peer, {:local, k}},
        {:receive, id.(7), peer, {:local, k}},
        {:state_change, id.(8), me, %{n: k + 1}, %{n: k + 2}},
        {:return, id.(9), me, :ok, {:a, k}}
      ]
    end)
  end

  defp fake_pid(pi, q), do: :erlang.list_to_pid(~c"<0.#{30_000 + pi * 8 + q}.0>")

  # Spawns the producers with their events pre-built, releases them together
  # and returns the number of events (optionally the time the last producer
  # finished ingesting).
  def run_producers(p, nprod, per, batch, with_times \\ false) do
    me = self()

    procs =
      for pi <- 0..(nprod - 1) do
        spawn_link(fn ->
          evs = workload(pi, nprod, per)
          chunks = if batch, do: Enum.chunk_every(evs, batch), else: nil
          send(me, {:ready, self(), length(evs)})

          receive do
            :go -> :ok
          end

          if batch,
            do: Enum.each(chunks, &B.ingest_batch(p, &1)),
            else: Enum.each(evs, &B.ingest(p, &1))

          send(me, {:ingested, self(), System.monotonic_time(:nanosecond)})
        end)
      end

    n =
      Enum.reduce(procs, 0, fn pr, acc ->
        receive do
          {:ready, ^pr, k} -> acc + k
        end
      end)

    :erlang.garbage_collect()
    t0 = System.monotonic_time(:nanosecond)
    Enum.each(procs, &send(&1, :go))

    t_ing =
      Enum.reduce(procs, t0, fn pr, acc ->
        receive do
          {:ingested, ^pr, t} -> max(acc, t)
        end
      end)

    if with_times, do: {n, t0, t_ing}, else: n
  end

  def throughput(label, nprod, per, workers, batch) do
    {:ok, p} = B.start_link(workers: workers)
    {n, t0, t_ing} = run_producers(p, nprod, per, batch, true)
    check!(B.flush(p, 300_000) == :ok, "flush timed out")
    t1 = System.monotonic_time(:nanosecond)
    s = B.stats(p)
    check!(s.processed == n and s.stored + s.evicted == n, "throughput run lost events")

    check!(
      s.correlation.pending_receives == 0 and s.correlation.queued_sends == 0,
      "unmatched messages"
    )

    B.stop(p)

    rate = fn t -> "#{round(n / ((t - t0) / 1.0e9))}" |> String.pad_leading(8) end

    IO.puts(
      "  #{String.pad_trailing(label, 26)} #{rate.(t1)} ev/s end-to-end (producers done at " <>
        "#{String.trim(rate.(t_ing))} ev/s), #{s.bytes_per_event} B/stored event, " <>
        "ingest->stored p50 #{fmt_ns(s.latency_p50_ns)} p99 #{fmt_ns(s.latency_p99_ns)} " <>
        "max #{fmt_ns(s.latency.max_ns)}, per-worker split #{inspect(s.ingested_per_worker)}"
    )

    %{rate: n / ((t1 - t0) / 1.0e9), bytes_per_event: s.bytes_per_event}
  end

  # Latency below saturation: each producer ingests 10 events per ms.
  def paced_latency(nprod, per, workers) do
    {:ok, p} = B.start_link(workers: workers)
    me = self()

    procs =
      for pi <- 0..(nprod - 1) do
        spawn_link(fn ->
          chunks = pi |> workload(nprod, per) |> Enum.chunk_every(10)
          send(me, {:ready, self()})

          receive do
            :go -> :ok
          end

          Enum.each(chunks, fn c ->
            Enum.each(c, &B.ingest(p, &1))
            Process.sleep(1)
          end)

          send(me, {:ingested, self()})
        end)
      end

    for pr <- procs, do: receive(do: ({:ready, ^pr} -> :ok))
    t0 = System.monotonic_time(:nanosecond)
    Enum.each(procs, &send(&1, :go))
    for pr <- procs, do: receive(do: ({:ingested, ^pr} -> :ok))
    t1 = System.monotonic_time(:nanosecond)
    check!(B.flush(p) == :ok, "flush")
    s = B.stats(p)
    B.stop(p)

    IO.puts(
      "  paced (10 ev, sleep 1ms)    #{round(s.processed / ((t1 - t0) / 1.0e9))} ev/s offered: " <>
        "ingest->stored p50 #{fmt_ns(s.latency_p50_ns)} p99 #{fmt_ns(s.latency_p99_ns)} max #{fmt_ns(s.latency.max_ns)}"
    )
  end

  def bench do
    nprod = env_int("BASELINE_PRODUCERS", 4)
    per = env_int("BASELINE_EVENTS", 250_000)
    workers = env_int("BASELINE_WORKERS", System.schedulers_online())

    IO.puts(
      "throughput: #{nprod} producers x #{per} events, #{workers} workers, " <>
        "#{System.schedulers_online()} schedulers, OTP #{System.otp_release()}"
    )

    runs = env_int("BASELINE_RUNS", 3)

    for {label, batch} <- [{"ingest/2 (one cast/event)", nil}, {"ingest_batch/2 (100/cast)", 100}] do
      rates = for _ <- 1..runs, do: throughput(label, nprod, per, workers, batch).rate
      sorted = Enum.sort(rates)

      IO.puts(
        "  => #{label}: median #{round(Enum.at(sorted, div(runs, 2)))} ev/s, " <>
          "best #{round(List.last(sorted))} ev/s over #{runs} runs"
      )
    end

    paced_latency(nprod, 20_000, workers)
  end

  defp fmt_ns(nil), do: "-"
  defp fmt_ns(ns) when ns >= 1_000_000_000, do: "#{Float.round(ns / 1.0e9, 2)}s"
  defp fmt_ns(ns) when ns >= 1_000_000, do: "#{Float.round(ns / 1.0e6, 1)}ms"
  defp fmt_ns(ns) when ns >= 1_000, do: "#{Float.round(ns / 1.0e3, 1)}us"
  defp fmt_ns(ns), do: "#{ns}ns"
end

alias ElixirScope.Bench.BaselineSelfcheck, as: Check

Check.correlation_check()
Check.eviction_check()
if System.get_env("BASELINE_SKIP_BENCH") != "1", do: Check.bench()

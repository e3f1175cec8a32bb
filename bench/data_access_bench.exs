# DataAccess small writes and cleanup, beside the paths and the scheme they
# replace, measured in the same run.
#
#   mix run bench/data_access_bench.exs
#
# Environment: BENCH_N (events per sample in 1, default 2000),
# BENCH_SAMPLES (default 9), BENCH_CALLS (calls in 2, default 2000),
# BENCH_CLEANUP_EVENTS (events stored in 3, default 50000). Events come
# from 64 processes (the original's :bag indexes slow down with many
# objects under one key; that is not what is measured here).
#
# 1. store_event/2 per call: ours (the caller's scheduler when the lock is
#    free) beside the dirty-scheduler NIF alone (what every write used
#    before) and the original's scheme (ETS: a :set and four index tables).
# 2. Latency of one store_events/2 call of 10 events made every 1 ms (a
#    dirty scheduler thread sleeps between calls and must be woken):
#    p50/p90/p99/max, ours beside the dirty NIF alone.
# 3. cleanup_old_events/2 of the older half of the stored events:
#    time and memory before/after, beside ETS doing the same.
Code.require_file("support/harness.exs", __DIR__)

defmodule ElixirScope.Bench.DataAccessBench do
  alias ElixirScope.Bench.Harness
  alias ElixirScope.Events.FunctionExecution
  alias ElixirScope.Native
  alias ElixirScope.Storage.DataAccess

  defdelegate env_int(name, default), to: Harness

  def event(i, ts) do
    %FunctionExecution{
      id: i,
      timestamp: ts,
      wall_time: 0,
      module: Bench.M,
      function: :f,
      arity: 2,
      args: [i, "some argument"],
      caller_pid: elem(:persistent_term.get({__MODULE__, :pids}), rem(i, 64)),
      correlation_id: i,
      event_type: :call
    }
  end

  # The original's scheme: the event by id, and index tables by time,
  # process, function and correlation.
  def ets_new do
    %{
      primary: :ets.new(:primary, [:set, :public]),
      temporal: :ets.new(:temporal, [:ordered_set, :public]),
      process: :ets.new(:process, [:bag, :public]),
      function: :ets.new(:function, [:bag, :public]),
      correlation: :ets.new(:correlation, [:bag, :public])
    }
  end

  def ets_store(t, e) do
    :ets.insert(t.primary, {e.id, e})
    :ets.insert(t.temporal, {{e.timestamp, e.id}, e.id})
    :ets.insert(t.process, {e.caller_pid, e.id})
    :ets.insert(t.function, {{e.module, e.function}, e.id})
    :ets.insert(t.correlation, {e.correlation_id, e.id})
  end

  def ets_memory(t),
    do: Enum.sum(for {_, tab} <- t, do: :ets.info(tab, :memory)) * :erlang.system_info(:wordsize)

  def ets_cleanup(t, cutoff) do
    old = :ets.select(t.temporal, [{{{:"$1", :"$2"}, :_}, [{:<, :"$1", cutoff}], [:"$2"]}])

    for id <- old do
      [{^id, e}] = :ets.lookup(t.primary, id)
      :ets.delete(t.primary, id)
      :ets.delete(t.temporal, {e.timestamp, id})
      :ets.delete_object(t.process, {e.caller_pid, id})
      :ets.delete_object(t.function, {{e.module, e.function}, id})
      :ets.delete_object(t.correlation, {e.correlation_id, id})
    end

    length(old)
  end

  # The dirty-scheduler NIF alone, with the header DataAccess computes.
  def dirty_put(store, e),
    do:
      Native.store_put(store.ref, e.id, e.timestamp, e.caller_pid, e.module, e.function, e.id, e)

  def dirty_put_batch(store, es),
    do:
      Native.store_put_batch(
        store.ref,
        for(e <- es, do: {e.id, e.timestamp, e.caller_pid, e.module, e.function, e.id, e})
      )

  defp pct(sorted, p), do: Enum.at(sorted, min(length(sorted) - 1, round(length(sorted) * p)))

  def run do
    IO.puts("# DataAccess bench — #{Harness.machine()}")
    {load, _} = System.cmd("cat", ["/proc/loadavg"])
    IO.puts("# load average: #{String.trim(load)}")
    pids = for _ <- 1..64, do: spawn(fn -> Process.sleep(:infinity) end)
    :persistent_term.put({__MODULE__, :pids}, List.to_tuple(pids))
    n = env_int("BENCH_N", 2000)
    samples = env_int("BENCH_SAMPLES", 9)

    # ---- 1 ----------------------------------------------------------------
    fresh = fn -> elem(DataAccess.new(max_events: 1_000_000), 1) end

    results =
      Harness.run(
        [
          %{
            name: "ours: store_event/2",
            n: n,
            setup: fresh,
            run: fn s -> for i <- 1..n, do: :ok = DataAccess.store_event(s, event(i, i)) end
          },
          %{
            name: "dirty NIF alone (before)",
            n: n,
            setup: fresh,
            run: fn s -> for i <- 1..n, do: :ok = dirty_put(s, event(i, i)) end
          },
          %{
            name: "original's scheme (5 ETS tables)",
            n: n,
            setup: &ets_new/0,
            run: fn t -> for i <- 1..n, do: ets_store(t, event(i, i)) end
          }
        ],
        samples: samples
      )

    Harness.print_table("1. store one event (#{n} per sample)", results, [
      "ours: store_event/2",
      "dirty NIF alone (before)",
      "original's scheme (5 ETS tables)"
    ])

    # ---- 2 ----------------------------------------------------------------
    calls = env_int("BENCH_CALLS", 2000)
    {:ok, a} = DataAccess.new()
    {:ok, b} = DataAccess.new()

    lat =
      for k <- 1..calls, reduce: %{ours: [], dirty: []} do
        acc ->
          es = for i <- 1..10, do: event(k * 100 + i, k)
          {t1, {:ok, 10}} = :timer.tc(fn -> DataAccess.store_events(a, es) end)
          Process.sleep(1)
          {t2, :ok} = :timer.tc(fn -> dirty_put_batch(b, es) end)
          Process.sleep(1)
          %{acc | ours: [t1 | acc.ours], dirty: [t2 | acc.dirty]}
      end

    IO.puts("\n## 2. one store_events/2 of 10 events every 1 ms (#{calls} calls each, µs)\n")
    IO.puts("| path | p50 | p90 | p99 | max |")
    IO.puts("|---|---:|---:|---:|---:|")

    for {name, key} <- [{"ours", :ours}, {"dirty NIF alone (before)", :dirty}] do
      s = Enum.sort(lat[key])

      IO.puts("| #{name} | #{pct(s, 0.5)} | #{pct(s, 0.9)} | #{pct(s, 0.99)} | #{List.last(s)} |")
    end

    # ---- 3 ----------------------------------------------------------------
    total = env_int("BENCH_CLEANUP_EVENTS", 50_000)
    events = for i <- 1..total, do: event(i, i)
    {:ok, s} = DataAccess.new()
    {:ok, ^total} = DataAccess.store_events(s, events)
    t = ets_new()
    Enum.each(events, &ets_store(t, &1))

    before_ours = DataAccess.get_stats(s).memory_usage

    {us_ours, {:ok, removed}} =
      :timer.tc(fn -> DataAccess.cleanup_old_events(s, div(total, 2) + 1) end)

    after_ours = DataAccess.get_stats(s)

    before_ets = ets_memory(t)
    {us_ets, removed_ets} = :timer.tc(fn -> ets_cleanup(t, div(total, 2) + 1) end)
    after_ets = ets_memory(t)

    mb = fn b -> :erlang.float_to_binary(b / 1_048_576, decimals: 1) end
    IO.puts("\n## 3. cleanup_old_events/2 of the older half of #{total} events\n")
    IO.puts("| store | removed | time ms | memory before MiB | after MiB |")
    IO.puts("|---|---:|---:|---:|---:|")

    IO.puts(
      "| ours | #{removed} | #{Float.round(us_ours / 1000, 1)} | #{mb.(before_ours)} | " <>
        "#{mb.(after_ours.memory_usage)} (reclaimed #{mb.(after_ours.reclaimed_bytes)}, " <>
        "#{after_ours.compactions} compactions) |"
    )

    IO.puts(
      "| original's scheme (ETS) | #{removed_ets} | #{Float.round(us_ets / 1000, 1)} | " <>
        "#{mb.(before_ets)} | #{mb.(after_ets)} |"
    )
  end
end

ElixirScope.Bench.DataAccessBench.run()

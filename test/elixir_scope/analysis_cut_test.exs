defmodule ElixirScope.AnalysisCutTest.Work do
  @moduledoc false
  def step(x), do: x + 1

  # Calls step/1 in bursts until told to stop.
  def run(i) do
    receive do
      :stop -> i
    after
      0 ->
        Enum.each(1..200, &step/1)
        Process.sleep(1)
        run(i + 1)
    end
  end
end

defmodule ElixirScope.AnalysisCutTest do
  # Whole-trace passes run over a consistent cut without the store lock:
  # while the trace keeps ingesting, a pass answers exactly what the same
  # pass over the events up to its cut answers.
  use ExUnit.Case, async: false

  alias ElixirScope.Analysis
  alias ElixirScope.AnalysisCutTest.Work
  alias ElixirScope.Native
  alias ElixirScope.Storage.DataAccess

  setup do
    on_exit(fn -> ElixirScope.stop_trace() end)
    :ok
  end

  defp stored(store), do: DataAccess.get_stats(store).total_events

  defp wait_for(store, n, tries \\ 2_000) do
    cond do
      stored(store) >= n -> :ok
      tries == 0 -> flunk("the trace stored only #{stored(store)} events")
      true -> Process.sleep(5) && wait_for(store, n, tries - 1)
    end
  end

  test "call_stat and select during ingest equal the passes over their cut" do
    worker = spawn(fn -> receive(do: (:go -> Work.run(0))) end)

    {:ok, _} =
      ElixirScope.trace(Work,
        pids: [worker],
        events: [:calls, :returns],
        payload: :arity,
        max_events: 5_000_000,
        max_rate: 100_000_000,
        duration: 120_000
      )

    send(worker, :go)
    store = ElixirScope.trace_store()
    wait_for(store, 20_000)

    # While the worker goes on being traced.
    {stats, scanned, 0} = Native.ana_call_stats(store.ref, :function, [])
    cut = Analysis.select(limit: 100_000_000)
    wait_for(store, length(cut) + 1_000)
    send(worker, :stop)
    ElixirScope.stop_trace()

    # Nothing was evicted (max_events is far above what was stored), so
    # the cut of each pass is a prefix of the store order.
    all = Analysis.select(limit: 100_000_000)
    assert length(all) > length(cut) and length(cut) >= scanned
    assert Enum.take(all, length(cut)) == cut

    # The pass over the prefix, recomputed here: calls per function, and
    # the time of step/1 (a leaf: every return in the prefix is one of its).
    prefix = Enum.take(all, scanned)

    counts =
      prefix
      |> Enum.filter(&(&1.type == :call))
      |> Enum.frequencies_by(&{&1.module, &1.function, &1.arity})

    time =
      prefix
      |> Enum.filter(&(&1.type == :return and &1.function == :step))
      |> Enum.map(& &1.duration_ns)
      |> Enum.sum()

    assert Map.new(stats, fn {k, n, _, _} -> {k, n} end) == counts
    assert {_, _, ^time, ^time} = List.keyfind(stats, {Work, :step, 1}, 0)
    assert counts[{Work, :step, 1}] > 0
  end

  test "a select snapshot is a stable cut and is released" do
    {:ok, store} = DataAccess.new(max_events: 1_000)
    events = for i <- 1..100, do: %{id: i, timestamp: i, pid: self()}
    {:ok, 100} = DataAccess.store_events(store, events)
    snap = Native.ana_snapshot(store.ref)
    more = for i <- 101..2_000, do: %{id: i, timestamp: i, pid: self()}
    {:ok, 1_900} = DataAccess.store_events(store, more)

    {hits, nil} = Native.ana_select(snap, 0, nil, nil, nil, 0, 0, 10_000, 10_000)
    assert length(hits) == 100
    {now, nil} = Native.ana_select(store.ref, 0, nil, nil, nil, 0, 0, 10_000, 10_000)
    assert length(now) == 1_000
    assert Native.ana_snapshot_release(snap) == :ok
    assert_raise ArgumentError, fn -> Native.ana_select(snap, 0, nil, nil, nil, 0, 0, 10, 10) end
  end
end

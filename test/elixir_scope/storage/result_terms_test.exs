defmodule ElixirScope.Storage.ResultTermsTest do
  # Query results are built with one keys tuple per struct shape and call
  # (shared keys) and, for small answers, on the caller's scheduler: both
  # must give exactly the terms the VM's own map building and the dirty
  # NIFs give. Not async: the shared-keys switch is VM-wide (results are
  # equal either way, so other tests are not affected by it).
  use ExUnit.Case, async: false

  import Bitwise

  alias ElixirScope.Analysis
  alias ElixirScope.Capture.{Ingestor, PipelineManager, RingBuffer}
  alias ElixirScope.Native
  alias ElixirScope.Storage.{DataAccess, QueryCoordinator}

  setup do
    on_exit(fn -> Native.debug_shared_struct_keys(true) end)
    :ok
  end

  # Every event kind the Ingestor writes, from two processes.
  defp fill(buf) do
    me = self()

    other =
      spawn(fn ->
        receive do
          :stop -> :ok
        end
      end)

    for k <- 1..40 do
      :ok = Ingestor.ingest_function_call(buf, M, :f, [k, "arg", %{k: k}], me, {:c, k})
      :ok = Ingestor.ingest_function_call(buf, M, :g, [k], me, k)
      :ok = Ingestor.ingest_message_send(buf, me, other, {:msg, k})
      :ok = Ingestor.ingest_message_receive(buf, me, {:msg, k})
      :ok = Ingestor.ingest_function_return(buf, {:ok, k}, 10, k)
      :ok = Ingestor.ingest_function_exception(buf, :error, :badarg, 5, {:c, k})
    end

    :ok = Ingestor.ingest_process_spawn(buf, me, other)
    :ok = Ingestor.ingest_state_change(buf, me, %{n: 1}, %{n: 2})
    :ok = Ingestor.ingest_state_snapshot(buf, me, %{n: 2}, :manual)
    :ok = Ingestor.ingest_performance_metric(buf, :mem, 1.5, %{unit: :bytes})
    :ok = Ingestor.ingest_error(buf, :error, "boom", [])
    :ok = Ingestor.ingest_process_exit(buf, other, :normal)
    send(other, :stop)
    :ok
  end

  defp pipeline do
    {:ok, pm} = PipelineManager.start_link(name: nil, max_events: 100_000)
    Process.unlink(pm)
    on_exit(fn -> PipelineManager.shutdown(pm) end)
    buf = PipelineManager.ring_buffer(pm)
    fill(buf)
    :ok = PipelineManager.flush(pm)
    {pm, PipelineManager.data_access(pm)}
  end

  # Every query that returns events, as a list of results.
  defp queries(store) do
    {:ok, all} = DataAccess.query_by_time_range(store, -(1 <<< 62), 1 <<< 62, limit: 10_000)
    ids = for %{id: id} <- all, do: id
    ref = store.ref

    [
      all,
      DataAccess.query_by_time_range(store, -(1 <<< 62), 1 <<< 62, limit: 50, order: :desc),
      DataAccess.query_by_process(store, self(), limit: 1000),
      DataAccess.query_by_process(store, self(), limit: 3000, order: :desc),
      DataAccess.query_by_function(store, M, :f, limit: 1000),
      DataAccess.query_by_correlation(store, {:c, 3}),
      Enum.map(ids, &DataAccess.get_event(store, &1)),
      Enum.map(Enum.take(ids, 20), &DataAccess.get_correlated(store, &1)),
      Enum.map(Enum.take(ids, 40), &DataAccess.causal_chain(store, &1)),
      QueryCoordinator.query(store, pid: self(), limit: 100),
      QueryCoordinator.query(store, pid: self(), limit: 100, as: :event),
      QueryCoordinator.query(store, pid: self(), limit: 100, as: :entry),
      Native.store_by_time_range(ref, -(1 <<< 62), 1 <<< 62, 10_000, false),
      Native.store_by_pid(ref, self(), 1000, true),
      Analysis.select(store: store, limit: 1000),
      Analysis.select(store: store, pid: self(), from: -(1 <<< 62), to: 1 <<< 62),
      Analysis.select(store: store, from: -(1 <<< 62), to: 1 <<< 62, limit: 37),
      Analysis.select(store: store, types: [:call, :spawn], from: -(1 <<< 62), limit: 3000),
      Enum.map(Enum.take(ids, 40), &Analysis.range(&1, store: store)),
      Enum.map(Enum.take(ids, 40), &Analysis.traceback(&1, store: store))
    ]
  end

  test "shared-keys structs equal the VM-built ones, for every query" do
    {_pm, store} = pipeline()
    assert Native.debug_shared_struct_keys(false) == false
    legacy = queries(store)
    assert Native.debug_shared_struct_keys(true) == true
    shared = queries(store)
    assert shared == legacy
    # Deep-compare each map's keys and values too (== on maps already
    # does, this names the failing event).
    events = hd(shared)
    assert length(events) > 200

    for {a, b} <- Enum.zip(events, hd(legacy)) do
      assert Map.keys(a) == Map.keys(b)
      assert Map.values(a) == Map.values(b)
      assert a.__struct__ == b.__struct__
    end
  end

  test "shared keys share one keys tuple per shape in a result" do
    {_pm, store} = pipeline()
    Native.debug_shared_struct_keys(true)
    {:ok, on} = DataAccess.query_by_time_range(store, -(1 <<< 62), 1 <<< 62, limit: 1000)
    Native.debug_shared_struct_keys(false)
    {:ok, off} = DataAccess.query_by_time_range(store, -(1 <<< 62), 1 <<< 62, limit: 1000)
    Native.debug_shared_struct_keys(true)
    assert on == off
    assert :erts_debug.flat_size(on) == :erts_debug.flat_size(off)
    # Without sharing every map has its own keys tuple.
    assert :erts_debug.size(off) == :erts_debug.flat_size(off)
    assert :erts_debug.size(on) < :erts_debug.flat_size(on) * 0.8
  end

  test "shared-keys structs behave as maps: update, match, send, ETS, GC" do
    {_pm, store} = pipeline()
    Native.debug_shared_struct_keys(true)
    {:ok, events} = DataAccess.query_by_process(store, self(), limit: 1000)
    tab = :ets.new(:result_terms, [:set])

    for e <- events, Map.has_key?(e, :id) do
      assert %{__struct__: mod, id: id} = e
      assert is_atom(mod)
      assert Map.get(e, :id) == id
      assert Map.fetch!(%{e | id: -1}, :id) == -1
      assert map_size(Map.put(e, :zz_extra, 1)) == map_size(e) + 1
      assert Map.delete(e, :id) |> Map.has_key?(:id) == false
      assert :erlang.binary_to_term(:erlang.term_to_binary(e)) == e

      assert :erlang.phash2(e) ==
               :erlang.phash2(:erlang.binary_to_term(:erlang.term_to_binary(e)))

      true = :ets.insert(tab, {id, e})
      assert [{^id, ^e}] = :ets.lookup(tab, id)
    end

    parent = self()
    copy = :erlang.binary_to_term(:erlang.term_to_binary(events))
    :erlang.garbage_collect()
    spawn(fn -> send(parent, {:back, events}) end)
    assert_receive {:back, ^copy}
    :erlang.garbage_collect()
    assert events == copy
    assert Enum.sort(events) == Enum.sort(copy)
  end

  test "ring reads decode to the structs Elixir builds from the same fields" do
    {:ok, buf} = RingBuffer.new(size: 1024)
    fill(buf)
    Native.debug_shared_struct_keys(true)
    {events, n} = RingBuffer.read_batch(buf, 0, 1000)
    assert n > 200 and length(events) == n
    rebuilt = Enum.map(events, &struct!(&1.__struct__, Map.from_struct(&1)))
    assert rebuilt == events
    assert :erts_debug.size(events) < :erts_debug.flat_size(events)
    assert :erlang.binary_to_term(:erlang.term_to_binary(events)) == events
  end

  test "the caller's-scheduler path answers as the dirty NIFs, busy past its bounds" do
    {_pm, store} = pipeline()
    ref = store.ref
    t = {-(1 <<< 62), 1 <<< 62}

    assert Native.store_quick(ref, :time, elem(t, 0), elem(t, 1), 100, false) ==
             Native.store_by_time_range(ref, elem(t, 0), elem(t, 1), 100, false)

    assert Native.store_quick(ref, :pid, self(), nil, 100, true) ==
             Native.store_by_pid(ref, self(), 100, true)

    assert Native.store_quick(ref, :function, M, :g, 2000, false) ==
             Native.store_by_function(ref, M, :g, 2000, false)

    [e | _] = Native.store_by_pid(ref, self(), 1, false)
    assert Native.store_quick(ref, :get, e.id, nil, 1, false) == Native.store_get(ref, e.id)
    assert Native.store_quick(ref, :get, 1 <<< 61, nil, 1, false) == {:error, :not_found}

    assert Native.store_quick(ref, :chain, e.id, nil, 0, false) ==
             Native.store_causal_chain(ref, e.id)

    # Too many results for a normal scheduler, or arguments the dirty NIF
    # rejects: left to the dirty NIF.
    assert Native.store_quick(ref, :time, 0, 1, 2001, false) == :busy
    assert Native.store_quick(ref, :time, :x, 1, 10, false) == :busy
    assert Native.store_quick(ref, :get, -1, nil, 1, false) == :busy
    assert Native.store_quick(ref, :nope, 1, 1, 1, false) == :busy
    # DataAccess past the bound still answers in full.
    {:ok, big} = DataAccess.query_by_time_range(store, elem(t, 0), elem(t, 1), limit: 5000)
    assert big == Native.store_by_time_range(ref, elem(t, 0), elem(t, 1), 5000, false)
  end

  test "Analysis' caller's-scheduler paths answer as the dirty NIFs, busy past their bounds" do
    {_pm, store} = pipeline()
    ref = store.ref
    {t0, t1} = {-(1 <<< 62), 1 <<< 62}
    me = self()

    for {p, m, f, kinds} <- [{nil, nil, nil, 0}, {me, nil, nil, 0}, {nil, M, :f, 1 <<< 1}],
        limit <- [1, 7, 2000] do
      quick = Native.ana_select_time_quick(ref, t0, -1, p, m, f, kinds, t1, limit)
      assert quick != :busy
      assert quick == Native.ana_select_time(ref, t0, -1, p, m, f, kinds, t1, limit)
      {hits, next} = quick
      assert length(hits) <= limit

      if next do
        {ts, seq} = next

        assert Native.ana_select_time_quick(ref, ts, seq, p, m, f, kinds, t1, limit) ==
                 Native.ana_select_time(ref, ts, seq, p, m, f, kinds, t1, limit)
      end
    end

    # Chunk after chunk, the whole window in order, without repeats.
    all = Analysis.select(store: store, from: t0, to: t1)
    assert all == Analysis.select(store: store, from: t0, to: t1, limit: 100_000)
    assert length(all) > 200
    assert all == Enum.uniq_by(all, & &1.id)
    assert Enum.take(all, 5) == Analysis.select(store: store, from: t0, to: t1, limit: 5)
    assert Native.ana_select_time_quick(ref, t0, -1, nil, nil, nil, 0, t1, 2001) == :busy

    # The store-order scan builds entries for at most `limit` hits and
    # continues after the last one kept.
    scanned = Analysis.select(store: store)
    assert length(scanned) == length(all)

    for n <- [1, 3, 50] do
      assert Analysis.select(store: store, limit: n) == Enum.take(scanned, n)
      odd = Enum.filter(scanned, &(rem(&1.id, 2) == 1))
      assert Analysis.filter(&(rem(&1.id, 2) == 1), store: store, limit: n) == Enum.take(odd, n)
    end

    ids = for e <- all, do: e.id

    for id <- Enum.take(ids, 60) do
      assert Native.ana_quick(ref, :range, id, 100_000) == Native.ana_range(ref, id, 100_000)
      assert Native.ana_quick(ref, :range, id, 2) == Native.ana_range(ref, id, 2)
      assert Native.ana_quick(ref, :traceback, id, 0) == Native.ana_traceback(ref, id)
    end

    assert Native.ana_quick(ref, :traceback, 1 <<< 61, 0) == nil
    assert Native.ana_quick(ref, :nope, hd(ids), 0) == :busy
  end

  test "QueryCoordinator's caller's-scheduler path answers as the dirty NIF" do
    {pm, store} = pipeline()
    ref = store.ref
    buf = PipelineManager.ring_buffer(pm)
    # Other processes' events, so that no index below covers a quarter of
    # the store (the planner scans then, which the quick path leaves).
    for i <- 1..6 do
      Task.async(fn ->
        for k <- 1..200, do: :ok = Ingestor.ingest_function_call(buf, N, :h, [k], self(), {i, k})
      end)
    end
    |> Task.await_many()

    :ok = PipelineManager.flush(pm)
    {:ok, all} = DataAccess.query_by_time_range(store, -(1 <<< 62), 1 <<< 62, limit: 10_000)
    window = all |> Enum.drop(100) |> Enum.take(60)
    {t0, t1} = {hd(window).timestamp, List.last(window).timestamp}

    for {f, as} <- [
          {%{pid: self()}, :event},
          {%{pid: self()}, :correlated},
          {%{pid: self()}, :entry},
          {%{module: M, function: :g}, :event},
          {%{from: t0, to: t1}, :event},
          {%{pid: self(), types: 4}, :event}
        ],
        desc <- [false, true] do
      quick = Native.qry_query_quick(ref, f, desc, 50, nil, as)
      assert quick != :busy
      assert quick == Native.qry_query(ref, f, desc, 50, nil, as)
      {_, next, _, _} = quick

      if next,
        do:
          assert(
            Native.qry_query_quick(ref, f, desc, 50, next, as) ==
              Native.qry_query(ref, f, desc, 50, next, as)
          )
    end

    # A scan, a page too big, malformed arguments: left to the dirty NIF.
    assert Native.qry_query_quick(ref, %{}, false, 10, nil, :event) == :busy
    assert Native.qry_query_quick(ref, %{pid: self()}, false, 2001, nil, :event) == :busy
    assert Native.qry_query_quick(ref, %{pid: self()}, false, 10, nil, :nope) == :busy
    assert Native.qry_query_quick(ref, %{pid: self()}, false, 10, "bad", :event) == :busy
  end
end

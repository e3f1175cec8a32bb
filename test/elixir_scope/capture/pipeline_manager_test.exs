defmodule ElixirScope.Capture.PipelineManagerTest do
  use ExUnit.Case, async: true

  alias ElixirScope.Capture.{AsyncWriterPool, Ingestor, PipelineManager, RingBuffer}
  alias ElixirScope.Events.FunctionExecution
  alias ElixirScope.Storage.DataAccess

  defp start!(opts \\ []) do
    opts = Keyword.merge([name: nil, shards: 4, ring_size: 1024], opts)

    start_supervised!(%{
      id: make_ref(),
      start: {PipelineManager, :start_link, [opts]},
      type: :supervisor
    })
  end

  defp calls(buf, n, corr_prefix \\ :c) do
    for i <- 1..n do
      :ok = Ingestor.ingest_function_call(buf, M, :f, [i], self(), {corr_prefix, i})
      :ok = Ingestor.ingest_function_return(buf, i, 1, {corr_prefix, i})
    end
  end

  describe "start_link/1" do
    test "accepts a keyword list or a map and registers the name" do
      name = :"pm_#{System.unique_integer([:positive])}"
      {:ok, pm} = PipelineManager.start_link(%{name: name, shards: 2, ring_size: 64})
      assert Process.whereis(name) == pm
      assert %RingBuffer{} = PipelineManager.ring_buffer(name)
      assert %DataAccess{} = PipelineManager.data_access(name)
      assert :ok = PipelineManager.shutdown(name)
      refute Process.alive?(pm)
    end

    test "two named pipelines run side by side with separate stores" do
      a = start!(name: :"pm_a_#{System.unique_integer([:positive])}")
      b = start!(name: :"pm_b_#{System.unique_integer([:positive])}")
      calls(PipelineManager.ring_buffer(a), 10)
      calls(PipelineManager.ring_buffer(b), 3)
      :ok = PipelineManager.flush(a)
      :ok = PipelineManager.flush(b)
      assert PipelineManager.get_metrics(a).accounting.stored == 20
      assert PipelineManager.get_metrics(b).accounting.stored == 6
      assert DataAccess.get_stats(PipelineManager.data_access(b)).total_events == 6
    end

    test "bad options raise ArgumentError naming the option" do
      for {k, v} <- [
            shards: 0,
            ring_size: 1000,
            batch_size: -1,
            async_writer_pool_size: 100,
            overflow_strategy: :nope,
            max_events: 0,
            correlation_enabled: :yes,
            max_backlog: -5
          ] do
        e = assert_raise ArgumentError, fn -> PipelineManager.start_link([{k, v}, name: nil]) end
        assert e.message =~ inspect(k)
      end

      assert_raise ArgumentError, fn -> PipelineManager.start_link(:bad) end
      assert_raise ArgumentError, fn -> PipelineManager.start_link([1, 2]) end
    end

    test "it is a supervisor of the state server, the writer pool, the query coordinator and the backpressure manager" do
      pm = start!()
      kids = Supervisor.which_children(pm)
      assert length(kids) == 4
      assert Enum.any?(kids, fn {id, _, _, _} -> id == AsyncWriterPool end)

      assert Enum.any?(kids, fn {id, _, _, _} ->
               id == ElixirScope.Storage.QueryCoordinator.Server
             end)

      assert is_pid(PipelineManager.backpressure_manager(pm))

      quiet = start!(backpressure_enabled: false)
      assert length(Supervisor.which_children(quiet)) == 3
      assert PipelineManager.backpressure_manager(quiet) == nil
    end
  end

  describe "the pipeline" do
    test "events written to the ring come out correlated and queryable" do
      pm = start!()
      buf = PipelineManager.ring_buffer(pm)
      :ok = Ingestor.ingest_function_call(buf, M, :outer, [], self(), :o)
      :ok = Ingestor.ingest_function_call(buf, M, :inner, [1, 2], self(), :i)
      :ok = Ingestor.ingest_function_return(buf, :r, 5, :i)
      :ok = Ingestor.ingest_function_return(buf, :r, 9, :o)
      :ok = PipelineManager.flush(pm)

      store = PipelineManager.data_access(pm)
      {:ok, [outer, inner, ret_inner, ret_outer]} = DataAccess.query_by_process(store, self())
      assert %FunctionExecution{function: :outer, event_type: :call} = outer
      assert %FunctionExecution{function: :inner, arity: 2} = inner

      {:ok, c} = DataAccess.get_correlated(store, inner.id)
      assert c.parent_id == outer.id and c.root_id == outer.id
      assert c.links == [called_from: outer.id]
      {:ok, r} = DataAccess.get_correlated(store, ret_inner.id)
      assert r.correlation_id == inner.id and r.links == [completes: inner.id]
      {:ok, r} = DataAccess.get_correlated(store, ret_outer.id)
      assert r.correlation_id == outer.id and r.parent_id == nil

      {:ok, chain} = DataAccess.causal_chain(store, inner.id)
      assert Enum.map(chain, & &1.id) == [outer.id, inner.id]
      {:ok, inside} = DataAccess.call_contents(store, outer.id)
      assert Enum.map(inside, & &1.id) == Enum.map([outer, inner, ret_inner, ret_outer], & &1.id)
      {:ok, kids} = DataAccess.children(store, outer.id)
      # the inner call and its return happened directly inside outer
      assert Enum.map(kids, & &1.id) == [inner.id, ret_inner.id]

      {:ok, by_fun} = DataAccess.query_by_function(store, M, :inner)
      assert Enum.map(by_fun, & &1.id) == [inner.id]
      {:ok, by_corr} = DataAccess.query_by_correlation(store, inner.id)
      assert Enum.map(by_corr, & &1.id) == [inner.id, ret_inner.id]
    end

    test "the pipeline's store is read-only from Elixir" do
      pm = start!()
      store = PipelineManager.data_access(pm)
      assert DataAccess.store_event(store, %{id: 1}) == {:error, :read_only}
      assert DataAccess.store_events(store, [%{id: 1}]) == {:error, :read_only}
      # destroy is a no-op on a pipeline's store
      assert DataAccess.destroy(store) == :ok
      calls(PipelineManager.ring_buffer(pm), 2)
      :ok = PipelineManager.flush(pm)
      assert DataAccess.get_stats(store).total_events == 4
    end

    test "position reads on the pipeline's sharded ring are refused clearly" do
      pm = start!()
      buf = PipelineManager.ring_buffer(pm)

      assert_raise ArgumentError, ~r/belongs to a pipeline/, fn -> RingBuffer.read(buf, 0) end
      assert %{size: 4096} = RingBuffer.stats(buf)
    end

    test "accounting adds up after flush" do
      pm = start!(max_events: 100)
      calls(PipelineManager.ring_buffer(pm), 150)
      :ok = PipelineManager.flush(pm)
      acc = PipelineManager.get_metrics(pm).accounting
      assert acc.accepted == 300
      assert acc.stored == 100 and acc.evicted == 200
      assert acc.in_flight == 0 and acc.unaccounted == 0
      assert PipelineManager.accounting_line(pm) =~ "accepted 300 = stored 100 + evicted 200"
    end
  end

  describe "get_state/1, get_metrics/1, health_check/1" do
    test "a running pipeline's uptime is positive right after start" do
      pm = start!()
      h = PipelineManager.health_check(pm)
      assert h.uptime_ms >= 1 and h.uptime_ns > 0
      # Rounded up from the exact figure.
      assert h.uptime_ms == div(h.uptime_ns + 999_999, 1_000_000)
      state = PipelineManager.get_state(pm)
      assert state.uptime_ms >= 1 and state.uptime_ns > h.uptime_ns
    end

    test "report the configuration, the seeds' stats and health" do
      pm = start!(batch_size: 7)
      state = PipelineManager.get_state(pm)
      assert state.config.batch_size == 7
      assert state.status == :running
      assert is_integer(state.uptime_ms)
      assert length(state.children) == 4

      calls(PipelineManager.ring_buffer(pm), 50)
      :ok = PipelineManager.flush(pm)
      m = PipelineManager.get_metrics(pm)

      for k <- [
            :events_processed,
            :processing_rate,
            :backlog_size,
            :latency,
            :buffer_utilization,
            :dropped,
            :active_workers,
            :correlation_success_rate,
            :orphaned,
            :memory_bytes,
            :accounting
          ] do
        assert Map.has_key?(m, k), "missing #{k}"
      end

      assert m.events_processed == 100
      assert m.correlation_success_rate == 1.0

      # The original's get_state keys, with the same meaning.
      st = PipelineManager.get_state(pm)
      assert st.events_processed == 100
      assert is_float(st.processing_rate) and st.processing_rate >= 0
      assert is_integer(st.start_time) and st.start_time == state.start_time
      assert st.start_time <= ElixirScope.Utils.monotonic_timestamp()
      assert m.latency.samples == 100 and m.latency.p99_ns >= m.latency.p50_ns
      assert m.active_workers == 4
      assert m.native.pool.batch_size == 7

      h = PipelineManager.health_check(pm)
      assert h.status == :healthy
      assert h.children_count == 4
      assert is_integer(h.uptime_ms)
    end

    test "unmatched returns lower the correlation success rate" do
      pm = start!()
      buf = PipelineManager.ring_buffer(pm)
      :ok = Ingestor.ingest_function_return(buf, :x, 1, :never_called)
      :ok = Ingestor.ingest_function_call(buf, M, :f, [], self(), :c)
      :ok = Ingestor.ingest_function_return(buf, :x, 1, :c)
      :ok = PipelineManager.flush(pm)
      assert PipelineManager.get_metrics(pm).correlation_success_rate == 0.5
    end
  end

  describe "update_config/2" do
    test "applies batch size, pool size, flush interval and correlation live" do
      pm = start!()

      assert :ok =
               PipelineManager.update_config(pm, %{
                 batch_size: 3,
                 async_writer_pool_size: 2,
                 flush_interval_us: 500,
                 cleanup_interval_ms: 1000
               })

      native = PipelineManager.get_metrics(pm).native
      assert native.pool.batch_size == 3
      assert native.pool.workers == 2
      assert native.pool.flush_interval_us == 500
      assert PipelineManager.get_state(pm).config.batch_size == 3

      :ok = PipelineManager.update_config(pm, correlation_enabled: false)
      buf = PipelineManager.ring_buffer(pm)
      :ok = Ingestor.ingest_function_call(buf, M, :a, [], self(), :a)
      :ok = Ingestor.ingest_function_call(buf, M, :b, [], self(), :b)
      :ok = PipelineManager.flush(pm)
      store = PipelineManager.data_access(pm)
      {:ok, [_, b]} = DataAccess.query_by_process(store, self())
      {:ok, c} = DataAccess.get_correlated(store, b.id)
      assert c.parent_id == nil and c.correlation_id == b.id
    end

    test "applies store and correlator limits live, evicting at once (counted)" do
      pm = start!(max_events: 1000)
      buf = PipelineManager.ring_buffer(pm)
      calls(buf, 400)
      # 50 sends nobody receives: tracked by the correlator
      for i <- 1..50, do: :ok = Ingestor.ingest_message_send(buf, self(), self(), {:lost, i})
      :ok = PipelineManager.flush(pm)

      assert :ok =
               PipelineManager.update_config(pm, %{
                 max_events: 300,
                 max_correlations: 10,
                 correlation_ttl_ms: 1
               })

      m = PipelineManager.get_metrics(pm)
      assert m.accounting.stored == 300
      assert m.accounting.evicted == 550
      assert m.accounting.unaccounted == 0
      assert m.native.store.max_events == 300
      assert m.native.correlator.active == 10
      assert m.native.correlator.evicted == 40
      assert PipelineManager.data_access(pm).max_events == 300
      # raising works too, and the store fills up to the new bound
      :ok = PipelineManager.update_config(pm, max_events: 2000)
      calls(buf, 500)
      :ok = PipelineManager.flush(pm)
      assert PipelineManager.get_metrics(pm).accounting.stored == 1300
      # max_age_ms: nil removes the age bound again
      assert :ok = PipelineManager.update_config(pm, max_age_ms: nil)
    end

    test "refuses structural and unknown keys without applying anything" do
      pm = start!()

      assert {:error, {:not_live, [:shards]}} =
               PipelineManager.update_config(pm, %{shards: 8, batch_size: 9})

      assert PipelineManager.get_metrics(pm).native.pool.batch_size == 50
      assert {:error, {:unknown, [:bogus]}} = PipelineManager.update_config(pm, bogus: 1)
      assert_raise ArgumentError, fn -> PipelineManager.update_config(pm, batch_size: 0) end
    end
  end

  describe "shutdown/1" do
    test "drains what was written before stopping" do
      pm = start!(flush_interval_us: 50_000, async_writer_pool_size: 1)
      buf = PipelineManager.ring_buffer(pm)
      store = PipelineManager.data_access(pm)
      calls(buf, 500)
      assert :ok = PipelineManager.shutdown(pm)
      refute Process.alive?(pm)
      # The store outlives the pipeline for as long as a handle is held.
      assert DataAccess.get_stats(store).total_events == 1000
    end
  end

  describe "the application" do
    test "start_pipeline/1 starts a pipeline and makes its ring the Ingestor's buffer" do
      previous = Ingestor.get_buffer()
      name = :"app_pm_#{System.unique_integer([:positive])}"
      {:ok, pm} = ElixirScope.Application.start_pipeline(name: name, shards: 2, ring_size: 64)
      assert {:ok, buf} = Ingestor.get_buffer()
      assert buf == PipelineManager.ring_buffer(name)
      :ok = PipelineManager.shutdown(pm)

      case previous do
        {:ok, b} -> Ingestor.set_buffer(b)
        _ -> :persistent_term.erase({Ingestor, :buffer})
      end
    end
  end
end

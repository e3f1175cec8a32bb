defmodule ElixirScope.Capture.AsyncWriterTest do
  use ExUnit.Case, async: true

  alias ElixirScope.Capture.{AsyncWriter, AsyncWriterPool, Ingestor, PipelineManager, RingBuffer}
  alias ElixirScope.Storage.DataAccess

  defp ring!(size \\ 4096) do
    {:ok, buf} = RingBuffer.new(size: size, overflow_strategy: :drop_newest)
    buf
  end

  defp calls(buf, n) do
    for i <- 1..n do
      :ok = Ingestor.ingest_function_call(buf, M, :f, [i], self(), i)
      :ok = Ingestor.ingest_function_return(buf, i, 1, i)
    end
  end

  defp sup!(mod, arg) do
    start_supervised!(%{id: make_ref(), start: {mod, :start_link, [arg]}})
  end

  describe "AsyncWriterPool standalone over a ring buffer" do
    test "drains the ring into its store, correlated" do
      buf = ring!()
      pool = sup!(AsyncWriterPool, ring_buffer: buf, pool_size: 2, batch_size: 16)
      calls(buf, 100)
      :ok = AsyncWriterPool.flush(pool)
      store = AsyncWriterPool.data_access(pool)
      {:ok, events} = DataAccess.query_by_process(store, self(), limit: 1000)
      assert length(events) == 200
      [call, ret | _] = events
      assert {:ok, %{links: [completes: id]}} = DataAccess.get_correlated(store, ret.id)
      assert id == call.id
      assert AsyncWriterPool.ring_buffer(pool) == buf
      # Consumed from the ring: nothing left to read there.
      assert RingBuffer.stats(buf).available_events == 0

      m = AsyncWriterPool.get_metrics(pool)
      assert m.total_events_read == 200
      assert m.total_events_processed == 200
      assert m.total_batches_processed >= 200 / 16
      assert m.worker_count == 2
      assert m.total_errors == 0
      assert is_float(m.average_processing_rate)
    end

    test "without a ring buffer it creates one (sharded) to write to" do
      pool = sup!(AsyncWriterPool, %{pool_size: 3, shards: 6, ring_size: 64})
      buf = AsyncWriterPool.ring_buffer(pool)
      calls(buf, 10)
      :ok = AsyncWriterPool.flush(pool)
      assert DataAccess.get_stats(AsyncWriterPool.data_access(pool)).total_events == 20

      state = AsyncWriterPool.get_state(pool)
      assert state.workers == [0, 1, 2]
      assert state.worker_assignments == %{0 => [0, 3], 1 => [1, 4], 2 => [2, 5]}
    end

    test "scale_pool/2 reassigns shards; assignments partition them" do
      pool = sup!(AsyncWriterPool, %{pool_size: 2, shards: 8, ring_size: 64})
      assert :ok = AsyncWriterPool.scale_pool(pool, 3)
      a = AsyncWriterPool.get_worker_assignments(pool)
      assert map_size(a) == 3
      assert a |> Map.values() |> List.flatten() |> Enum.sort() == Enum.to_list(0..7)
      assert AsyncWriterPool.get_metrics(pool).worker_count == 3
      assert :ok = AsyncWriterPool.scale_pool(pool, 1)
      assert AsyncWriterPool.get_worker_assignments(pool) == %{0 => Enum.to_list(0..7)}
      assert_raise ArgumentError, fn -> AsyncWriterPool.scale_pool(pool, 0) end
      assert_raise ArgumentError, fn -> AsyncWriterPool.scale_pool(pool, :many) end
    end

    test "health_check/1 reports healthy native workers" do
      pool = sup!(AsyncWriterPool, pool_size: 2)
      h = AsyncWriterPool.health_check(pool)
      assert h.status == :healthy
      assert h.worker_count == 2 and h.healthy_workers == 2 and h.failed_workers == 0
      assert is_integer(h.uptime_ms)
    end

    test "stop/1 drains a standalone pool first" do
      buf = ring!()
      {:ok, pool} = AsyncWriterPool.start_link(ring_buffer: buf, poll_interval_ms: 200)
      store = AsyncWriterPool.data_access(pool)
      calls(buf, 300)
      assert :ok = AsyncWriterPool.stop(pool)
      assert DataAccess.get_stats(store).total_events == 600
    end

    test "bad options raise ArgumentError" do
      assert_raise ArgumentError, fn -> AsyncWriterPool.start_link(ring_buffer: :nope) end
      assert_raise ArgumentError, fn -> AsyncWriterPool.start_link(pool_size: 0) end
      assert_raise ArgumentError, fn -> AsyncWriterPool.start_link(:bad) end
    end
  end

  describe "AsyncWriter" do
    test "drains a ring into a private store and counts what it did" do
      buf = ring!()
      w = sup!(AsyncWriter, %{ring_buffer: buf, batch_size: 10, poll_interval_ms: 5})
      calls(buf, 25)
      :ok = AsyncWriter.drain(w)
      store = AsyncWriter.data_access(w)
      {:ok, events} = DataAccess.query_by_process(store, self())
      assert length(events) == 50
      {:ok, c} = DataAccess.get_correlated(store, Enum.at(events, 1).id)
      assert c.links == [completes: hd(events).id]

      m = AsyncWriter.get_metrics(w)
      assert m.events_read == 50 and m.events_processed == 50
      assert m.batches_processed == 5
      assert m.error_count == 0
      assert AsyncWriter.get_state(w).position == 50
    end

    test "polls on its own" do
      buf = ring!()
      w = sup!(AsyncWriter, ring_buffer: buf, poll_interval_ms: 1)
      calls(buf, 5)
      store = AsyncWriter.data_access(w)

      wait_until(fn -> DataAccess.get_stats(store).total_events == 10 end)
    end

    test "writes into a PipelineManager's store, counted there as accepted" do
      pm =
        start_supervised!(%{
          id: make_ref(),
          start: {PipelineManager, :start_link, [[name: nil, shards: 2, ring_size: 64]]},
          type: :supervisor
        })

      buf = ring!()
      w = sup!(AsyncWriter, ring_buffer: buf, pipeline: pm, poll_interval_ms: 1000)
      calls(buf, 7)
      :ok = AsyncWriter.drain(w)
      acc = PipelineManager.get_metrics(pm).accounting
      assert acc.accepted == 14 and acc.stored == 14 and acc.unaccounted == 0
      assert AsyncWriter.data_access(w) == PipelineManager.data_access(pm)
    end

    test "set_position/2 skips ahead (counted) and never goes back" do
      buf = ring!()
      w = sup!(AsyncWriter, ring_buffer: buf, poll_interval_ms: 60_000)
      calls(buf, 10)
      :ok = AsyncWriter.set_position(w, 6)
      assert AsyncWriter.get_metrics(w).skipped == 6
      # The skip is immediately followed by processing what remains.
      assert DataAccess.get_stats(AsyncWriter.data_access(w)).total_events == 14
      :ok = AsyncWriter.set_position(w, 0)
      assert AsyncWriter.get_state(w).position == 20
      assert_raise ArgumentError, fn -> AsyncWriter.set_position(w, -1) end
    end

    test "enrich_event/1 adds processing metadata" do
      e = AsyncWriter.enrich_event(%{id: 1})
      assert is_integer(e.correlation_id)
      assert is_integer(e.enriched_at)
      assert e.processed_by == self()
      e2 = AsyncWriter.enrich_event(%{id: 2, correlation_id: :keep})
      assert e2.correlation_id == :keep
      assert e2.processing_order > e.processing_order
      assert AsyncWriter.enrich_event(%{correlation_id: nil}).correlation_id != nil
      assert_raise ArgumentError, fn -> AsyncWriter.enrich_event(:nope) end
    end

    test "stop/1 drains first" do
      buf = ring!()
      {:ok, w} = AsyncWriter.start_link(ring_buffer: buf, poll_interval_ms: 60_000)
      store = AsyncWriter.data_access(w)
      calls(buf, 40)
      assert :ok = AsyncWriter.stop(w)
      assert DataAccess.get_stats(store).total_events == 80
    end

    test "bad config raises ArgumentError" do
      assert_raise ArgumentError, fn -> AsyncWriter.start_link(%{}) end

      assert_raise ArgumentError, fn ->
        AsyncWriter.start_link(ring_buffer: ring!(), batch_size: 0)
      end

      assert_raise ArgumentError, fn -> AsyncWriter.start_link(:bad) end
    end
  end

  defp wait_until(fun, tries \\ 500) do
    cond do
      fun.() -> :ok
      tries == 0 -> flunk("condition never became true")
      true -> Process.sleep(5) && wait_until(fun, tries - 1)
    end
  end
end

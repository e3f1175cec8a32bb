defmodule ElixirScope.Capture.AsyncWriterTest do
  use ExUnit.Case, async: true

  import Bitwise, only: [<<<: 2]

  alias ElixirScope.Capture.{AsyncWriter, AsyncWriterPool, Ingestor, PipelineManager, RingBuffer}
  alias ElixirScope.{Native, PipelineTestHelpers}
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
      assert [_, _, _] = state.workers
      assert Enum.all?(state.workers, &Process.alive?/1)
      assert state.shard_assignments == %{0 => [0, 3], 1 => [1, 4], 2 => [2, 5]}
      # The original's shape: each worker's pid and its index.
      assert state.worker_assignments == state.workers |> Enum.with_index() |> Map.new()

      assert Enum.map(state.workers, &AsyncWriter.get_state(&1).shards) ==
               [[0, 3], [1, 4], [2, 5]]
    end

    test "scale_pool/2 reassigns shards; assignments partition them" do
      pool = sup!(AsyncWriterPool, %{pool_size: 2, shards: 8, ring_size: 64})
      assert :ok = AsyncWriterPool.scale_pool(pool, 3)
      a = AsyncWriterPool.get_shard_assignments(pool)
      assert map_size(a) == 3
      assert a |> Map.values() |> List.flatten() |> Enum.sort() == Enum.to_list(0..7)
      assert AsyncWriterPool.get_metrics(pool).worker_count == 3
      assert :ok = AsyncWriterPool.scale_pool(pool, 1)
      assert AsyncWriterPool.get_shard_assignments(pool) == %{0 => Enum.to_list(0..7)}
      [only] = AsyncWriterPool.get_state(pool).workers
      assert AsyncWriterPool.get_worker_assignments(pool) == %{only => 0}
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

    test "set_position/2 skips ahead (counted)" do
      buf = ring!()
      w = sup!(AsyncWriter, ring_buffer: buf, poll_interval_ms: 60_000)
      calls(buf, 10)
      :ok = AsyncWriter.set_position(w, 6)
      assert AsyncWriter.get_metrics(w).skipped == 6
      # The skip is immediately followed by processing what remains.
      assert DataAccess.get_stats(AsyncWriter.data_access(w)).total_events == 14
      assert AsyncWriter.get_state(w).position == 20
      assert RingBuffer.stats(buf).total_reads == 20
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
      assert_raise ArgumentError, fn ->
        AsyncWriter.start_link(ring_buffer: ring!(), batch_size: 0)
      end

      assert_raise ArgumentError, fn -> AsyncWriter.start_link(:bad) end
    end
  end

  describe "AsyncWriter as the original's code uses it" do
    test "a nil or invalid ring_buffer starts and counts read errors" do
      {:ok, pm_ring} = ElixirScope.Capture.Pipeline.start(%{shards: 2, ring_size: 64})
      destroyed = ring!(64)
      :ok = RingBuffer.destroy(destroyed)

      for bad <- [nil, :invalid_buffer, %{}, destroyed, pm_ring.ring_buffer] do
        w = sup!(AsyncWriter, %{ring_buffer: bad, batch_size: 5, poll_interval_ms: 5})
        wait_until(fn -> AsyncWriter.get_state(w).error_count >= 2 end)
        state = AsyncWriter.get_state(w)
        assert Process.alive?(w)
        assert state.events_read == 0 and state.current_position == 0
        assert state.last_error != nil
        assert {:error, _} = AsyncWriter.set_position(w, 3)
        assert :ok = AsyncWriter.drain(w)
        assert AsyncWriter.get_metrics(w).error_count >= 2
      end

      # Also with the config the original's tests pass: no ring at all.
      {:ok, w} = AsyncWriter.start_link(%{})
      assert AsyncWriter.get_state(w).last_error == :no_ring_buffer
      :ok = AsyncWriter.stop(w)
      Native.pipe_shutdown(pm_ring.pipe, 1000)
    end

    test "get_state/1 carries the original's fields" do
      buf = ring!()
      calls(buf, 5)

      w =
        sup!(AsyncWriter, %{
          ring_buffer: buf,
          batch_size: 2,
          poll_interval_ms: 10,
          max_backlog: 100
        })

      wait_until(fn -> AsyncWriter.get_state(w).current_position == 10 end)
      state = AsyncWriter.get_state(w)
      assert state.config.batch_size == 2 and state.config.max_backlog == 100
      assert state.events_read == 10 and state.events_processed == 10
      assert state.batches_processed == 5
      assert state.error_count == 0
      assert is_float(state.processing_rate) and state.processing_rate > 0
      assert is_integer(state.start_time)
      assert state.resumed == false
      # Both on Utils.monotonic_timestamp/0's clock, as in the original:
      # a poll ended after the start, and before now.
      assert state.last_poll_time >= state.start_time
      assert state.last_poll_time <= ElixirScope.Utils.monotonic_timestamp()
      :ok = AsyncWriter.drain(w)
      assert AsyncWriter.get_state(w).last_poll_time >= state.last_poll_time
    end

    test "a writer that has not polled yet reports its start as its last poll" do
      w = sup!(AsyncWriter, %{ring_buffer: ring!(), poll_interval_ms: 3_600_000})
      state = AsyncWriter.get_state(w)
      assert state.last_poll_time == state.start_time
      assert state.start_time <= ElixirScope.Utils.monotonic_timestamp()
    end
  end

  describe "AsyncWriter positions: kept across restarts, replayable" do
    test "a killed writer resumes where it stopped: nothing stored twice or lost" do
      pm = PipelineTestHelpers.start_pipeline!(shards: 1, ring_size: 64)
      buf = ring!(1 <<< 16)
      name = :"writer_#{System.unique_integer([:positive])}"

      sup!(AsyncWriter,
        name: name,
        ring_buffer: buf,
        pipeline: pm,
        batch_size: 7,
        poll_interval_ms: 1
      )

      producer =
        Task.async(fn ->
          for i <- 1..6000 do
            :ok = Ingestor.ingest_function_call(buf, M, :f, [i], self(), i)
            if rem(i, 500) == 0, do: Process.sleep(2)
          end
        end)

      # Kill it a few times while it drains (wherever it stands).
      for _ <- 1..5 do
        Process.sleep(8)
        pid = wait_for_name(name)
        ref = Process.monitor(pid)
        Process.exit(pid, :kill)
        assert_receive {:DOWN, ^ref, :process, ^pid, :killed}
      end

      Task.await(producer, 30_000)
      :ok = AsyncWriter.drain(wait_for_name(name))
      :ok = PipelineManager.flush(pm)

      state = AsyncWriter.get_state(name)
      assert state.resumed
      m = AsyncWriter.get_metrics(name)
      assert m.consumed == 6000 and m.events_read == 6000 and m.events_processed == 6000
      assert m.replayed == 0 and m.skipped == 0 and m.dead_lettered == 0
      assert state.current_position == 6000
      assert RingBuffer.stats(buf).total_reads == 6000

      acc = PipelineTestHelpers.assert_exact_accounting!(pm)
      assert acc.accepted == 6000 and acc.stored == 6000 and acc.duplicates == 0

      # In order, each once.
      {:ok, evs} =
        DataAccess.query_by_process(PipelineManager.data_access(pm), producer.pid, limit: 10_000)

      assert Enum.map(evs, & &1.args) == Enum.map(1..6000, &[&1])
    end

    test "set_position/2 behind the cursor replays what the ring holds; the counters add up" do
      pm = PipelineTestHelpers.start_pipeline!(shards: 1, ring_size: 64)
      buf = ring!(256)

      w =
        sup!(AsyncWriter, ring_buffer: buf, pipeline: pm, batch_size: 16, poll_interval_ms: 60_000)

      calls(buf, 100)
      :ok = AsyncWriter.drain(w)
      assert AsyncWriter.get_state(w).current_position == 200

      # Rewind 150: replayed into the same store, which still holds them.
      assert :ok = AsyncWriter.set_position(w, 50)
      m = AsyncWriter.get_metrics(w)
      assert m.consumed == 200 and m.replayed == 150 and m.replay_missed == 0
      assert m.events_read == 350 and m.events_processed == 350
      assert AsyncWriter.get_state(w).replay_end == nil
      assert AsyncWriter.get_state(w).current_position == 200
      assert RingBuffer.stats(buf).total_reads == 200
      :ok = PipelineManager.flush(pm)
      acc = PipelineTestHelpers.assert_exact_accounting!(pm)
      assert acc.accepted == 350 and acc.stored == 200 and acc.duplicates == 150

      # The ring holds its last 256 positions: 0 is still there, then not.
      calls(buf, 100)
      :ok = AsyncWriter.drain(w)
      assert AsyncWriter.get_state(w).current_position == 400
      assert {:error, {:not_held, 144}} = AsyncWriter.set_position(w, 0)
      assert AsyncWriter.get_metrics(w).replayed == 150
      assert :ok = AsyncWriter.set_position(w, 144)
      m = AsyncWriter.get_metrics(w)
      assert m.replayed == 150 + 256 and m.replay_missed == 0
      assert m.events_read == m.consumed + m.replayed
      assert m.events_read == m.events_processed + m.dead_lettered
      :ok = PipelineManager.flush(pm)
      acc = PipelineTestHelpers.assert_exact_accounting!(pm)
      assert acc.stored == 400 and acc.duplicates == 150 + 256
      assert acc.accepted == m.events_read
    end

    test "a replay into a fresh private store stores the events again" do
      buf = ring!(256)
      {:ok, w} = AsyncWriter.start_link(ring_buffer: buf, poll_interval_ms: 60_000)
      calls(buf, 50)
      :ok = AsyncWriter.stop(w)

      # A new writer over the same ring: the position is kept, the private
      # store is new; rewinding fills it from the ring.
      w2 = sup!(AsyncWriter, ring_buffer: buf, poll_interval_ms: 60_000)
      state = AsyncWriter.get_state(w2)
      assert state.resumed and state.current_position == 100
      assert DataAccess.get_stats(AsyncWriter.data_access(w2)).total_events == 0
      :ok = AsyncWriter.set_position(w2, 0)
      assert DataAccess.get_stats(AsyncWriter.data_access(w2)).total_events == 100
      m = AsyncWriter.get_metrics(w2)
      assert m.consumed == 100 and m.replayed == 100 and m.events_processed == 200
    end

    test "a writer killed in the middle of a replay resumes the replay exactly" do
      pm = PipelineTestHelpers.start_pipeline!(shards: 1, ring_size: 64)
      buf = ring!(4096)
      name = :"replayer_#{System.unique_integer([:positive])}"

      sup!(AsyncWriter,
        name: name,
        ring_buffer: buf,
        pipeline: pm,
        batch_size: 10,
        poll_interval_ms: 2
      )

      calls(buf, 1000)
      :ok = AsyncWriter.drain(name)
      # Slow the store down: each batch of 10 takes >= 1 ms.
      :ok = Native.pipe_inject_delay(PipelineManager.handles(pm).pipe, 1000)
      pid = wait_for_name(name)
      replay = Task.async(fn -> catch_exit(AsyncWriter.set_position(name, 0)) end)
      Process.sleep(60)
      ref = Process.monitor(pid)
      Process.exit(pid, :kill)
      assert_receive {:DOWN, ^ref, :process, ^pid, :killed}
      Task.await(replay)

      # (The supervisor may still be restarting it: look the name up each time.)
      wait_until(fn -> AsyncWriter.get_state(wait_for_name(name)).replay_end == nil end, 5000)
      :ok = Native.pipe_inject_delay(PipelineManager.handles(pm).pipe, 0)
      assert AsyncWriter.get_state(name).resumed
      m = AsyncWriter.get_metrics(name)
      # Every replayed position read again exactly once, across the kill.
      assert m.replayed == 2000 and m.replay_missed == 0
      assert m.consumed == 2000
      assert m.events_read == m.events_processed + m.dead_lettered
      :ok = PipelineManager.flush(pm)
      acc = PipelineTestHelpers.assert_exact_accounting!(pm)
      assert acc.accepted == 4000 and acc.stored == 2000 and acc.duplicates == 2000
    end

    test "two live writers cannot share a cursor key" do
      buf = ring!()
      _w = sup!(AsyncWriter, ring_buffer: buf, cursor: :k)
      Process.flag(:trap_exit, true)
      assert {:error, {:cursor_in_use, :k}} = AsyncWriter.start_link(ring_buffer: buf, cursor: :k)
      assert {:ok, w2} = AsyncWriter.start_link(ring_buffer: buf, cursor: :other)
      :ok = AsyncWriter.stop(w2)
    end
  end

  describe "AsyncWriterPool workers are processes" do
    test "the original's lifecycle: configured, pids, stop stops them" do
      {:ok, pool} =
        AsyncWriterPool.start_link(%{
          pool_size: 3,
          ring_buffer: nil,
          batch_size: 25,
          poll_interval_ms: 50
        })

      state = AsyncWriterPool.get_state(pool)
      assert state.config.pool_size == 3
      assert state.config.batch_size == 25
      assert state.config.poll_interval_ms == 50
      assert [_, _, _] = workers = state.workers
      assert Enum.all?(workers, &Process.alive?/1)

      # As in the original: pid => index, one index per worker.
      assignments = AsyncWriterPool.get_worker_assignments(pool)
      assert Map.keys(assignments) |> Enum.sort() == Enum.sort(workers)
      assert assignments |> Map.values() |> Enum.sort() == [0, 1, 2]
      segments = Map.values(AsyncWriterPool.get_shard_assignments(pool))
      assert length(Enum.uniq(segments)) == 3

      # The original's state keys: start_time, a monitor per worker, the
      # ring and poll interval in config.
      assert is_integer(state.start_time)
      assert state.start_time <= ElixirScope.Utils.monotonic_timestamp()
      assert Map.keys(state.worker_monitors) |> Enum.sort() == Enum.sort(workers)
      assert Enum.all?(Map.values(state.worker_monitors), &is_reference/1)
      assert %RingBuffer{} = state.config.ring_buffer
      assert state.config.ring_buffer == AsyncWriterPool.ring_buffer(pool)

      for wpid <- workers do
        ws = AsyncWriter.get_state(wpid)
        assert is_integer(ws.start_time) and is_integer(ws.last_poll_time)
        assert ws.last_poll_time <= ElixirScope.Utils.monotonic_timestamp()
      end

      :ok = AsyncWriterPool.scale_pool(pool, 4)
      assert length(AsyncWriterPool.get_state(pool).workers) == 4
      :ok = AsyncWriterPool.scale_pool(pool, 3)
      assert AsyncWriterPool.get_state(pool).workers == workers
      assert AsyncWriterPool.health_check(pool).status == :healthy

      :ok = AsyncWriterPool.stop(pool)
      refute Enum.any?(workers, &Process.alive?/1)
    end

    test "a killed worker is restarted in its place and resumes its segment: nothing lost or repeated" do
      pm =
        PipelineTestHelpers.start_pipeline!(
          shards: 4,
          ring_size: 1 <<< 15,
          async_writer_pool_size: 2,
          batch_size: 8
        )

      buf = PipelineManager.ring_buffer(pm)
      pool = PipelineTestHelpers.child_pid(pm, AsyncWriterPool)
      [w0, w1] = AsyncWriterPool.get_state(pool).workers
      before = AsyncWriter.get_state(w0)
      assert before.shards == [0, 2]

      producers =
        for p <- 1..4 do
          Task.async(fn ->
            for i <- 1..3000 do
              :ok = Ingestor.ingest_function_call(buf, M, :f, [p, i], self(), i)
              if rem(i, 300) == 0, do: Process.sleep(2)
            end
          end)
        end

      killed =
        for _ <- 1..4, reduce: [w0] do
          [w | _] = acc ->
            Process.sleep(5)
            ref = Process.monitor(w)
            Process.exit(w, :kill)
            assert_receive {:DOWN, ^ref, :process, ^w, :killed}
            new = wait_until_restarted(pool, w)
            [new | acc]
        end

      Task.await_many(producers, 30_000)
      :ok = PipelineManager.flush(pm, 30_000)

      [w0_now, w1_now] = AsyncWriterPool.get_state(pool).workers
      assert w1_now == w1
      refute w0_now in tl(killed)
      assert w0_now == hd(killed)
      after_ = AsyncWriter.get_state(w0_now)
      assert after_.shards == [0, 2]
      assert after_.lease == :held
      assert after_.events_read >= before.events_read
      assert after_.current_position >= before.current_position
      assert AsyncWriterPool.get_state(pool).restarts == 4
      # The monitors and the pid => index map follow the restarts.
      st = AsyncWriterPool.get_state(pool)
      assert Map.keys(st.worker_monitors) |> Enum.sort() == Enum.sort([w0_now, w1_now])
      assert st.worker_assignments == %{w0_now => 0, w1_now => 1}
      assert AsyncWriterPool.health_check(pool).status == :healthy

      acc = PipelineTestHelpers.assert_exact_accounting!(pm)
      assert acc.accepted == 12_000 and acc.stored == 12_000 and acc.duplicates == 0

      store = PipelineManager.data_access(pm)

      for t <- producers do
        {:ok, evs} = DataAccess.query_by_process(store, t.pid, limit: 10_000)
        assert Enum.map(evs, fn e -> List.last(e.args) end) == Enum.to_list(1..3000)
      end

      per = AsyncWriterPool.get_metrics(pool).per_worker
      assert per |> Map.values() |> Enum.map(& &1.events) |> Enum.sum() == 12_000
    end

    test "a worker's thread parks while its process is dead and resumes with the next owner" do
      {:ok, p} =
        ElixirScope.Capture.Pipeline.start(%{
          shards: 1,
          ring_size: 1024,
          async_writer_pool_size: 1
        })

      owner = fn ->
        parent = self()

        spawn(fn ->
          {:ok, lease} = Native.pipe_worker_lease(p.pipe, 0)
          send(parent, {:leased, self()})
          receive do: (:release -> send(parent, {:released, Native.pipe_worker_release(lease)}))
        end)
        |> tap(fn pid -> assert_receive {:leased, ^pid} end)
      end

      o1 = owner.()
      calls(p.ring_buffer, 10)
      assert Native.pipe_flush(p.pipe, 5000)
      ref = Process.monitor(o1)
      Process.exit(o1, :kill)
      assert_receive {:DOWN, ^ref, :process, ^o1, :killed}
      wait_until(fn -> Native.pipe_workers(p.pipe) |> elem(1) |> hd() |> elem(3) == :orphaned end)

      # Nobody stands for the thread: its shard is left where it stands.
      calls(p.ring_buffer, 10)
      refute Native.pipe_flush(p.pipe, 50)
      assert Native.pipe_metrics(p.pipe).accounting.in_flight == 20

      o2 = owner.()
      assert Native.pipe_flush(p.pipe, 5000)
      acc = Native.pipe_metrics(p.pipe).accounting
      assert acc.stored == 40 and acc.in_flight == 0 and acc.duplicates == 0

      # Given back on purpose: the thread runs without an owner.
      send(o2, :release)
      assert_receive {:released, true}
      assert Native.pipe_workers(p.pipe) |> elem(1) |> hd() |> elem(3) == :free
      calls(p.ring_buffer, 5)
      assert Native.pipe_flush(p.pipe, 5000)
      Native.pipe_shutdown(p.pipe, 1000)
    end
  end

  defp wait_for_name(name, tries \\ 1000) do
    case Process.whereis(name) do
      pid when is_pid(pid) ->
        pid

      nil when tries > 0 ->
        Process.sleep(2)
        wait_for_name(name, tries - 1)

      nil ->
        flunk("#{inspect(name)} did not restart")
    end
  end

  defp wait_until_restarted(pool, dead, tries \\ 1000) do
    [w | _] = AsyncWriterPool.get_state(pool).workers

    cond do
      w != dead and Process.alive?(w) -> w
      tries == 0 -> flunk("worker not restarted")
      true -> Process.sleep(2) && wait_until_restarted(pool, dead, tries - 1)
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

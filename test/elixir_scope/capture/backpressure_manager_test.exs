defmodule ElixirScope.Capture.BackpressureManagerTest do
  use ExUnit.Case, async: false

  alias ElixirScope.Capture.{BackpressureManager, Ingestor, PipelineManager}
  alias ElixirScope.{Debug, Native, Telemetry}

  @events [
    [:elixir_scope, :layer2, :pressure],
    [:elixir_scope, :layer2, :scaling],
    [:elixir_scope, :layer2, :shedding],
    [:elixir_scope, :layer2, :circuit],
    [:elixir_scope, :layer2, :throughput],
    [:elixir_scope, :layer2, :latency],
    [:elixir_scope, :layer2, :health]
  ]

  defp start!(opts) do
    opts = Keyword.merge([name: nil, shards: 4, ring_size: 4096], opts)

    start_supervised!(%{
      id: make_ref(),
      start: {PipelineManager, :start_link, [opts]},
      type: :supervisor
    })
  end

  defp pipe(pm), do: PipelineManager.handles(pm).pipe

  # Polls `fun` every 20 ms until it returns a truthy value (or fails after
  # `ms`). A liveness wait, not a timing assertion.
  defp eventually(fun, ms \\ 10_000) do
    deadline = System.monotonic_time(:millisecond) + ms

    Stream.repeatedly(fn ->
      v = fun.()

      if !v and System.monotonic_time(:millisecond) > deadline,
        do: flunk("condition not met in #{ms} ms")

      v || (Process.sleep(20) && nil)
    end)
    |> Enum.find(& &1)
  end

  defp received(event) do
    receive do
      {:elixir_scope_telemetry, ^event, m, meta} -> {m, meta}
    after
      0 -> nil
    end
  end

  defp drain_telemetry(acc \\ []) do
    receive do
      {:elixir_scope_telemetry, e, m, meta} -> drain_telemetry([{e, m, meta} | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  describe "options and policy" do
    test "bad options raise ArgumentError" do
      for bad <- [
            [check_interval_ms: 0],
            [auto_scale: :yes],
            [min_workers: 4, max_workers: 2],
            [max_workers: 65],
            [thresholds: %{buffer: {0.9, 0.5, 0.95}}],
            [thresholds: %{cpu: {1, 2, 3}}],
            [shedding: %{high: {0, true}}],
            [bogus: 1]
          ] do
        assert_raise ArgumentError, fn -> BackpressureManager.start_link([name: nil] ++ bad) end
      end

      assert_raise ArgumentError, fn ->
        PipelineManager.start_link(name: nil, backpressure: [min_workers: 0])
      end

      assert_raise ArgumentError, fn ->
        PipelineManager.start_link(name: nil, backpressure: :on)
      end
    end

    test "the seeds' scaling recommendations" do
      c = %{min_workers: 1, max_workers: 8, target_workers: 4}
      assert BackpressureManager.recommend(:critical, 2, c) == {:scale_up, 4}
      assert BackpressureManager.recommend(:critical, 6, c) == {:scale_up, 2}
      assert BackpressureManager.recommend(:critical, 8, c) == :maintain
      assert BackpressureManager.recommend(:high, 7, c) == {:scale_up, 1}
      assert BackpressureManager.recommend(:elevated, 3, c) == {:scale_up, 1}
      assert BackpressureManager.recommend(:elevated, 4, c) == :maintain
      assert BackpressureManager.recommend(:normal, 3, c) == {:scale_down, 1}
      assert BackpressureManager.recommend(:normal, 1, c) == :maintain
    end

    test "a pipeline's manager observes only by default" do
      pm = start!(async_writer_pool_size: 2)
      bpm = PipelineManager.backpressure_manager(pm)
      assert BackpressureManager.check_pressure(bpm) == :normal
      assert BackpressureManager.get_scaling_recommendation(bpm) == :maintain
      st = BackpressureManager.get_state(bpm)
      assert st.config.auto_scale == false and st.shedding.enabled == false
      assert {st.config.min_workers, st.config.max_workers} == {2, 4}
      assert BackpressureManager.check_now(bpm) == :normal
    end

    test "with no manager running: {:error, :not_running}, never an exit" do
      # The application runs no default pipeline here, so no default manager.
      assert Process.whereis(BackpressureManager) == nil
      assert BackpressureManager.check_pressure() == {:error, :not_running}
      assert BackpressureManager.get_scaling_recommendation() == {:error, :not_running}
      assert BackpressureManager.enable_load_shedding() == {:error, :not_running}
      assert BackpressureManager.disable_load_shedding() == {:error, :not_running}
      assert BackpressureManager.get_state() == {:error, :not_running}
      assert BackpressureManager.check_now() == {:error, :not_running}

      # A stopped manager, and a name nothing is registered under.
      pm = start!(async_writer_pool_size: 1)
      {:ok, bpm} = BackpressureManager.start_link(name: nil, pipeline: pm)
      :ok = GenServer.stop(bpm)
      assert BackpressureManager.check_pressure(bpm) == {:error, :not_running}
      assert BackpressureManager.check_pressure(:es_no_such_manager) == {:error, :not_running}

      # Not a manager at all.
      assert_raise ArgumentError, fn -> BackpressureManager.check_pressure(self()) end
      assert_raise ArgumentError, fn -> BackpressureManager.check_pressure("manager") end
    end
  end

  describe "overload" do
    @tag timeout: 120_000
    test "pressure climbs to critical, the pool scales up and sheds, then everything returns to normal; every event is accounted for" do
      :ok = Telemetry.subscribe(@events)

      pm =
        start!(
          async_writer_pool_size: 1,
          batch_size: 200,
          backpressure: [
            check_interval_ms: 25,
            telemetry_interval_ms: 100,
            auto_scale: true,
            min_workers: 1,
            max_workers: 4,
            load_shedding: true
          ]
        )

      bpm = PipelineManager.backpressure_manager(pm)
      buf = PipelineManager.ring_buffer(pm)
      # A slow store: every batch of 200 takes 2 ms more (~100k events/s
      # per worker), far below what the producers write.
      :ok = Native.pipe_inject_delay(pipe(pm), 2000)
      mem0 = :erlang.memory(:total)
      test = self()

      # Four producers write as fast as they can for 1.5 s.
      until = System.monotonic_time(:millisecond) + 1500

      producers =
        for p <- 1..4 do
          spawn_link(fn -> send(test, {:done, self(), produce(buf, p, until, 0, 0)}) end)
        end

      # The VM stays responsive: a process answers pings throughout.
      echo = spawn_link(fn -> echo_loop() end)
      worst = ping_until_done(echo, producers, 0)
      assert worst < 1_000, "a ping took #{worst} ms under overload"

      totals =
        for p <- producers, reduce: %{ok: 0, full: 0} do
          acc ->
            receive do
              {:done, ^p, c} -> %{ok: acc.ok + c.ok, full: acc.full + c.full}
            end
        end

      st = BackpressureManager.get_state(bpm)
      assert Enum.any?(st.history, &(&1.to == :critical)), inspect(st.history)
      events = drain_telemetry()
      scaled = for {[_, _, :scaling], m, _} <- events, do: m.workers
      assert Enum.max(scaled, fn -> 1 end) > 1, "the pool scaled up: #{inspect(scaled)}"

      assert Enum.any?(events, &match?({[_, _, :shedding], %{keep_one_in: 16}, _}, &1)),
             "shedding followed the pressure"

      assert Enum.any?(events, &match?({[_, _, :pressure], _, %{to: :critical}}, &1))

      # Memory stayed bounded (the ring refuses, it never grows).
      assert :erlang.memory(:total) - mem0 < 200 * 1024 * 1024

      # The store is fast again: pressure returns to normal with
      # hysteresis, shedding stops and the pool scales back down.
      :ok = Native.pipe_inject_delay(pipe(pm), 0)
      :ok = PipelineManager.flush(pm, 60_000)
      eventually(fn -> BackpressureManager.check_pressure(bpm) == :normal end)
      eventually(fn -> PipelineManager.get_metrics(pm).active_workers == 1 end)
      eventually(fn -> PipelineManager.get_metrics(pm).shedding.keep_one_in == 1 end)

      m = PipelineManager.get_metrics(pm)
      acc = m.accounting
      # Every write: accepted into the ring, shed by policy, or refused.
      assert acc.accepted + acc.shed == totals.ok
      assert acc.buffer_full == totals.full
      assert totals.ok > 0 and totals.full > 0
      assert acc.shed > 0 and acc.shed == m.shedding.sampled + m.shedding.low_priority
      assert acc.unaccounted == 0 and acc.in_flight == 0
      assert acc.stored == acc.accepted
      Telemetry.unsubscribe()
    end
  end

  defp produce(buf, p, until, ok, full) do
    if rem(ok + full, 1000) == 0 and System.monotonic_time(:millisecond) >= until do
      %{ok: ok, full: full}
    else
      case Ingestor.ingest_function_call(buf, M, :f, [ok], self(), {p, ok + full}) do
        :ok -> produce(buf, p, until, ok + 1, full)
        {:error, :buffer_full} -> produce(buf, p, until, ok, full + 1)
      end
    end
  end

  defp echo_loop do
    receive do
      {:ping, from} ->
        send(from, :pong)
        echo_loop()
    end
  end

  defp ping_until_done(echo, producers, worst) do
    if Enum.any?(producers, &Process.alive?/1) do
      t0 = System.monotonic_time(:millisecond)
      send(echo, {:ping, self()})

      receive do
        :pong -> :ok
      end

      Process.sleep(5)
      ping_until_done(echo, producers, max(worst, System.monotonic_time(:millisecond) - t0))
    else
      worst
    end
  end

  describe "faults" do
    test "store failures open the circuit, events are dead-lettered and counted, and it recovers" do
      :ok = Telemetry.subscribe([[:elixir_scope, :layer2, :circuit]])

      pm =
        start!(
          shards: 1,
          async_writer_pool_size: 1,
          batch_size: 10,
          breaker_threshold: 3,
          breaker_open_ms: 150,
          max_dead_letters: 5,
          backpressure: [check_interval_ms: 10]
        )

      buf = PipelineManager.ring_buffer(pm)
      # 3 batches x 2 attempts open the breaker.
      :ok = Native.pipe_inject_failures(pipe(pm), 6)
      for i <- 1..30, do: :ok = Ingestor.ingest_state_change(buf, self(), i, i + 1)
      :ok = PipelineManager.flush(pm)
      m = PipelineManager.get_metrics(pm)
      assert m.circuit.state == :open and m.circuit.opens == 1
      assert m.accounting.dead_lettered == 30
      # A worker may drain while the loop still writes: the three failing
      # batches then hold fewer than 30 events and the breaker, open after
      # the third, rejects the rest of them (at least one event each).
      rejected_before = m.circuit.rejected_events
      assert rejected_before <= 27

      # While open, batches skip the stage and go to the dead letters.
      for i <- 1..20, do: :ok = Ingestor.ingest_state_change(buf, self(), i, i)
      :ok = PipelineManager.flush(pm)
      m = PipelineManager.get_metrics(pm)
      assert m.circuit.rejected_events == rejected_before + 20
      assert m.accounting.dead_lettered == 50
      assert {:error, problems, _} = Debug.check_health(pm)
      assert Enum.any?(problems, &(&1 =~ "circuit"))

      # After the open period a probe succeeds and closes it.
      Process.sleep(200)
      for i <- 1..20, do: :ok = Ingestor.ingest_state_change(buf, self(), i, i)
      :ok = PipelineManager.flush(pm)
      m = PipelineManager.get_metrics(pm)
      assert m.circuit.state == :closed
      assert m.accounting.stored == 20
      assert m.accounting.accepted == m.accounting.stored + m.accounting.dead_lettered
      assert m.accounting.unaccounted == 0
      assert length(PipelineManager.dead_letters(pm)) == 5

      # The manager saw the breaker open and close.
      eventually(fn ->
        BackpressureManager.get_state(PipelineManager.backpressure_manager(pm)).circuit == :closed
      end)

      seen = for {[_, _, :circuit], _, meta} <- drain_telemetry(), do: meta.to
      assert :open in seen and List.last(seen) == :closed
      Telemetry.unsubscribe()
    end

    test "killing the manager's processes loses nothing; the backpressure manager restarts" do
      pm = start!(async_writer_pool_size: 2)
      buf = PipelineManager.ring_buffer(pm)
      bpm = PipelineManager.backpressure_manager(pm)
      ref = Process.monitor(bpm)
      Process.exit(bpm, :kill)
      assert_receive {:DOWN, ^ref, _, _, :killed}

      for i <- 1..1000, do: :ok = Ingestor.ingest_function_call(buf, M, :f, [i], self(), i)

      eventually(fn ->
        new = PipelineManager.backpressure_manager(pm)
        is_pid(new) and new != bpm
      end)

      :ok = PipelineManager.flush(pm)
      acc = PipelineManager.get_metrics(pm).accounting
      assert acc.stored == 1000 and acc.unaccounted == 0
    end
  end

  describe "telemetry and debug" do
    test "periodic throughput, latency and health events; debug views" do
      :ok =
        Telemetry.subscribe([
          [:elixir_scope, :layer2, :throughput],
          [:elixir_scope, :layer2, :latency],
          [:elixir_scope, :layer2, :health]
        ])

      pm = start!(backpressure: [check_interval_ms: 10, telemetry_interval_ms: 30])
      buf = PipelineManager.ring_buffer(pm)
      :ok = Ingestor.ingest_function_call(buf, M, :outer, [], self(), :o)
      :ok = Ingestor.ingest_function_call(buf, M, :inner, [], self(), :i)
      :ok = PipelineManager.flush(pm)

      eventually(fn -> received([:elixir_scope, :layer2, :health]) end)
      {tp, meta} = eventually(fn -> received([:elixir_scope, :layer2, :throughput]) end)
      assert is_number(tp.events_per_second) and meta.pipeline != nil
      {lat, _} = eventually(fn -> received([:elixir_scope, :layer2, :latency]) end)
      assert Map.keys(lat) |> Enum.sort() == [:p50, :p95, :p99]
      Telemetry.unsubscribe()

      assert {:ok, report} = Debug.check_health(pm)
      assert report.checks.worker_pool == :ok

      st = Debug.get_pipeline_state(pm)
      assert length(st.buffers) == 4
      assert Enum.sum(for b <- st.buffers, do: b.write_position) == 2
      assert st.correlation_state.open_calls == 2
      assert st.circuit.state == :closed

      ws = Debug.worker_stats(pm)
      assert length(ws.per_worker) == ws.workers
      assert ws.per_worker |> Enum.flat_map(& &1.shards) |> Enum.sort() == [0, 1, 2, 3]

      dump = Debug.dump_correlation_state(pm)
      assert [%{pid: pid, depth: 2, innermost_call_ids: [inner_id, outer_id]}] = dump.stacks
      assert pid == self()

      ev = Debug.trace_event(pm, inner_id)
      assert ev.status == :stored and ev.parent_id == outer_id
      assert ev.shard == Native.shard_of_pid(self(), 4)
      assert Debug.trace_event(pm, 999_999_999_999).status == :not_stored
      assert %{level: :normal} = Debug.backpressure_analysis(pm)
    end
  end
end

defmodule ElixirScope.EventsFieldsTest do
  # The original's fields of `FunctionEntry`, `FunctionExit`, `ProcessExit`,
  # `StateChange` and `StateSnapshot` (pid, correlation id, timestamps, and
  # the snapshot's session fields): each struct, written to a ring, a
  # pipeline, a DataAccess store and a trace file, comes back equal with
  # all its fields; queries by process and correlation find it; the
  # pipeline's correlator and EventCorrelator.correlate_batch/2 take an
  # entry and an exit of a process as a call and a return.
  use ExUnit.Case, async: true

  import Bitwise, only: [<<<: 2]
  import ElixirScope.PipelineTestHelpers, only: [start_pipeline!: 1]

  alias ElixirScope.Capture.{EventCorrelator, Ingestor, PipelineManager, RingBuffer}
  alias ElixirScope.{Analysis, Events, TraceFile}
  alias ElixirScope.Events.{FunctionEntry, FunctionExit, ProcessExit, StateChange, StateSnapshot}
  alias ElixirScope.Storage.{DataAccess, QueryCoordinator}

  @moduletag :tmp_dir

  defp samples do
    me = self()
    ref = make_ref()
    now = System.monotonic_time(:nanosecond)
    wall = System.system_time(:nanosecond)

    [
      %FunctionEntry{
        module: MyApp.Worker,
        function: :handle,
        arity: 2,
        args: [{:job, 1}, %{opts: [a: 1]}],
        call_id: 9_001,
        caller_module: MyApp.Server,
        caller_function: :loop,
        caller_line: 42,
        pid: me,
        correlation_id: "req-1",
        timestamp: now,
        wall_time: wall
      },
      %FunctionExit{
        module: MyApp.Worker,
        function: :handle,
        arity: 2,
        call_id: 9_001,
        result: {:ok, [1, 2.5, "three"]},
        duration_ns: 1_234,
        exit_reason: :normal,
        pid: me,
        correlation_id: "req-1",
        timestamp: now + 10,
        wall_time: wall + 10
      },
      %FunctionExit{
        module: MyApp.Worker,
        function: :fail,
        arity: 0,
        call_id: ref,
        result: %RuntimeError{message: "boom"},
        duration_ns: nil,
        exit_reason: :exception,
        pid: me,
        correlation_id: {:corr, 2},
        timestamp: now + 20,
        wall_time: wall + 20
      },
      %ProcessExit{
        exited_pid: me,
        exit_reason: {:shutdown, :done},
        lifetime_ns: 5_000_000,
        message_count: 12,
        final_state: %{count: 3},
        pid: me,
        reason: {:shutdown, :done},
        correlation_id: 77,
        timestamp: now + 30,
        wall_time: wall + 30
      },
      %ProcessExit{pid: me, reason: :killed, timestamp: now + 31},
      %StateChange{
        id: 5,
        timestamp: now + 40,
        wall_time: wall + 40,
        server_pid: me,
        callback: :handle_call,
        old_state: %{n: 1},
        new_state: %{n: 2},
        state_diff: :changed,
        trigger_message: {:inc, 1},
        trigger_call_id: 9_001,
        pid: me,
        correlation_id: "req-1"
      },
      %StateSnapshot{
        server_pid: me,
        snapshot_id: "snap-1",
        state: %{n: 2, log: ["a", "b"]},
        checkpoint_type: :before_call,
        sequence_number: 3,
        memory_usage: 2_688,
        message_queue_len: 0,
        pid: me,
        session_id: {:session, 1},
        correlation_id: "req-1",
        timestamp: now + 50,
        wall_time: wall + 50,
        snapshot_reason: :manual
      }
    ]
  end

  # Structs with odd values in the new fields: stored as the terms they are.
  defp odd do
    me = self()

    [
      %FunctionEntry{module: M, function: :f, pid: "not a pid", call_id: 1},
      %FunctionEntry{module: "M", function: 7, arity: :x, pid: me, call_id: nil},
      %FunctionExit{pid: :name, call_id: 1},
      %FunctionExit{pid: me, duration_ns: "slow", exit_reason: {:weird, 1}, module: 1.5},
      %ProcessExit{exited_pid: nil, pid: nil, reason: :x},
      %ProcessExit{exited_pid: "p", pid: me, timestamp: :later, wall_time: -1},
      %StateChange{server_pid: :srv, pid: 3},
      %StateSnapshot{server_pid: nil, pid: nil, state: 1},
      %StateSnapshot{pid: me, sequence_number: -5, memory_usage: "lots"},
      Map.put(%FunctionEntry{pid: me}, :extra, 1),
      Map.delete(%StateSnapshot{pid: me}, :session_id)
    ]
  end

  defp unique_id(%StateChange{} = s), do: %{s | id: System.unique_integer([:positive])}
  defp unique_id(%StateSnapshot{} = s), do: %{s | snapshot_id: make_ref()}
  defp unique_id(s), do: s

  defp pipeline!(opts \\ []), do: start_pipeline!([shards: 1] ++ opts)

  defp stored(pm) do
    :ok = PipelineManager.flush(pm)
    store = PipelineManager.data_access(pm)
    {:ok, %{events: events}} = QueryCoordinator.query(store, limit: 10_000)
    events
  end

  defp everything(store) do
    {:ok, all} = DataAccess.query_by_time_range(store, -(1 <<< 62), 1 <<< 62)
    all
  end

  describe "the structs" do
    test "have the original's fields with nil defaults, and ours" do
      assert %FunctionEntry{}.pid == nil and %FunctionEntry{}.wall_time == nil
      assert Map.has_key?(%FunctionExit{}, :correlation_id)
      assert Map.has_key?(%ProcessExit{}, :reason)
      assert Map.has_key?(%StateChange{}, :id) and Map.has_key?(%StateChange{}, :pid)
      assert Map.has_key?(%StateSnapshot{}, :snapshot_reason)
      assert Map.has_key?(%StateSnapshot{}, :message_queue_len)
      for s <- samples(), do: assert(s |> Events.serialize() |> Events.deserialize() == s)
    end
  end

  describe "through a ring" do
    test "write/2, write_batch/2 and read back: each equal, all fields" do
      samples = samples()
      {:ok, buf} = RingBuffer.new(size: 64)
      for s <- samples, do: :ok = RingBuffer.write(buf, s)
      n = length(samples)
      assert {:ok, ^n} = RingBuffer.write_batch(buf, samples)
      assert {read, _} = RingBuffer.read_batch(buf, 0, 100)
      assert read == samples ++ samples
      assert RingBuffer.stats(buf).truncated_events == 0

      {:ok, buf} = RingBuffer.new(size: 64)

      for {s, pos} <- Enum.with_index(samples) do
        :ok = RingBuffer.write(buf, s)
        assert {:ok, ^s, _} = RingBuffer.read(buf, pos)
      end
    end

    test "odd values in the new fields are kept as written, never a crash" do
      {:ok, buf} = RingBuffer.new(size: 64)
      odd = odd()
      for e <- odd, do: :ok = RingBuffer.write(buf, e)
      assert {^odd, _} = RingBuffer.read_batch(buf, 0, 100)
      assert {:ok, _} = RingBuffer.write_batch(buf, odd)
    end

    test "a field too big for the ring becomes a marker; the others survive" do
      {:ok, buf} = RingBuffer.new(size: 8, max_event_bytes: 256)
      me = self()
      big = %{data: :binary.copy("x", 10_000)}

      entry = %FunctionEntry{
        module: M,
        function: :f,
        args: [big],
        pid: me,
        call_id: 1,
        timestamp: 3
      }

      snap = %StateSnapshot{pid: me, state: big, session_id: 9, wall_time: 4}
      exit = %ProcessExit{exited_pid: me, final_state: big, reason: :normal}

      for e <- [entry, snap, exit], do: :ok = RingBuffer.write(buf, e)
      assert {[e, s, x], 3} = RingBuffer.read_batch(buf, 0, 10)
      assert {:truncated, _, _} = e.args
      assert %{e | args: [big]} == entry
      # Small maps (a state) are cut value by value.
      assert %{data: {:truncated, _, :binary}} = s.state
      assert %{s | state: big} == snap
      assert %{data: {:truncated, _, :binary}} = x.final_state
      assert %{x | final_state: big} == exit
    end

    test "every struct the Ingestor's records read back as has all of its struct's keys" do
      {:ok, buf} = RingBuffer.new(size: 16)
      me = self()
      :ok = Ingestor.ingest_state_change(buf, me, %{n: 1}, %{n: 2})
      :ok = Ingestor.ingest_state_change(buf, me, :same, :same)
      :ok = Ingestor.ingest_state_snapshot(buf, me, %{n: 2}, :manual)
      :ok = Ingestor.ingest_process_exit(buf, me, :normal)
      :ok = Ingestor.ingest_function_call(buf, M, :f, [1], me, 1)
      :ok = Ingestor.ingest_function_return(buf, :ok, 5, 1)
      {read, 6} = RingBuffer.read_batch(buf, 0, 10)

      for %mod{} = e <- read do
        assert Map.keys(e) |> Enum.sort() == Map.keys(mod.__struct__()) |> Enum.sort(), inspect(e)
      end

      [changed, same | _] = read

      assert %StateChange{server_pid: ^me, old_state: %{n: 1}, new_state: %{n: 2}} = changed
      assert changed.state_diff == :changed and changed.callback == :unknown
      # As the original's ingest_state_change: no pid or correlation id.
      assert changed.pid == nil and changed.correlation_id == nil
      assert is_integer(changed.id) and is_integer(changed.timestamp)
      assert same.state_diff == :no_change
    end

    test "Ingestor.ingest_state_snapshot reads back with pid and the record's times" do
      {:ok, buf} = RingBuffer.new(size: 8)
      me = self()
      :ok = Ingestor.ingest_state_snapshot(buf, me, %{a: 1}, :manual)
      assert {:ok, %StateSnapshot{} = s, _} = RingBuffer.read(buf, 0)
      assert s.server_pid == me and s.pid == me and s.state == %{a: 1}
      assert s.snapshot_reason == :manual
      assert is_integer(s.timestamp) and is_integer(s.wall_time)
      assert s.session_id == nil and s.snapshot_id == nil and s.checkpoint_type == nil
    end
  end

  describe "Ingestor.ingest_generic_event/7" do
    test "builds the original's structs, with pid, correlation id and timestamps" do
      {:ok, buf} = RingBuffer.new(size: 16)
      me = self()
      ing = &Ingestor.ingest_generic_event(buf, &1, &2, me, :corr, 100, 200)

      :ok = ing.(:function_entry, %{module: M, function: :f, arity: 1, args: [1]})
      :ok = ing.(:function_exit, %{module: M, function: :f, return_value: 2, call_id: 5})
      :ok = ing.(:state_change, %{old_state: 1, new_state: 2})
      :ok = ing.(:state_snapshot, %{state: 3, session_id: "s"})
      :ok = ing.(:process_exit, %{reason: :normal, final_state: 4})
      :ok = ing.(:message_received, %{message: :hi})
      :ok = ing.(:message_sent, %{message: :hi, to_pid: me})
      :ok = ing.(:custom, %{x: 1})

      {[fe, fx, sc, ss, pe, mr, ms, custom], 8} = RingBuffer.read_batch(buf, 0, 10)

      for e <- [fe, fx, sc, ss, pe, mr, ms] do
        assert {e.correlation_id, e.timestamp, e.wall_time} == {:corr, 100, 200}, inspect(e)
      end

      assert %FunctionEntry{module: M, function: :f, arity: 1, args: [1], pid: ^me} = fe
      assert is_integer(fe.call_id)

      assert %FunctionExit{result: 2, call_id: 5, duration_ns: 0, exit_reason: :normal, pid: ^me} =
               fx

      assert %StateChange{server_pid: ^me, pid: ^me, callback: :unknown, new_state: 2} = sc

      assert %StateSnapshot{server_pid: ^me, pid: ^me, state: 3, session_id: "s"} = ss
      assert ss.checkpoint_type == :manual and ss.sequence_number == 0

      assert %ProcessExit{exited_pid: ^me, pid: ^me, exit_reason: :normal, reason: :normal} = pe
      assert pe.lifetime_ns == 0 and pe.final_state == 4
      assert %Events.MessageReceived{pid: ^me, message: :hi} = mr
      assert %Events.MessageSent{from_pid: ^me, to_pid: ^me, message: :hi} = ms
      assert %Events{event_type: :custom, data: %{x: 1}, pid: ^me} = custom
    end
  end

  describe "through a pipeline into the store" do
    test "each is stored and comes back equal; queries by process find them" do
      samples = samples()
      pm = pipeline!()
      buf = PipelineManager.ring_buffer(pm)
      for s <- samples, do: :ok = RingBuffer.write(buf, s)

      events = stored(pm)
      assert Enum.map(events, & &1.event) == samples
      store = PipelineManager.data_access(pm)
      assert everything(store) == samples

      for %{id: id, event: e} <- events, do: assert({:ok, ^e} = DataAccess.get_event(store, id))

      {:ok, mine} = DataAccess.query_by_process(store, self())
      assert mine == samples

      {:ok, handles} = DataAccess.query_by_function(store, MyApp.Worker, :handle)
      assert handles == Enum.take(samples, 2)
    end

    test "odd values go through a pipeline as the terms they are" do
      pm = pipeline!()
      buf = PipelineManager.ring_buffer(pm)
      odd = odd()
      for e <- odd, do: :ok = RingBuffer.write(buf, e)
      assert Enum.map(stored(pm), & &1.event) == odd
    end

    test "an entry and an exit of a process correlate as a call and its return" do
      pm = pipeline!()
      buf = PipelineManager.ring_buffer(pm)
      me = self()
      outer = %FunctionEntry{module: M, function: :outer, arity: 0, pid: me, call_id: 1}
      inner = %FunctionEntry{module: M, function: :inner, arity: 0, pid: me, call_id: 2}
      inner_exit = %FunctionExit{module: M, function: :inner, pid: me, call_id: 2, result: :ok}

      outer_exit = %FunctionExit{
        module: M,
        function: :outer,
        pid: me,
        call_id: 1,
        exit_reason: :error,
        result: :badarg
      }

      for e <- [outer, inner, inner_exit, outer_exit], do: :ok = RingBuffer.write(buf, e)
      [c1, c2, r2, r1] = stored(pm)

      assert c1.correlation_type == :function_call
      assert c2.parent_id == c1.id
      assert r2.correlation_type == :function_return
      assert r2.links == [completes: c2.id]
      assert r2.correlation_id == c2.id
      assert r1.links == [completes: c1.id]
      assert r1.event == outer_exit

      store = PipelineManager.data_access(pm)
      {:ok, chain} = DataAccess.query_by_correlation(store, c1.id)
      assert outer in chain and outer_exit in chain

      assert {:ok, %{events: [%{event: ^outer_exit}]}} =
               QueryCoordinator.query(store, types: [:exception])

      # Analysis entries: the return's duration was measured by the pipeline.
      {:ok, %{events: [entry]}} = QueryCoordinator.query(store, types: [:return], as: :entry)
      assert entry.call_id == c2.id and entry.data == :ok
      assert is_integer(entry.duration_ns) and entry.duration_ns >= 0
    end

    test "without call_id the correlation_id pairs them; a bare exit completes the innermost call" do
      pm = pipeline!()
      buf = PipelineManager.ring_buffer(pm)
      me = self()

      :ok =
        RingBuffer.write(buf, %FunctionEntry{
          module: M,
          function: :a,
          pid: me,
          correlation_id: "x"
        })

      :ok =
        RingBuffer.write(buf, %FunctionEntry{
          module: M,
          function: :b,
          pid: me,
          correlation_id: "y"
        })

      :ok =
        RingBuffer.write(buf, %FunctionExit{module: M, function: :a, pid: me, correlation_id: "x"})

      :ok = Ingestor.ingest_function_call(buf, M, :c, [], me, nil)
      :ok = RingBuffer.write(buf, %FunctionExit{module: M, function: :c, pid: me})

      [a, b, ra, c, rc] = stored(pm)
      assert ra.links == [completes: a.id]
      assert rc.links == [completes: c.id]
      assert b.parent_id == a.id
    end

    test "they mix with the Ingestor's calls and returns" do
      pm = pipeline!()
      buf = PipelineManager.ring_buffer(pm)
      me = self()
      :ok = Ingestor.ingest_function_call(buf, M, :f, [1], me, 10)
      :ok = RingBuffer.write(buf, %FunctionExit{module: M, function: :f, pid: me, call_id: 10})
      :ok = RingBuffer.write(buf, %FunctionEntry{module: M, function: :g, pid: me, call_id: 11})
      :ok = Ingestor.ingest_function_return(buf, :done, 5, 11)

      [c1, r1, c2, r2] = stored(pm)
      assert r1.links == [completes: c1.id]
      assert r2.links == [completes: c2.id]
    end
  end

  describe "state records" do
    test "a written StateChange and StateSnapshot of a process are state records" do
      pm = pipeline!()
      buf = PipelineManager.ring_buffer(pm)
      me = self()

      snap = %StateSnapshot{pid: me, state: %{n: 0}, session_id: "s", checkpoint_type: :manual}
      change = %StateChange{pid: me, old_state: %{n: 0}, new_state: %{n: 1}, correlation_id: 3}
      change2 = %StateChange{server_pid: me, old_state: %{n: 1}, new_state: %{n: 2}}
      :ok = RingBuffer.write(buf, snap)
      :ok = RingBuffer.write(buf, change)
      :ok = Ingestor.ingest_state_change(buf, me, %{n: 1}, %{n: 1})
      :ok = RingBuffer.write(buf, change2)
      :ok = PipelineManager.flush(pm)
      store = PipelineManager.data_access(pm)

      history = Analysis.state_history(me, store: store)

      assert Enum.map(history, &{&1.kind, &1.state}) == [
               {:snapshot, %{n: 0}},
               {:state_change, %{n: 1}},
               {:state_change, %{n: 1}},
               {:state_change, %{n: 2}}
             ]

      assert {:ok, %{state: %{n: 1}}} =
               Analysis.state_at(me, Enum.at(history, 1).timestamp, store: store)

      assert {:ok, %{state: %{n: 2}}} =
               Analysis.state_at(me, Enum.at(history, 3).timestamp, store: store)

      # ... and read back as written.
      [s, c, _, c2] = Enum.map(stored(pm), & &1.event)
      assert {s, c, c2} == {snap, change, change2}
    end
  end

  describe "a DataAccess store" do
    test "stores each; queries by time, process and correlation give it back equal" do
      samples = samples()
      {:ok, store} = DataAccess.new(max_events: 100)
      for s <- samples, do: :ok = DataAccess.store_event(store, s)
      assert Enum.sort(everything(store)) == Enum.sort(samples)

      {:ok, mine} = DataAccess.query_by_process(store, self())
      assert Enum.sort(mine) == Enum.sort(samples)

      {:ok, req} = DataAccess.query_by_correlation(store, "req-1")
      want = Enum.filter(samples, &(&1.correlation_id == "req-1"))
      assert Enum.sort(req) == Enum.sort(want)
      assert length(want) == 4

      assert {:ok, %StateSnapshot{snapshot_id: "snap-1"}} = DataAccess.get_event(store, "snap-1")
      {:ok, [_, _]} = DataAccess.query_by_function(store, MyApp.Worker, :handle)
    end

    test "store_events/2 with the odd values stores them as terms" do
      {:ok, store} = DataAccess.new(max_events: 100)
      odd = odd()
      n = length(odd)
      assert {:ok, ^n} = DataAccess.store_events(store, odd)
      assert Enum.sort(everything(store)) == Enum.sort(odd)
    end
  end

  describe "a trace file" do
    test "of a pipeline and of a DataAccess store: each back equal, found by process", %{
      tmp_dir: dir
    } do
      samples = samples()
      pm = pipeline!()
      buf = PipelineManager.ring_buffer(pm)
      for s <- samples, do: :ok = RingBuffer.write(buf, s)
      :ok = PipelineManager.flush(pm)
      path = Path.join(dir, "pipe.estrace")
      {:ok, %{events: 7}} = TraceFile.save(pm, path)
      {:ok, loaded} = TraceFile.load(path)
      assert everything(loaded) == samples
      {:ok, mine} = DataAccess.query_by_process(loaded, self())
      assert mine == samples

      {:ok, store} = DataAccess.new(max_events: 100)
      {:ok, _} = DataAccess.store_events(store, samples ++ odd())
      path2 = Path.join(dir, "store.estrace")
      {:ok, _} = TraceFile.save(store, path2)
      {:ok, loaded2} = TraceFile.load(path2)
      assert Enum.sort(everything(loaded2)) == Enum.sort(samples ++ odd())
      {:ok, req} = DataAccess.query_by_correlation(loaded2, "req-1")
      assert length(req) == 4
    end
  end

  describe "a trace file's event-type and AST-node indexes" do
    test "a loaded store answers query_by_event_type and query_by_ast_node as the saved one", %{
      tmp_dir: dir
    } do
      {:ok, store} = DataAccess.new(max_events: 1000)

      events =
        for i <- 1..300 do
          %{
            id: i,
            timestamp: i,
            pid: self(),
            event_type: Enum.at([:call, :return, "custom", {:t, 1}], rem(i, 4)),
            ast_node_id: if(rem(i, 3) == 0, do: nil, else: "node-#{rem(i, 7)}")
          }
        end

      {:ok, 300} = DataAccess.store_events(store, events)
      path = Path.join(dir, "keys.estrace")
      {:ok, %{events: 300}} = TraceFile.save(store, path)
      {:ok, loaded} = TraceFile.load(path)
      assert DataAccess.index_sizes(loaded) == DataAccess.index_sizes(store)

      for t <- [:call, :return, "custom", {:t, 1}, :absent], o <- [:asc, :desc] do
        assert DataAccess.query_by_event_type(loaded, t, limit: 500, order: o) ==
                 DataAccess.query_by_event_type(store, t, limit: 500, order: o)
      end

      for n <- 0..7, o <- [:asc, :desc] do
        {:ok, want} = DataAccess.query_by_ast_node(store, "node-#{n}", limit: 500, order: o)

        assert {:ok, ^want} =
                 DataAccess.query_by_ast_node(loaded, "node-#{n}", limit: 500, order: o)

        assert length(want) ==
                 if(n == 7, do: 0, else: Enum.count(events, &(&1.ast_node_id == "node-#{n}")))
      end

      {:ok, %{events: got}} = QueryCoordinator.query(loaded, ast_node_id: "node-1", limit: 500)
      assert length(got) > 0

      # Merged with itself: ids move, keys do not.
      {:ok, merged} = TraceFile.load([path, path])
      {:ok, calls} = DataAccess.query_by_event_type(merged, :call, limit: 1000)
      assert length(calls) == 2 * Enum.count(events, &(&1.event_type == :call))
    end
  end

  describe "EventCorrelator.correlate_batch/2" do
    setup do
      %{c: start_supervised!({EventCorrelator, [name: nil]}, id: make_ref())}
    end

    test "a FunctionEntry / FunctionExit with pid correlates like a call / return of that pid",
         %{c: c} do
      me = self()
      other = spawn(fn -> :ok end)

      [c1, c2, r1, r2] =
        EventCorrelator.correlate_batch(c, [
          %FunctionEntry{module: M, function: :f, pid: me, call_id: 1},
          %FunctionEntry{module: M, function: :g, pid: other, call_id: 2},
          %FunctionExit{module: M, function: :f, pid: me, call_id: 1},
          %FunctionExit{module: M, function: :g, pid: other, correlation_id: 2}
        ])

      assert {c1.correlation_type, r1.correlation_type} == {:function_call, :function_return}
      assert r1.correlation_id == c1.correlation_id
      assert r2.correlation_id == c2.correlation_id
      # Different processes: g is not a child of f.
      assert c2.parent_id == nil
    end

    test "an exit with an error reason completes its call; ProcessExit and StateChange use pid",
         %{c: c} do
      me = self()

      [call, exc, exit, change] =
        EventCorrelator.correlate_batch(c, [
          %FunctionEntry{module: M, function: :f, pid: me, correlation_id: :k},
          %FunctionExit{
            module: M,
            function: :f,
            pid: me,
            correlation_id: :k,
            exit_reason: :error
          },
          %ProcessExit{pid: me, reason: :normal},
          %StateChange{pid: me, new_state: 1}
        ])

      # The correlator's type of a return and of an exception alike.
      assert exc.correlation_type == :function_return
      assert exc.correlation_id == call.correlation_id
      assert exit.correlation_type == :process_exit
      assert change.correlation_type == :state_change
    end

    test "odd values in the new fields never crash it", %{c: c} do
      out = EventCorrelator.correlate_batch(c, odd())
      assert length(out) == length(odd())
    end

    test "any value in any new field: ring, store and correlator take it, never a crash", %{
      c: c
    } do
      new_fields = %{
        FunctionEntry => [:pid, :correlation_id, :timestamp, :wall_time],
        FunctionExit => [:pid, :correlation_id, :timestamp, :wall_time],
        ProcessExit => [:pid, :reason, :correlation_id, :timestamp, :wall_time],
        StateChange => [:pid, :correlation_id],
        StateSnapshot => [
          :snapshot_id,
          :checkpoint_type,
          :memory_usage,
          :message_queue_len,
          :pid,
          :session_id,
          :correlation_id,
          :timestamp,
          :wall_time
        ]
      }

      bad = [nil, "pid", -1, 1 <<< 70, 1.5, make_ref(), {:t, 1}, [1 | 2], %{a: 1}, :x, <<1::3>>]
      {:ok, buf} = RingBuffer.new(size: 16)
      {:ok, store} = DataAccess.new(max_events: 10_000)

      written =
        for s <- samples(), key <- Map.fetch!(new_fields, s.__struct__), v <- bad do
          # Distinct ids (a store keeps one event per id).
          e = s |> unique_id() |> Map.put(key, v)
          assert RingBuffer.write(buf, e) == :ok
          assert {[^e], _} = RingBuffer.read_batch(buf, RingBuffer.stats(buf).read_position, 1)
          assert DataAccess.store_event(store, e) == :ok
          e
        end

      assert length(EventCorrelator.correlate_batch(c, written)) == length(written)
      all = everything(store)
      assert Enum.all?(written, &(&1 in all))
    end
  end
end

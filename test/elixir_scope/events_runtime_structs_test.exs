defmodule ElixirScope.EventsRuntimeStructsTest do
  # The original ElixirScope's runtime-tracing and system structs
  # (`MessageSent`, `MessageReceived`, `CallbackReply`, `VariableAssignment`,
  # `GarbageCollection`, `CrashDump`, `VMEvent`, `SchedulerEvent`,
  # `NodeEvent`, `TableEvent`, `TraceControl`): written to a ring they come
  # back equal, through a pipeline they are stored and come back equal from
  # the store's queries, and the correlator understands the ones that have
  # a meaning for it.
  use ExUnit.Case, async: true

  import Bitwise, only: [<<<: 2]
  import ElixirScope.PipelineTestHelpers, only: [start_pipeline!: 1]

  alias ElixirScope.Capture.{EventCorrelator, Ingestor, PipelineManager, RingBuffer}
  alias ElixirScope.Events
  alias ElixirScope.Storage.{DataAccess, QueryCoordinator}

  alias ElixirScope.Events.{
    CallbackReply,
    CrashDump,
    GarbageCollection,
    MessageReceived,
    MessageSent,
    NodeEvent,
    SchedulerEvent,
    TableEvent,
    TraceControl,
    VariableAssignment,
    VMEvent
  }

  # Fields (in order) of the original's lib/elixir_scope/events.ex.
  @fields [
    {MessageReceived, [:pid, :message, :correlation_id, :timestamp, :wall_time]},
    {MessageSent, [:from_pid, :to_pid, :message, :correlation_id, :timestamp, :wall_time]},
    {CallbackReply,
     [
       :server_pid,
       :callback,
       :call_id,
       :reply,
       :new_state,
       :timeout,
       :hibernate,
       :continue_data,
       :pid,
       :correlation_id,
       :timestamp,
       :wall_time
     ]},
    {VariableAssignment,
     [:variable_name, :old_value, :new_value, :assignment_type, :scope_context, :line_number]},
    {GarbageCollection,
     [
       :heap_size_before,
       :heap_size_after,
       :old_heap_size,
       :stack_size,
       :recent_size,
       :mbuf_size,
       :gc_type,
       :gc_reason,
       :duration_ns
     ]},
    {CrashDump,
     [
       :crashed_pid,
       :supervisor_pid,
       :restart_strategy,
       :restart_count,
       :crash_reason,
       :process_state,
       :linked_pids,
       :monitors
     ]},
    {VMEvent, [:event_type, :event_data, :scheduler_id, :system_time, :node_name]},
    {SchedulerEvent,
     [:scheduler_id, :event_type, :process_count, :port_count, :run_queue_length, :utilization]},
    {NodeEvent, [:event_type, :node_name, :node_type, :connection_id, :extra_info]},
    {TableEvent,
     [
       :table_name,
       :table_type,
       :operation,
       :key,
       :value,
       :operation_count,
       :execution_time_ns
     ]},
    {TraceControl, [:operation, :trace_type, :target, :trace_flags, :reason]}
  ]

  # One populated instance of each, with values of many term types.
  defp samples do
    me = self()
    other = spawn(fn -> :ok end)
    ref = make_ref()
    now = System.monotonic_time(:nanosecond)
    wall = System.system_time(:nanosecond)

    [
      %MessageReceived{
        pid: me,
        message: {:work, [1, 2.5, "three"], %{four: 4}},
        correlation_id: ref,
        timestamp: now,
        wall_time: wall
      },
      %MessageSent{
        from_pid: me,
        to_pid: other,
        message: {:"$gen_call", {me, ref}, :ping},
        correlation_id: "corr-1",
        timestamp: now + 1,
        wall_time: wall + 1
      },
      %CallbackReply{
        server_pid: me,
        callback: :handle_call,
        call_id: 12_345,
        reply: {:ok, [1, 2]},
        new_state: %{count: 3, log: ["a", "b"]},
        timeout: 5_000,
        hibernate: false,
        continue_data: {:continue, :warm},
        pid: me,
        correlation_id: {:corr, 7},
        timestamp: now + 2,
        wall_time: wall + 2
      },
      %VariableAssignment{
        variable_name: :acc,
        old_value: [1],
        new_value: [2, 1],
        assignment_type: :rebind,
        scope_context: {__MODULE__, :reduce, 2},
        line_number: 42
      },
      %GarbageCollection{
        heap_size_before: 987,
        heap_size_after: 233,
        old_heap_size: 1_597,
        stack_size: 12,
        recent_size: 100,
        mbuf_size: 0,
        gc_type: :minor,
        gc_reason: :heap_full,
        duration_ns: 14_000
      },
      %CrashDump{
        crashed_pid: other,
        supervisor_pid: me,
        restart_strategy: :one_for_one,
        restart_count: 2,
        crash_reason: {%RuntimeError{message: "boom"}, [{M, :f, 1, [line: 3]}]},
        process_state: %{queue: :queue.new()},
        linked_pids: [me],
        monitors: [{:process, me}]
      },
      %VMEvent{
        event_type: :long_gc,
        event_data: %{timeout: 100, pid: other},
        scheduler_id: 1,
        system_time: wall,
        node_name: node()
      },
      %SchedulerEvent{
        scheduler_id: 2,
        event_type: :in,
        process_count: 40,
        port_count: 3,
        run_queue_length: 1,
        utilization: 0.375
      },
      %NodeEvent{
        event_type: :nodeup,
        node_name: :"b@127.0.0.1",
        node_type: :visible,
        connection_id: 17,
        extra_info: [node_type: :visible]
      },
      %TableEvent{
        table_name: :my_table,
        table_type: :ets,
        operation: :insert,
        key: {:user, 1},
        value: %{name: "Ada"},
        operation_count: 1,
        execution_time_ns: 900
      },
      %TraceControl{
        operation: :start,
        trace_type: :call,
        target: {String, :upcase, 1},
        trace_flags: [:call, :return_to],
        reason: "debug session"
      }
    ]
  end

  defp pipeline!(opts \\ []), do: start_pipeline!([shards: 1] ++ opts)

  # Every stored event of the pipeline with its correlation, store order.
  defp stored(pm) do
    :ok = PipelineManager.flush(pm)
    store = PipelineManager.data_access(pm)
    {:ok, %{events: events}} = QueryCoordinator.query(store, limit: 10_000)
    events
  end

  describe "structs" do
    test "each has the original's fields, in order, all defaulting to nil" do
      for {mod, fields} <- @fields do
        assert Enum.map(mod.__info__(:struct), & &1.field) == fields, inspect(mod)
        assert Enum.all?(fields, &(Map.fetch!(struct!(mod, []), &1) == nil)), inspect(mod)
        assert Enum.all?(mod.__info__(:struct), &(&1.required == false)), inspect(mod)
        assert {:docs_v1, _, _, _, %{"en" => doc}, _, _} = Code.fetch_docs(mod)
        assert doc != ""
      end
    end

    test "the samples cover every struct" do
      assert Enum.map(samples(), & &1.__struct__) == Enum.map(@fields, &elem(&1, 0))
    end

    test "serialize/deserialize round trips each, bare and in an envelope" do
      for s <- samples() do
        assert s |> Events.serialize() |> Events.deserialize() == s
        env = Events.new_event(:runtime, s)
        assert env |> Events.serialize() |> Events.deserialize() == env
      end
    end
  end

  describe "through a ring" do
    test "write/2 then read/2 and read_batch/3 give each back equal" do
      samples = samples()
      {:ok, buf} = RingBuffer.new(size: 64)

      for s <- samples, do: assert(RingBuffer.write(buf, s) == :ok)

      {read, n} = RingBuffer.read_batch(buf, 0, 100)
      assert n == length(samples)
      assert read == samples

      assert RingBuffer.stats(buf).truncated_events == 0

      {:ok, buf} = RingBuffer.new(size: 64)

      for {s, pos} <- Enum.with_index(samples) do
        :ok = RingBuffer.write(buf, s)
        assert {:ok, ^s, _} = RingBuffer.read(buf, pos)
      end
    end

    test "write_batch/2 and Ingestor.ingest_batch/2 give each back equal" do
      samples = samples()
      {:ok, buf} = RingBuffer.new(size: 64)
      n = length(samples)
      assert {:ok, ^n} = RingBuffer.write_batch(buf, samples)
      assert {:ok, ^n} = Ingestor.ingest_batch(buf, samples)
      assert {read, _} = RingBuffer.read_batch(buf, 0, 100)
      assert read == samples ++ samples
    end

    test "inside an %Events{} envelope each comes back equal" do
      {:ok, buf} = RingBuffer.new(size: 64)
      envs = Enum.map(samples(), &Events.new_event(:runtime, &1))
      for e <- envs, do: :ok = RingBuffer.write(buf, e)
      assert {^envs, _} = RingBuffer.read_batch(buf, 0, 100)
    end

    test "a struct that is not exactly the struct, or whose process is not local, is kept as written" do
      {:ok, buf} = RingBuffer.new(size: 64)
      me = self()

      odd = [
        %MessageSent{from_pid: nil, to_pid: me, message: :m},
        %MessageSent{from_pid: :name, to_pid: me, message: :m},
        Map.put(%MessageSent{from_pid: me, to_pid: me, message: :m}, :extra, 1),
        Map.delete(%MessageReceived{pid: me, message: :m}, :wall_time),
        %MessageReceived{pid: "not a pid", message: :m},
        %CallbackReply{server_pid: nil, pid: nil, reply: :ok},
        %CallbackReply{server_pid: "srv", pid: me, reply: :ok, call_id: nil},
        %CallbackReply{server_pid: me, pid: "x", reply: :ok, call_id: make_ref()}
      ]

      for e <- odd, do: :ok = RingBuffer.write(buf, e)
      assert {^odd, _} = RingBuffer.read_batch(buf, 0, 100)
    end

    test "a message or reply too big for the ring becomes one marker; the other fields survive" do
      {:ok, buf} = RingBuffer.new(size: 8, max_event_bytes: 256)
      me = self()
      big = %{data: :binary.copy("x", 10_000)}

      sent = %MessageSent{from_pid: me, to_pid: me, message: big, correlation_id: 1, timestamp: 2}
      recv = %MessageReceived{pid: me, message: big, correlation_id: 1, wall_time: 3}

      reply = %CallbackReply{
        server_pid: me,
        call_id: 9,
        reply: big,
        new_state: big,
        callback: :handle_call,
        timestamp: 4
      }

      for e <- [sent, recv, reply], do: :ok = RingBuffer.write(buf, e)
      assert {[s, r, c], 3} = RingBuffer.read_batch(buf, 0, 10)

      assert {:truncated, n, :map} = s.message
      assert n >= 10_000
      assert %{s | message: big} == sent
      assert {:truncated, _, :map} = r.message
      assert %{r | message: big} == recv
      assert {:truncated, _, :map} = c.reply
      assert {:truncated, _, :map} = c.new_state
      assert %{c | reply: big, new_state: big} == reply
      assert RingBuffer.stats(buf).truncated_events == 3
    end

    test "at the smallest ring limit nothing is invented: cut fields are markers" do
      {:ok, buf} = RingBuffer.new(size: 8, max_event_bytes: 64)
      me = self()
      long = :binary.copy("c", 200)

      reply = %CallbackReply{
        server_pid: me,
        pid: me,
        call_id: 1,
        reply: long,
        new_state: long,
        callback: :handle_call,
        timeout: :infinity,
        hibernate: true,
        continue_data: long,
        correlation_id: long,
        timestamp: 1,
        wall_time: 2
      }

      :ok = RingBuffer.write(buf, reply)
      assert {:ok, %CallbackReply{} = got, _} = RingBuffer.read(buf, 0)

      for {k, v} <- Map.from_struct(got) do
        want = Map.fetch!(reply, k)
        assert v == want or match?({:truncated, _, _}, v), "#{k}: #{inspect(v)}"
      end
    end
  end

  describe "through a pipeline into the store" do
    test "each is stored and comes back equal from the store's queries" do
      samples = samples()
      pm = pipeline!()
      buf = PipelineManager.ring_buffer(pm)
      for s <- samples, do: :ok = RingBuffer.write(buf, s)

      events = stored(pm)
      assert Enum.map(events, & &1.event) == samples

      store = PipelineManager.data_access(pm)
      {:ok, by_time} = DataAccess.query_by_time_range(store, -(1 <<< 62), 1 <<< 62)
      assert by_time == samples

      for %{id: id, event: e} <- events do
        assert {:ok, ^e} = DataAccess.get_event(store, id)
      end

      # The process-keyed ones are found by their process.
      me = self()
      {:ok, mine} = DataAccess.query_by_process(store, me)

      assert Enum.filter(mine, &(&1.__struct__ in [MessageSent, MessageReceived, CallbackReply])) ==
               Enum.take(samples, 3)
    end

    test "DataAccess.store_event/2 stores each; queries give it back equal" do
      samples = samples()
      {:ok, store} = DataAccess.new(max_events: 100)
      for s <- samples, do: :ok = DataAccess.store_event(store, s)
      {:ok, all} = DataAccess.query_by_time_range(store, -(1 <<< 62), 1 <<< 62)
      assert Enum.sort(all) == Enum.sort(samples)
    end

    test "type filters see a MessageSent as a send, a MessageReceived as a receive, a reply as a return" do
      pm = pipeline!()
      buf = PipelineManager.ring_buffer(pm)
      [recv, sent, reply | _] = samples()
      for e <- [recv, sent, reply], do: :ok = RingBuffer.write(buf, e)
      :ok = PipelineManager.flush(pm)
      store = PipelineManager.data_access(pm)

      for {type, want} <- [send: sent, receive: recv, return: reply] do
        assert {:ok, %{events: [%{event: ^want}]}} = QueryCoordinator.query(store, types: [type])
      end

      assert {:ok, %{events: [%{event: ^sent}]}} =
               QueryCoordinator.query(store,
                 message: QueryCoordinator.pattern({:"$gen_call", :_, :ping})
               )
    end
  end

  describe "the pipeline's correlator" do
    test "a MessageReceived is linked to the MessageSent of an equal message" do
      pm = pipeline!()
      buf = PipelineManager.ring_buffer(pm)
      me = self()
      :ok = RingBuffer.write(buf, %MessageSent{from_pid: me, to_pid: me, message: {:job, 1}})
      :ok = RingBuffer.write(buf, %MessageSent{from_pid: me, to_pid: me, message: {:job, 2}})
      :ok = RingBuffer.write(buf, %MessageReceived{pid: me, message: {:job, 2}})
      :ok = RingBuffer.write(buf, %MessageReceived{pid: me, message: {:job, 1}})

      [s1, s2, r2, r1] = stored(pm)
      assert s1.correlation_type == :message_send
      assert r1.correlation_type == :message_receive
      assert r2.links == [receives: s2.id]
      assert r1.links == [receives: s1.id]
    end

    test "they correlate with the Ingestor's sends and receives, both ways" do
      pm = pipeline!()
      buf = PipelineManager.ring_buffer(pm)
      me = self()
      :ok = Ingestor.ingest_message_send(buf, me, me, {:a, "x"})
      :ok = RingBuffer.write(buf, %MessageReceived{pid: me, message: {:a, "x"}})
      :ok = RingBuffer.write(buf, %MessageSent{from_pid: me, to_pid: me, message: %{b: [1]}})
      :ok = Ingestor.ingest_message_receive(buf, me, %{b: [1]})

      [send1, recv1, send2, recv2] = stored(pm)
      assert recv1.links == [receives: send1.id]
      assert recv2.links == [receives: send2.id]
    end

    test "a truncated message still matches: sent and received alike" do
      pm = pipeline!(max_event_bytes: 256)
      buf = PipelineManager.ring_buffer(pm)
      me = self()
      a = {:big, :binary.copy("a", 5_000)}
      b = {:big, :binary.copy("b", 5_000)}
      :ok = RingBuffer.write(buf, %MessageSent{from_pid: me, to_pid: me, message: a})
      :ok = Ingestor.ingest_message_send(buf, me, me, b)
      :ok = RingBuffer.write(buf, %MessageReceived{pid: me, message: b})
      :ok = Ingestor.ingest_message_receive(buf, me, a)

      [sa, sb, rb, ra] = stored(pm)
      assert {:truncated, _, :tuple} = sa.event.message
      assert rb.links == [receives: sb.id]
      assert ra.links == [receives: sa.id]
    end

    test "a CallbackReply completes the open call carrying its call_id" do
      pm = pipeline!()
      buf = PipelineManager.ring_buffer(pm)
      me = self()
      :ok = Ingestor.ingest_function_call(buf, Srv, :handle_call, [:get, me, %{}], me, 41)
      :ok = Ingestor.ingest_function_call(buf, Srv, :helper, [1], me, 42)
      # Completes call 41, unwinding the helper left open.
      :ok = RingBuffer.write(buf, %CallbackReply{server_pid: me, call_id: 41, reply: :ok})

      [outer, inner, reply] = stored(pm)
      assert reply.correlation_type == :function_return
      assert reply.links == [completes: outer.id]
      assert reply.correlation_id == outer.id
      assert reply.parent_id == nil
      assert inner.parent_id == outer.id
      assert %CallbackReply{call_id: 41, reply: :ok} = reply.event

      # The Analysis entry is a return of that call, with its duration.
      store = PipelineManager.data_access(pm)
      {:ok, %{events: [entry]}} = QueryCoordinator.query(store, types: [:return], as: :entry)
      assert entry.type == :return and entry.call_id == outer.id and entry.data == :ok
      assert is_integer(entry.duration_ns) and entry.duration_ns >= 0
    end

    test "a CallbackReply without call_id completes the innermost open call of its server" do
      pm = pipeline!()
      buf = PipelineManager.ring_buffer(pm)
      me = self()
      :ok = Ingestor.ingest_function_call(buf, Srv, :handle_cast, [:tick, %{}], me, nil)
      # `pid` stands for the server when `server_pid` is not set.
      :ok = RingBuffer.write(buf, %CallbackReply{pid: me, reply: :noreply})

      [call, reply] = stored(pm)
      assert reply.links == [completes: call.id]
    end

    test "a CallbackReply whose call_id names no open call completes nothing" do
      pm = pipeline!()
      buf = PipelineManager.ring_buffer(pm)
      me = self()
      :ok = Ingestor.ingest_function_call(buf, Srv, :handle_call, [:x], me, 1)
      :ok = RingBuffer.write(buf, %CallbackReply{server_pid: me, call_id: 2, reply: :ok})
      [_call, reply] = stored(pm)
      assert reply.links == []
      assert PipelineManager.get_metrics(pm).native.correlator.unmatched_returns == 1
    end
  end

  describe "EventCorrelator.correlate_batch/2" do
    setup do
      %{c: start_supervised!({EventCorrelator, [name: nil]}, id: make_ref())}
    end

    test "MessageSent / MessageReceived correlate like MessageSend / MessageReceive", %{c: c} do
      me = self()

      envs =
        Enum.map(
          [
            %MessageSent{from_pid: me, to_pid: me, message: :hello},
            %MessageReceived{pid: me, message: :hello}
          ],
          &Events.new_event(:runtime, &1)
        )

      [sent, recv] = EventCorrelator.correlate_batch(c, envs)
      assert sent.correlation_type == :message_send
      assert recv.correlation_type == :message_receive
      assert recv.correlation_id == sent.correlation_id
      assert Enum.any?(recv.links, &match?({:receives, _}, &1))

      # Bare structs too (no envelope).
      [s2, r2] =
        EventCorrelator.correlate_batch(c, [
          %MessageSent{from_pid: me, to_pid: me, message: :again},
          %MessageReceived{pid: me, message: :again}
        ])

      assert {s2.correlation_type, r2.correlation_type} == {:message_send, :message_receive}
      assert r2.correlation_id == s2.correlation_id
    end

    test "a CallbackReply completes its call like a return", %{c: c} do
      me = self()

      call =
        Events.new_event(:function_entry, %Events.FunctionEntry{
          module: Srv,
          function: :handle_call,
          arity: 3,
          call_id: 77
        })

      reply = Events.new_event(:callback_reply, %CallbackReply{server_pid: me, call_id: 77})
      [c1, r1] = EventCorrelator.correlate_batch(c, [call, reply])
      assert c1.correlation_type == :function_call
      assert r1.correlation_type == :function_return
      assert r1.correlation_id == c1.correlation_id
    end
  end
end

defmodule ElixirScope.EventsTest do
  use ExUnit.Case, async: true

  alias ElixirScope.Events

  alias ElixirScope.Events.{
    ErrorEvent,
    FunctionEntry,
    FunctionExecution,
    FunctionExit,
    MessageEvent,
    MessageReceive,
    MessageSend,
    PerformanceMetric,
    ProcessEvent,
    ProcessExit,
    ProcessSpawn,
    StateChange,
    StateSnapshot
  }

  doctest ElixirScope.Events

  @struct_fields [
    {Events,
     [
       :event_id,
       :timestamp,
       :wall_time,
       :node,
       :pid,
       :correlation_id,
       :parent_id,
       :event_type,
       :data
     ]},
    {FunctionExecution,
     [
       :id,
       :timestamp,
       :wall_time,
       :module,
       :function,
       :arity,
       :args,
       :return_value,
       :duration_ns,
       :caller_pid,
       :correlation_id,
       :event_type
     ]},
    {ProcessEvent,
     [:id, :timestamp, :wall_time, :pid, :parent_pid, :event_type, :reason, :linked_pid]},
    {MessageEvent, [:id, :timestamp, :wall_time, :from_pid, :to_pid, :message, :event_type]},
    {StateChange,
     [
       :id,
       :timestamp,
       :wall_time,
       :server_pid,
       :callback,
       :old_state,
       :new_state,
       :state_diff,
       :trigger_message,
       :trigger_call_id,
       :pid,
       :correlation_id
     ]},
    {PerformanceMetric,
     [
       :id,
       :timestamp,
       :wall_time,
       :metric_name,
       :value,
       :metadata,
       :metric_type,
       :unit,
       :source_context
     ]},
    {ErrorEvent,
     [
       :id,
       :timestamp,
       :wall_time,
       :error_type,
       :error_class,
       :error_message,
       :stacktrace,
       :context,
       :recovery_action
     ]},
    {FunctionEntry,
     [
       :module,
       :function,
       :arity,
       :args,
       :call_id,
       :caller_module,
       :caller_function,
       :caller_line,
       :pid,
       :correlation_id,
       :timestamp,
       :wall_time
     ]},
    {FunctionExit,
     [
       :module,
       :function,
       :arity,
       :call_id,
       :result,
       :duration_ns,
       :exit_reason,
       :pid,
       :correlation_id,
       :timestamp,
       :wall_time
     ]},
    {ProcessSpawn,
     [
       :spawned_pid,
       :parent_pid,
       :spawn_module,
       :spawn_function,
       :spawn_args,
       :spawn_opts,
       :registered_name
     ]},
    {ProcessExit,
     [
       :exited_pid,
       :exit_reason,
       :lifetime_ns,
       :message_count,
       :final_state,
       :pid,
       :reason,
       :correlation_id,
       :timestamp,
       :wall_time
     ]},
    {MessageSend, [:sender_pid, :receiver_pid, :message, :message_id, :send_type, :call_ref]},
    {MessageReceive,
     [
       :receiver_pid,
       :sender_pid,
       :message,
       :message_id,
       :receive_type,
       :queue_time_ns,
       :pattern_matched
     ]},
    {StateSnapshot,
     [
       :server_pid,
       :snapshot_id,
       :state,
       :checkpoint_type,
       :sequence_number,
       :memory_usage,
       :message_queue_len,
       :pid,
       :session_id,
       :correlation_id,
       :timestamp,
       :wall_time,
       :snapshot_reason
     ]}
  ]

  # Spelled only as a string: writing it as an atom literal would create it.
  @missing_atom "some_atom_that_does_not_exist_xyz_123"

  defp roundtrip(term), do: term |> Events.serialize() |> Events.deserialize()

  # One populated instance of every nested struct.
  defp sample_structs do
    pid = self()
    ref = make_ref()

    [
      %FunctionExecution{
        id: 1,
        timestamp: 10,
        wall_time: 20,
        module: String,
        function: :upcase,
        arity: 1,
        args: ["abc"],
        return_value: "ABC",
        duration_ns: 1_500,
        caller_pid: pid,
        correlation_id: ref,
        event_type: :return
      },
      %ProcessEvent{
        id: 2,
        timestamp: 11,
        wall_time: 21,
        pid: pid,
        parent_pid: pid,
        event_type: :spawn
      },
      %MessageEvent{
        id: 3,
        timestamp: 12,
        wall_time: 22,
        from_pid: pid,
        to_pid: pid,
        message: {:hello, [1, 2, 3]},
        event_type: :send
      },
      %StateChange{
        id: 4,
        timestamp: 13,
        wall_time: 23,
        server_pid: pid,
        callback: :handle_call,
        old_state: %{count: 0},
        new_state: %{count: 1},
        state_diff: :changed,
        trigger_message: :inc,
        trigger_call_id: 99
      },
      %PerformanceMetric{
        id: 5,
        timestamp: 14,
        wall_time: 24,
        metric_name: :memory,
        value: 1024.5,
        metadata: %{"k" => "v"},
        metric_type: :memory,
        unit: :bytes,
        source_context: {__MODULE__, :test, 1}
      },
      %ErrorEvent{
        id: 6,
        timestamp: 15,
        wall_time: 25,
        error_type: :exception,
        error_class: RuntimeError,
        error_message: "boom",
        stacktrace: [{__MODULE__, :fun, 0, [file: 'x.ex', line: 1]}],
        context: %{step: 1},
        recovery_action: :restart
      },
      %FunctionEntry{
        module: Enum,
        function: :map,
        arity: 2,
        args: [[1, 2], :fn],
        call_id: 7,
        caller_module: __MODULE__,
        caller_function: :test,
        caller_line: 42
      },
      %FunctionExit{
        module: Enum,
        function: :map,
        arity: 2,
        call_id: 7,
        result: [2, 4],
        duration_ns: 300,
        exit_reason: :normal
      },
      %ProcessSpawn{
        spawned_pid: pid,
        parent_pid: pid,
        spawn_module: Kernel,
        spawn_function: :spawn,
        spawn_args: [],
        spawn_opts: [:link],
        registered_name: :my_proc
      },
      %ProcessExit{
        exited_pid: pid,
        exit_reason: {:shutdown, :normal},
        lifetime_ns: 123_456,
        message_count: 3,
        final_state: %{done: true}
      },
      %MessageSend{
        sender_pid: pid,
        receiver_pid: :registered_name,
        message: {:"$gen_call", {pid, ref}, :ping},
        message_id: 8,
        send_type: :call,
        call_ref: ref
      },
      %MessageReceive{
        receiver_pid: pid,
        sender_pid: pid,
        message: :ping,
        message_id: 8,
        receive_type: :handle_call,
        queue_time_ns: 50,
        pattern_matched: :ping
      },
      %StateSnapshot{
        server_pid: pid,
        state: %{a: [1, 2, 3], b: "bin", c: <<1, 2, 3>>},
        snapshot_reason: :periodic,
        sequence_number: 17
      }
    ]
  end

  describe "structs" do
    test "every struct has exactly the specified fields, in order" do
      for {mod, fields} <- @struct_fields do
        assert Enum.map(mod.__info__(:struct), & &1.field) == fields, inspect(mod)

        assert mod.__struct__() |> Map.delete(:__struct__) |> Map.keys() |> Enum.sort() ==
                 Enum.sort(fields)
      end
    end

    test "every field defaults to nil and no field is enforced" do
      for {mod, fields} <- @struct_fields do
        struct = struct!(mod, [])
        assert Enum.all?(fields, &(Map.fetch!(struct, &1) == nil)), inspect(mod)
        assert Enum.all?(mod.__info__(:struct), &(&1.required == false)), inspect(mod)
      end
    end

    test "a struct built as a plain map (as the NIF does) equals the Elixir struct" do
      built = %{
        __struct__: ProcessEvent,
        id: 1,
        timestamp: 2,
        wall_time: 3,
        pid: self(),
        parent_pid: nil,
        event_type: :exit,
        reason: :normal,
        linked_pid: nil
      }

      assert built ==
               %ProcessEvent{
                 id: 1,
                 timestamp: 2,
                 wall_time: 3,
                 pid: self(),
                 event_type: :exit,
                 reason: :normal
               }
    end

    test "every nested struct has a moduledoc" do
      for {mod, _} <- @struct_fields, mod != Events do
        assert {:docs_v1, _, _, _, %{"en" => doc}, _, _} = Code.fetch_docs(mod)
        assert is_binary(doc) and doc != ""
      end
    end
  end

  describe "generate_id/0" do
    test "returns positive integers" do
      id = Events.generate_id()
      assert is_integer(id) and id > 0
    end

    test "returns increasing ids within a process" do
      ids = for _ <- 1..1_000, do: Events.generate_id()
      assert ids == Enum.sort(ids)
      assert length(Enum.uniq(ids)) == 1_000
    end

    test "ids are unique under concurrency" do
      tasks = 16
      per_task = 10_000

      ids =
        1..tasks
        |> Enum.map(fn _ ->
          Task.async(fn -> for _ <- 1..per_task, do: Events.generate_id() end)
        end)
        |> Task.await_many(60_000)
        |> List.flatten()

      assert length(ids) == tasks * per_task
      assert MapSet.size(MapSet.new(ids)) == tasks * per_task
      assert Enum.all?(ids, &(is_integer(&1) and &1 > 0))
    end

    test "ids are shared with the native counter" do
      a = Events.generate_id()
      b = ElixirScope.Native.next_event_id()
      c = Events.generate_id()
      assert a < b and b < c
    end
  end

  describe "new_event/3" do
    test "fills in defaults" do
      before_mono = System.monotonic_time(:nanosecond)
      before_wall = System.system_time(:nanosecond)
      event = Events.new_event(:custom, %{a: 1})
      after_mono = System.monotonic_time(:nanosecond)
      after_wall = System.system_time(:nanosecond)

      assert %Events{event_type: :custom, data: %{a: 1}} = event
      assert is_integer(event.event_id) and event.event_id > 0
      assert event.timestamp >= before_mono and event.timestamp <= after_mono
      assert event.wall_time >= before_wall and event.wall_time <= after_wall
      assert event.node == node()
      assert event.pid == self()
      assert event.correlation_id == nil
      assert event.parent_id == nil
    end

    test "each event gets a fresh id" do
      assert Events.new_event(:a, nil).event_id != Events.new_event(:a, nil).event_id
    end

    test "honours every option" do
      pid = spawn(fn -> :ok end)

      event =
        Events.new_event(:custom, :data,
          event_id: 7,
          timestamp: 100,
          wall_time: 200,
          node: :other@host,
          pid: pid,
          correlation_id: "corr",
          parent_id: 3
        )

      assert event == %Events{
               event_id: 7,
               timestamp: 100,
               wall_time: 200,
               node: :other@host,
               pid: pid,
               correlation_id: "corr",
               parent_id: 3,
               event_type: :custom,
               data: :data
             }
    end

    test "any term is accepted as data" do
      for data <- [nil, 1, "s", [1, 2], {:a, :b}, %{x: 1}, %FunctionEntry{}] do
        assert Events.new_event(:t, data).data == data
      end
    end

    test "unknown options raise ArgumentError naming the key" do
      assert_raise ArgumentError, ~r/unknown keys \[:bogus\]/, fn ->
        Events.new_event(:custom, %{}, bogus: 1)
      end

      assert_raise ArgumentError, ~r/:caller_line/, fn ->
        Events.new_event(:custom, %{}, caller_line: 1)
      end
    end

    test "non-keyword options raise ArgumentError" do
      assert_raise ArgumentError, fn -> Events.new_event(:custom, %{}, [1]) end
      assert_raise ArgumentError, fn -> Events.new_event(:custom, %{}, %{event_id: 1}) end
    end

    test "non-atom event_type raises ArgumentError" do
      for type <- ["custom", 1, {:a}, [:a], %{}] do
        assert_raise ArgumentError, ~r/event_type/, fn -> Events.new_event(type, %{}) end
      end
    end
  end

  describe "function_entry/5" do
    test "builds a FunctionEntry event" do
      event = Events.function_entry(String, :upcase, 1, ["abc"])

      assert %Events{event_type: :function_entry, data: %FunctionEntry{} = data} = event
      assert data.module == String
      assert data.function == :upcase
      assert data.arity == 1
      assert data.args == ["abc"]
      assert is_integer(data.call_id) and data.call_id > 0
      assert data.call_id != event.event_id
      assert data.caller_module == nil
      assert data.caller_function == nil
      assert data.caller_line == nil
      assert event.pid == self()
      assert event.node == node()
    end

    test "call ids are unique" do
      a = Events.function_entry(M, :f, 0, [])
      b = Events.function_entry(M, :f, 0, [])
      assert a.data.call_id != b.data.call_id
    end

    test "takes caller info from opts and passes the rest to new_event" do
      event =
        Events.function_entry(String, :upcase, 1, ["abc"],
          caller_module: __MODULE__,
          caller_function: :test,
          caller_line: 12,
          correlation_id: :corr,
          parent_id: 5,
          event_id: 77,
          timestamp: 1,
          wall_time: 2
        )

      assert event.data.caller_module == __MODULE__
      assert event.data.caller_function == :test
      assert event.data.caller_line == 12
      assert event.correlation_id == :corr
      assert event.parent_id == 5
      assert event.event_id == 77
      assert event.timestamp == 1
      assert event.wall_time == 2
    end

    test "unknown opts raise" do
      assert_raise ArgumentError, ~r/:nope/, fn ->
        Events.function_entry(M, :f, 0, [], nope: 1)
      end

      # a data key of another constructor is not accepted here
      assert_raise ArgumentError, ~r/:call_ref/, fn ->
        Events.function_entry(M, :f, 0, [], call_ref: make_ref())
      end
    end
  end

  describe "function_exit/8" do
    test "builds a FunctionExit event" do
      event = Events.function_exit(String, :upcase, 1, 42, "ABC", 1_234, :normal)

      assert %Events{event_type: :function_exit, data: data} = event

      assert data == %FunctionExit{
               module: String,
               function: :upcase,
               arity: 1,
               call_id: 42,
               result: "ABC",
               duration_ns: 1_234,
               exit_reason: :normal
             }
    end

    test "matches the call id of a function_entry" do
      entry = Events.function_entry(M, :f, 0, [])
      exit = Events.function_exit(M, :f, 0, entry.data.call_id, :ok, 10, :normal)
      assert exit.data.call_id == entry.data.call_id
    end

    test "passes opts to new_event" do
      event =
        Events.function_exit(M, :f, 0, 1, {:error, :x}, 5, :exception,
          correlation_id: "c",
          parent_id: 9,
          pid: :c.pid(0, 0, 0)
        )

      assert event.correlation_id == "c"
      assert event.parent_id == 9
      assert event.pid == :c.pid(0, 0, 0)
      assert event.data.exit_reason == :exception
    end

    test "unknown opts raise" do
      assert_raise ArgumentError, ~r/:caller_line/, fn ->
        Events.function_exit(M, :f, 0, 1, :ok, 5, :normal, caller_line: 1)
      end
    end
  end

  describe "message_send/5" do
    test "builds a MessageSend event" do
      to = spawn(fn -> :ok end)
      event = Events.message_send(self(), to, {:hello, 1}, :send)

      assert %Events{event_type: :message_send, data: %MessageSend{} = data} = event
      assert data.sender_pid == self()
      assert data.receiver_pid == to
      assert data.message == {:hello, 1}
      assert is_integer(data.message_id) and data.message_id > 0
      assert data.send_type == :send
      assert data.call_ref == nil
    end

    test "message ids are unique" do
      a = Events.message_send(self(), self(), :m, :send)
      b = Events.message_send(self(), self(), :m, :send)
      assert a.data.message_id != b.data.message_id
    end

    test "takes call_ref from opts and passes the rest to new_event" do
      ref = make_ref()
      event = Events.message_send(self(), :server, :ping, :call, call_ref: ref, parent_id: 3)
      assert event.data.call_ref == ref
      assert event.data.receiver_pid == :server
      assert event.parent_id == 3
    end

    test "unknown opts raise" do
      assert_raise ArgumentError, ~r/:bogus/, fn ->
        Events.message_send(self(), self(), :m, :send, bogus: true)
      end
    end
  end

  describe "state_change/5" do
    test "builds a StateChange event with :changed diff" do
      event = Events.state_change(self(), :handle_call, %{n: 0}, %{n: 1})

      assert %Events{event_type: :state_change, data: %StateChange{} = data} = event
      assert data.server_pid == self()
      assert data.callback == :handle_call
      assert data.old_state == %{n: 0}
      assert data.new_state == %{n: 1}
      assert data.state_diff == :changed
      assert data.trigger_message == nil
      assert data.trigger_call_id == nil
    end

    test "equal states give :no_change" do
      event = Events.state_change(self(), :handle_info, %{n: 1}, %{n: 1})
      assert event.data.state_diff == :no_change
    end

    test "uses == (not ===) to compare states" do
      assert Events.state_change(self(), :handle_cast, 1, 1.0).data.state_diff == :no_change
    end

    test "takes trigger info from opts and passes the rest to new_event" do
      event =
        Events.state_change(self(), :handle_call, 0, 1,
          trigger_message: {:inc, 1},
          trigger_call_id: 55,
          correlation_id: 8
        )

      assert event.data.trigger_message == {:inc, 1}
      assert event.data.trigger_call_id == 55
      assert event.correlation_id == 8
    end

    test "unknown opts raise" do
      assert_raise ArgumentError, ~r/:spawn_opts/, fn ->
        Events.state_change(self(), :handle_call, 0, 1, spawn_opts: [])
      end
    end
  end

  describe "process_spawn/6" do
    test "builds a ProcessSpawn event" do
      child = spawn(fn -> :ok end)
      event = Events.process_spawn(child, self(), Kernel, :spawn, [:arg])

      assert %Events{event_type: :process_spawn, data: data} = event

      assert data == %ProcessSpawn{
               spawned_pid: child,
               parent_pid: self(),
               spawn_module: Kernel,
               spawn_function: :spawn,
               spawn_args: [:arg],
               spawn_opts: nil,
               registered_name: nil
             }
    end

    test "takes spawn_opts and registered_name from opts and passes the rest to new_event" do
      event =
        Events.process_spawn(self(), self(), Kernel, :spawn_link, [],
          spawn_opts: [:link, :monitor],
          registered_name: :worker,
          correlation_id: :c,
          node: :n@h
        )

      assert event.data.spawn_opts == [:link, :monitor]
      assert event.data.registered_name == :worker
      assert event.correlation_id == :c
      assert event.node == :n@h
    end

    test "unknown opts raise" do
      assert_raise ArgumentError, ~r/:trigger_message/, fn ->
        Events.process_spawn(self(), self(), M, :f, [], trigger_message: :x)
      end
    end
  end

  describe "serialize/1 and deserialize/1" do
    test "serialize/1 produces the external term format" do
      event = Events.new_event(:custom, %{a: 1})
      bin = Events.serialize(event)
      assert is_binary(bin)
      assert bin == :erlang.term_to_binary(event)
      assert <<131, _::binary>> = bin
    end

    test "round trip of every nested struct, bare and wrapped in an event" do
      for struct <- sample_structs() do
        assert roundtrip(struct) == struct
        event = Events.new_event(:custom, struct, correlation_id: make_ref(), parent_id: 1)
        assert roundtrip(event) == event
      end
    end

    test "round trip of every constructor's event" do
      events = [
        Events.function_entry(String, :upcase, 1, ["x"], caller_line: 3),
        Events.function_exit(String, :upcase, 1, 5, "X", 100, :normal),
        Events.message_send(self(), self(), {:msg, make_ref()}, :cast, call_ref: make_ref()),
        Events.state_change(self(), :handle_call, %{a: 1}, %{a: 2}, trigger_message: :go),
        Events.process_spawn(self(), self(), Kernel, :spawn, [1, 2], spawn_opts: [:link]),
        Events.new_event(:empty, nil)
      ]

      for event <- events, do: assert(roundtrip(event) == event)
    end

    test "round trip of plain terms" do
      for term <- [nil, 0, -1, 2 ** 100, 1.5, "", "bin", <<1::3>>, [], [1 | 2], {}, %{}] do
        assert roundtrip(term) == term
      end
    end

    test "deserialize/1 accepts compressed encodings" do
      event = Events.new_event(:custom, String.duplicate("a", 1_000))
      assert Events.deserialize(:erlang.term_to_binary(event, [:compressed])) == event
    end

    test "serialized_size/1 is the byte size of serialize/1" do
      for event <- [Events.new_event(:a, nil) | sample_structs()] do
        assert Events.serialized_size(event) == byte_size(Events.serialize(event))
      end

      small = Events.new_event(:a, nil, event_id: 1, timestamp: 0, wall_time: 0)
      big = %{small | data: String.duplicate("x", 10_000)}
      assert Events.serialized_size(big) > Events.serialized_size(small) + 9_000
    end
  end

  describe "deserialize/1 with untrusted input" do
    test "refuses a compressed binary that claims to inflate past the limit" do
      limit = Events.max_inflated_bytes()
      # Header of a compressed term stating an inflated size over the limit;
      # the body never gets inflated.
      bomb = <<131, 80, limit + 1::32, :zlib.compress(<<107, 0, 3, 1, 2, 3>>)::binary>>

      assert_raise ArgumentError, ~r/inflates to #{limit + 1} bytes/, fn ->
        Events.deserialize(bomb)
      end
    end

    test "still reads compressed events under the limit" do
      event = Events.new_event(:custom, %{payload: String.duplicate("a", 10_000)})
      assert event |> :erlang.term_to_binary([:compressed]) |> Events.deserialize() == event
    end

    test "garbage binaries raise ArgumentError" do
      for bin <- [<<>>, <<0>>, <<131>>, <<1, 2, 3, 4>>, "not a term", <<131, 255, 0, 0>>] do
        assert_raise ArgumentError, ~r/invalid or unsafe serialized event/, fn ->
          Events.deserialize(bin)
        end
      end
    end

    test "random binaries never crash with anything but ArgumentError" do
      :rand.seed(:exsss, {1, 2, 3})

      for _ <- 1..2_000 do
        bin = <<131>> <> :rand.bytes(:rand.uniform(64))

        try do
          Events.deserialize(bin)
        rescue
          ArgumentError -> :ok
        end
      end
    end

    test "every truncation of a valid encoding raises ArgumentError" do
      bin = Events.serialize(Events.state_change(self(), :handle_call, %{a: [1, 2]}, %{a: []}))

      for len <- 0..(byte_size(bin) - 1) do
        assert_raise ArgumentError, ~r/invalid or unsafe serialized event/, fn ->
          Events.deserialize(binary_part(bin, 0, len))
        end
      end
    end

    test "trailing bytes after a valid encoding raise ArgumentError" do
      bin = Events.serialize(Events.new_event(:custom, 1))

      assert_raise ArgumentError, ~r/trailing/, fn ->
        Events.deserialize(bin <> <<0>>)
      end
    end

    test "an unknown atom is rejected and never created" do
      len = byte_size(@missing_atom)

      assert_raise ArgumentError, fn -> String.to_existing_atom(@missing_atom) end

      # ATOM_EXT, SMALL_ATOM_UTF8_EXT and ATOM_UTF8_EXT, bare and nested in a tuple
      encodings = [
        <<131, 100, len::16, @missing_atom::binary>>,
        <<131, 119, len::8, @missing_atom::binary>>,
        <<131, 118, len::16, @missing_atom::binary>>,
        <<131, 104, 2, 97, 1, 100, len::16, @missing_atom::binary>>
      ]

      for bin <- encodings do
        assert_raise ArgumentError, ~r/invalid or unsafe serialized event/, fn ->
          Events.deserialize(bin)
        end
      end

      assert_raise ArgumentError, fn -> String.to_existing_atom(@missing_atom) end
    end

    test "existing atoms still decode" do
      assert Events.deserialize(<<131, 100, 0, 2, "ok">>) == :ok
    end

    test "terms containing functions are rejected" do
      local_fun = fn x -> x + 1 end
      external_fun = &String.upcase/1

      terms = [
        local_fun,
        external_fun,
        {:ok, local_fun},
        [1, 2, local_fun],
        [1 | local_fun],
        %{key: local_fun},
        %{local_fun => :value},
        Events.new_event(:custom, %{nested: [{:deep, [local_fun]}]}),
        %StateChange{old_state: %{f: external_fun}}
      ]

      for term <- terms do
        bin = :erlang.term_to_binary(term)

        assert_raise ArgumentError, ~r/contains a function/, fn ->
          Events.deserialize(bin)
        end
      end
    end

    test "non-binary input raises ArgumentError naming the argument" do
      for input <- [nil, :atom, 123, 'charlist', [131, 100], {:ok, "x"}, %{}, <<1::3>>] do
        assert_raise ArgumentError, ~r/expected binary to be a binary/, fn ->
          Events.deserialize(input)
        end
      end
    end
  end
end

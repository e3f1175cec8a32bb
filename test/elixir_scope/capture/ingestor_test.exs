defmodule ElixirScope.Capture.IngestorTest do
  use ExUnit.Case, async: true

  import ElixirScope.RingTestHelpers

  alias ElixirScope.Capture.{Ingestor, RingBuffer}
  alias ElixirScope.Events

  alias ElixirScope.Events.{
    ErrorEvent,
    FunctionExecution,
    MessageEvent,
    PerformanceMetric,
    ProcessEvent,
    StateChange
  }

  doctest Ingestor

  # The native monotonic timestamp runs a few hundred ns ahead of
  # System.monotonic_time/1 (see the report), so allow some slack.
  @mono_tolerance_ns 10_000_000
  # Wall clock tolerance: the native side caches the VM time offset for up
  # to 100 ms; without time warp the offset does not change anyway.
  @wall_tolerance_ns 1_000_000_000

  setup do
    %{buf: new_ring!(size: 256)}
  end

  # Runs `fun`, then reads the one event it wrote; checks the header fields
  # (id, timestamp, wall_time) against the clocks around the call.
  defp ingest_one(buf, fun) do
    pos = RingBuffer.stats(buf).write_position
    mono0 = System.monotonic_time(:nanosecond)
    wall0 = System.system_time(:nanosecond)
    assert fun.() == :ok
    mono1 = System.monotonic_time(:nanosecond)
    wall1 = System.system_time(:nanosecond)

    assert {:ok, event, next} = RingBuffer.read(buf, pos)
    assert next == pos + 1

    ts = Map.get(event, :timestamp)
    wall = Map.get(event, :wall_time)

    assert is_integer(ts) and ts >= mono0 - @mono_tolerance_ns and
             ts <= mono1 + @mono_tolerance_ns,
           "timestamp #{ts} not in call window #{mono0}..#{mono1} (#{inspect(event)})"

    assert is_integer(wall) and wall >= wall0 - @wall_tolerance_ns and
             wall <= wall1 + @wall_tolerance_ns,
           "wall_time #{wall} not close to #{wall0}..#{wall1}"

    event
  end

  defp assert_id(%{id: id}), do: assert(is_integer(id) and id > 0)

  describe "ingest_function_call/6" do
    test "builds a %FunctionExecution{event_type: :call}", %{buf: buf} do
      me = self()
      args = ["a", 1, %{b: [2]}]

      event =
        ingest_one(buf, fn ->
          Ingestor.ingest_function_call(buf, String, :upcase, args, me, {:corr, 1})
        end)

      assert %FunctionExecution{
               module: String,
               function: :upcase,
               arity: 3,
               args: ^args,
               caller_pid: ^me,
               correlation_id: {:corr, 1},
               event_type: :call,
               return_value: nil,
               duration_ns: nil
             } = event

      assert_id(event)
    end

    test "caller_pid may be nil; correlation_id may be any term", %{buf: buf} do
      ref = make_ref()

      event =
        ingest_one(buf, fn -> Ingestor.ingest_function_call(buf, :erlang, :now, [], nil, ref) end)

      assert %FunctionExecution{
               module: :erlang,
               function: :now,
               arity: 0,
               args: [],
               caller_pid: nil,
               correlation_id: ^ref
             } = event
    end

    test "a pid of another process is kept", %{buf: buf} do
      other = spawn(fn -> :ok end)
      event = ingest_one(buf, fn -> Ingestor.ingest_function_call(buf, M, :f, [1], other, 1) end)
      assert event.caller_pid == other
    end
  end

  describe "ingest_function_return/4" do
    test "builds a %FunctionExecution{event_type: :return}", %{buf: buf} do
      event =
        ingest_one(buf, fn ->
          Ingestor.ingest_function_return(buf, {:ok, [1, 2]}, 12_345, :corr)
        end)

      assert %FunctionExecution{
               event_type: :return,
               return_value: {:ok, [1, 2]},
               duration_ns: 12_345,
               correlation_id: :corr,
               module: nil,
               function: nil,
               arity: nil,
               args: nil,
               caller_pid: nil
             } = event

      assert_id(event)
    end

    test "duration bounds: 0 and the largest 64-bit value", %{buf: buf} do
      max = 0x7FFF_FFFF_FFFF_FFFF
      e0 = ingest_one(buf, fn -> Ingestor.ingest_function_return(buf, nil, 0, nil) end)
      e1 = ingest_one(buf, fn -> Ingestor.ingest_function_return(buf, nil, max, nil) end)
      assert e0.duration_ns == 0
      assert e1.duration_ns == max
    end

    test "negative or too large durations raise ArgumentError", %{buf: buf} do
      for d <- [-1, 0x8000_0000_0000_0000, 1.5, :fast, nil] do
        assert_raise ArgumentError, ~r/duration_ns/, fn ->
          Ingestor.ingest_function_return(buf, :v, d, nil)
        end
      end
    end
  end

  describe "ingest_process_spawn/3" do
    test "builds a %ProcessEvent{event_type: :spawn}", %{buf: buf} do
      parent = self()
      child = spawn(fn -> :ok end)
      event = ingest_one(buf, fn -> Ingestor.ingest_process_spawn(buf, parent, child) end)

      assert %ProcessEvent{event_type: :spawn, pid: ^child, parent_pid: ^parent} = event
      assert_id(event)
    end
  end

  describe "ingest_message_send/4" do
    test "builds a %MessageEvent{event_type: :send}", %{buf: buf} do
      from = self()
      to = spawn(fn -> :ok end)

      event =
        ingest_one(buf, fn -> Ingestor.ingest_message_send(buf, from, to, {:hello, "x"}) end)

      assert %MessageEvent{
               event_type: :send,
               from_pid: ^from,
               to_pid: ^to,
               message: {:hello, "x"}
             } = event

      assert_id(event)
    end

    test "to may be a registered name, {name, node} or a port", %{buf: buf} do
      port = hd(Port.list())

      for to <- [:logger, {:name, :node@host}, port] do
        event = ingest_one(buf, fn -> Ingestor.ingest_message_send(buf, self(), to, :m) end)
        assert event.to_pid == to
      end
    end
  end

  describe "ingest_state_change/4" do
    test "state_diff is :no_change for equal states", %{buf: buf} do
      me = self()

      event = ingest_one(buf, fn -> Ingestor.ingest_state_change(buf, me, %{a: 1}, %{a: 1}) end)

      assert %StateChange{
               server_pid: ^me,
               old_state: %{a: 1},
               new_state: %{a: 1},
               state_diff: :no_change,
               trigger_message: nil,
               trigger_call_id: nil
             } = event

      assert_id(event)
    end

    test "state_diff is :changed for different states", %{buf: buf} do
      event =
        ingest_one(buf, fn -> Ingestor.ingest_state_change(buf, self(), %{a: 1}, %{a: 2}) end)

      assert %StateChange{old_state: %{a: 1}, new_state: %{a: 2}, state_diff: :changed} = event
    end

    test "state_diff follows == (like Events.state_change/5)", %{buf: buf} do
      for {old, new} <- [{1, 1.0}, {[1], [1]}, {"a", "a"}, {1, 2}, {:a, "a"}] do
        event = ingest_one(buf, fn -> Ingestor.ingest_state_change(buf, self(), old, new) end)

        assert event.state_diff ==
                 Events.state_change(self(), :cb, old, new).data.state_diff
      end
    end
  end

  describe "ingest_performance_metric/3,4" do
    test "metadata defaults to %{}", %{buf: buf} do
      event = ingest_one(buf, fn -> Ingestor.ingest_performance_metric(buf, :memory, 12.5) end)

      assert %PerformanceMetric{
               metric_name: :memory,
               value: 12.5,
               metadata: %{},
               metric_type: nil,
               unit: nil,
               source_context: nil
             } = event

      assert_id(event)
    end

    test "string names, integer values and metadata", %{buf: buf} do
      event =
        ingest_one(buf, fn ->
          Ingestor.ingest_performance_metric(buf, "reductions", 1_000_000, %{unit: :count})
        end)

      assert %PerformanceMetric{
               metric_name: "reductions",
               value: 1_000_000,
               metadata: %{unit: :count}
             } = event
    end

    test "bignum values round trip", %{buf: buf} do
      v = Bitwise.bsl(1, 80)
      event = ingest_one(buf, fn -> Ingestor.ingest_performance_metric(buf, :big, v) end)
      assert event.value == v
    end
  end

  describe "ingest_error/4" do
    test "builds an %ErrorEvent{}", %{buf: buf} do
      stack = [{M, :f, 1, [file: ~c"m.ex", line: 3]}]

      event = ingest_one(buf, fn -> Ingestor.ingest_error(buf, :exit, "boom", stack) end)

      assert %ErrorEvent{
               error_type: :exit,
               error_message: "boom",
               stacktrace: ^stack,
               context: nil,
               recovery_action: nil
             } = event

      assert_id(event)
    end
  end

  describe "ingest_generic_event/7" do
    test "builds an %ElixirScope.Events{} envelope", %{buf: buf} do
      me = self()
      pos = RingBuffer.stats(buf).write_position

      assert Ingestor.ingest_generic_event(buf, :custom, %{x: 1}, me, :corr, 123, 456) == :ok
      assert {:ok, event, _} = RingBuffer.read(buf, pos)

      assert %Events{
               event_type: :custom,
               data: %{x: 1},
               pid: ^me,
               correlation_id: :corr,
               timestamp: 123,
               wall_time: 456,
               parent_id: nil
             } = event

      assert event.node == node()
      assert is_integer(event.event_id) and event.event_id > 0
    end

    test "pid may be nil; timestamps are taken as given", %{buf: buf} do
      ts = System.monotonic_time(:nanosecond)
      wall = System.system_time(:nanosecond)
      :ok = Ingestor.ingest_generic_event(buf, :t, %{}, nil, nil, ts, wall)

      assert {:ok, %Events{pid: nil, timestamp: ^ts, wall_time: ^wall, data: %{}}, _} =
               RingBuffer.read(buf, 0)
    end

    test "a large data field is truncated visibly, the rest survives", %{buf: buf} do
      big = :binary.copy("d", 100_000)
      :ok = Ingestor.ingest_generic_event(buf, :t, %{big: big, small: 1}, self(), 7, 1, 2)
      assert {:ok, %Events{} = event, _} = RingBuffer.read(buf, 0)
      assert event.correlation_id == 7
      assert event.data.small == 1
      assert {:truncated, n, :binary} = event.data.big
      assert n >= 100_000
    end
  end

  describe "ids" do
    test "are unique positive integers across ingest functions and Events.generate_id/0",
         %{buf: buf} do
      me = self()

      ingest = [
        fn -> Ingestor.ingest_function_call(buf, M, :f, [], me, nil) end,
        fn -> Ingestor.ingest_function_return(buf, :r, 1, nil) end,
        fn -> Ingestor.ingest_process_spawn(buf, me, me) end,
        fn -> Ingestor.ingest_message_send(buf, me, me, :m) end,
        fn -> Ingestor.ingest_state_change(buf, me, 1, 2) end,
        fn -> Ingestor.ingest_performance_metric(buf, :m, 1) end,
        fn -> Ingestor.ingest_error(buf, :error, :e, []) end,
        fn -> Ingestor.ingest_generic_event(buf, :t, %{}, me, nil, 0, 0) end
      ]

      for f <- ingest, _ <- 1..10, do: :ok = f.()
      generated = for _ <- 1..10, do: Events.generate_id()

      {events, 80} = RingBuffer.read_batch(buf, 0, 100)

      ids =
        Enum.map(events, fn
          %Events{event_id: id} -> id
          %{id: id} -> id
        end)

      all = ids ++ generated
      assert Enum.all?(all, &(is_integer(&1) and &1 > 0))
      assert length(Enum.uniq(all)) == length(all)
      # Within one process, ids are handed out in increasing order.
      assert ids == Enum.sort(ids)
    end

    test "are unique across concurrent processes" do
      buf = new_ring!(size: 8192)

      1..8
      |> Enum.map(fn _ ->
        Task.async(fn ->
          for i <- 1..500, do: :ok = Ingestor.ingest_function_return(buf, i, i, nil)
        end)
      end)
      |> Enum.each(&Task.await/1)

      {events, 4000} = RingBuffer.read_batch(buf, 0, 5000)
      ids = Enum.map(events, & &1.id)
      assert length(Enum.uniq(ids)) == 4000
    end
  end

  describe "ingest_batch/2" do
    test "{:ok, n}", %{buf: buf} do
      events = [Events.new_event(:a, %{n: 1}), Events.new_event(:b, %{n: 2}), :raw]
      assert Ingestor.ingest_batch(buf, events) == {:ok, 3}
      assert Ingestor.ingest_batch(buf, []) == {:ok, 0}
      assert RingBuffer.read_batch(buf, 0, 10) == {events, 3}
    end

    test "partial success on a full :drop_newest ring" do
      buf = new_ring!(size: 4, overflow_strategy: :drop_newest)

      assert Ingestor.ingest_batch(buf, Enum.to_list(1..10)) ==
               {:error, {:partial_success, 4, [buffer_full: 6]}}

      assert RingBuffer.stats(buf).dropped.buffer_full == 6
    end

    test "destroyed ring and bad input", %{buf: buf} do
      assert_raise ArgumentError, fn -> Ingestor.ingest_batch(buf, :nope) end
      :ok = RingBuffer.destroy(buf)
      assert Ingestor.ingest_batch(buf, [1]) == {:error, :destroyed}
    end
  end

  describe "create_fast_ingestor/1" do
    test "returns a 1-arity fun writing to the ring", %{buf: buf} do
      ingest = Ingestor.create_fast_ingestor(buf)
      assert is_function(ingest, 1)
      assert ingest.({:fast, 1}) == :ok
      assert ingest.(%{any: "term"}) == :ok
      assert RingBuffer.read_batch(buf, 0, 10) == {[{:fast, 1}, %{any: "term"}], 2}
    end

    test "reports :buffer_full and :destroyed" do
      buf = new_ring!(size: 1, overflow_strategy: :drop_newest)
      ingest = Ingestor.create_fast_ingestor(buf)
      assert ingest.(1) == :ok
      assert ingest.(2) == {:error, :buffer_full}
      :ok = RingBuffer.destroy(buf)
      assert ingest.(3) == {:error, :destroyed}
    end

    test "raises ArgumentError for a non-buffer" do
      assert_raise ArgumentError, fn -> Ingestor.create_fast_ingestor(:nope) end
    end
  end

  describe "results from the ring" do
    test "every ingest function returns {:error, :buffer_full} on a full :drop_newest ring" do
      buf = new_ring!(size: 1, overflow_strategy: :drop_newest)
      :ok = RingBuffer.write(buf, :filler)
      me = self()

      for f <- [
            fn -> Ingestor.ingest_function_call(buf, M, :f, [], me, nil) end,
            fn -> Ingestor.ingest_function_return(buf, :r, 1, nil) end,
            fn -> Ingestor.ingest_process_spawn(buf, me, me) end,
            fn -> Ingestor.ingest_message_send(buf, me, me, :m) end,
            fn -> Ingestor.ingest_state_change(buf, me, 1, 2) end,
            fn -> Ingestor.ingest_performance_metric(buf, :m, 1) end,
            fn -> Ingestor.ingest_performance_metric(buf, :m, 1, %{}) end,
            fn -> Ingestor.ingest_error(buf, :error, :e, []) end,
            fn -> Ingestor.ingest_generic_event(buf, :t, %{}, me, nil, 0, 0) end
          ] do
        assert f.() == {:error, :buffer_full}
      end

      stats = RingBuffer.stats(buf)
      assert stats.dropped.buffer_full == 9
      assert_accounting(stats, 10)
    end

    test "every ingest function returns {:error, :destroyed} on a destroyed ring", %{buf: buf} do
      :ok = RingBuffer.destroy(buf)
      me = self()

      for f <- [
            fn -> Ingestor.ingest_function_call(buf, M, :f, [], me, nil) end,
            fn -> Ingestor.ingest_function_return(buf, :r, 1, nil) end,
            fn -> Ingestor.ingest_process_spawn(buf, me, me) end,
            fn -> Ingestor.ingest_message_send(buf, me, me, :m) end,
            fn -> Ingestor.ingest_state_change(buf, me, 1, 2) end,
            fn -> Ingestor.ingest_performance_metric(buf, :m, 1) end,
            fn -> Ingestor.ingest_error(buf, :error, :e, []) end,
            fn -> Ingestor.ingest_generic_event(buf, :t, %{}, me, nil, 0, 0) end
          ] do
        assert f.() == {:error, :destroyed}
      end
    end
  end

  describe "large fields are truncated visibly" do
    test "large args: arity counted up to 65,535, args become a :list marker", %{buf: buf} do
      args = Enum.to_list(1..60_000)
      :ok = Ingestor.ingest_function_call(buf, M, :f, args, self(), :c)
      assert {:ok, %FunctionExecution{} = event, 1} = RingBuffer.read(buf, 0)
      assert event.arity == 60_000
      assert {:truncated, n, :list} = event.args
      assert n > 0
      # fields after the truncated one are intact
      assert event.caller_pid == self()
      assert event.correlation_id == :c
      assert RingBuffer.stats(buf).truncated_events == 1

      # Longer lists (no real call has more than 255 arguments) are counted
      # up to the cap, so the NIF never walks an unbounded list.
      :ok = Ingestor.ingest_function_call(buf, M, :f, Enum.to_list(1..100_000), self(), :c)
      assert {:ok, %FunctionExecution{arity: 65_535}, 2} = RingBuffer.read(buf, 1)
    end

    test "one big binary argument", %{buf: buf} do
      big = :binary.copy("a", 100_000)
      :ok = Ingestor.ingest_function_call(buf, M, :f, [big, 1], self(), 1)

      assert {:ok, %FunctionExecution{arity: 2, args: {:truncated, n, :list}}, _} =
               RingBuffer.read(buf, 0)

      assert n >= 8000
    end

    test "big message, state, return value, error message and metadata", %{buf: buf} do
      big = :binary.copy("m", 100_000)
      me = self()
      :ok = Ingestor.ingest_message_send(buf, me, me, big)
      :ok = Ingestor.ingest_state_change(buf, me, big, %{small: 1})
      :ok = Ingestor.ingest_function_return(buf, big, 5, :c)
      :ok = Ingestor.ingest_error(buf, :error, big, [])
      :ok = Ingestor.ingest_performance_metric(buf, :m, 1, %{big: big, x: 1})

      assert {[msg, state, ret, err, metric], 5} = RingBuffer.read_batch(buf, 0, 10)

      assert {:truncated, _, :binary} = msg.message
      assert msg.from_pid == me

      assert {:truncated, _, :binary} = state.old_state
      assert state.new_state == %{small: 1}
      assert state.state_diff == :changed

      assert {:truncated, _, :binary} = ret.return_value
      assert ret.duration_ns == 5 and ret.correlation_id == :c

      assert {:truncated, _, :binary} = err.error_message
      assert err.stacktrace == []

      assert %{big: {:truncated, _, :binary}, x: 1} = metric.metadata
      assert RingBuffer.stats(buf).truncated_events == 5
    end
  end

  describe "argument checks" do
    test "wrong types raise ArgumentError naming the argument", %{buf: buf} do
      me = self()

      cases = [
        {~r/RingBuffer/, fn -> Ingestor.ingest_function_call(:buf, M, :f, [], me, nil) end},
        {~r/module/, fn -> Ingestor.ingest_function_call(buf, "M", :f, [], me, nil) end},
        {~r/function/, fn -> Ingestor.ingest_function_call(buf, M, "f", [], me, nil) end},
        {~r/args/, fn -> Ingestor.ingest_function_call(buf, M, :f, {}, me, nil) end},
        {~r/caller_pid/, fn -> Ingestor.ingest_function_call(buf, M, :f, [], :me, nil) end},
        {~r/parent_pid/, fn -> Ingestor.ingest_process_spawn(buf, :p, me) end},
        {~r/child_pid/, fn -> Ingestor.ingest_process_spawn(buf, me, nil) end},
        {~r/from_pid/, fn -> Ingestor.ingest_message_send(buf, nil, me, :m) end},
        {~r/to_pid/, fn -> Ingestor.ingest_message_send(buf, me, "name", :m) end},
        {~r/server_pid/, fn -> Ingestor.ingest_state_change(buf, :s, 1, 2) end},
        {~r/metric name/, fn -> Ingestor.ingest_performance_metric(buf, 1, 1) end},
        {~r/metric value/, fn -> Ingestor.ingest_performance_metric(buf, :m, "1") end},
        {~r/metadata/, fn -> Ingestor.ingest_performance_metric(buf, :m, 1, []) end},
        {~r/stacktrace/, fn -> Ingestor.ingest_error(buf, :e, :m, :not_a_list) end},
        {~r/event_type/, fn -> Ingestor.ingest_generic_event(buf, "t", %{}, me, nil, 0, 0) end},
        {~r/event_data/, fn -> Ingestor.ingest_generic_event(buf, :t, [], me, nil, 0, 0) end},
        {~r/pid/, fn -> Ingestor.ingest_generic_event(buf, :t, %{}, :me, nil, 0, 0) end},
        {~r/timestamp/, fn -> Ingestor.ingest_generic_event(buf, :t, %{}, me, nil, 0.0, 0) end},
        {~r/wall_time/, fn -> Ingestor.ingest_generic_event(buf, :t, %{}, me, nil, 0, nil) end}
      ]

      for {msg, f} <- cases, do: assert_raise(ArgumentError, msg, f)
      assert RingBuffer.stats(buf).total_writes == 0
    end
  end

  describe "a value too big for the ring is one marker in the field's place" do
    # The original truncated with Utils.truncate_data/2: the field itself
    # became {:truncated, size, type_hint}, never a value inside it.
    test "return values, messages, exception and exit reasons, error messages", %{buf: buf} do
      me = self()
      big = %{data: :binary.copy("m", 100_000), small: 1}
      :ok = Ingestor.ingest_function_return(buf, big, 5, :c)
      :ok = Ingestor.ingest_message_send(buf, me, me, big)
      :ok = Ingestor.ingest_message_receive(buf, me, big)
      :ok = Ingestor.ingest_function_exception(buf, :error, big, 5, :c)
      :ok = Ingestor.ingest_process_exit(buf, me, big)
      :ok = Ingestor.ingest_error(buf, :error, big, [])

      assert {[ret, send, recv, exc, exit, err], 6} = RingBuffer.read_batch(buf, 0, 10)
      assert {:truncated, n, :map} = ret.return_value
      assert n >= 100_000
      assert {:truncated, _, :map} = send.message
      assert {:truncated, _, :map} = recv.message
      assert {:error, {:truncated, _, :map}} = exc.return_value
      assert {:truncated, _, :map} = exit.reason
      assert {:truncated, _, :map} = err.error_message
      assert RingBuffer.stats(buf).truncated_events == 6
    end

    test "a value that fits is kept whole, whatever its shape", %{buf: buf} do
      v = %{data: :binary.copy("m", 100), nested: %{a: [1, 2]}}
      :ok = Ingestor.ingest_function_return(buf, v, 5, :c)
      assert {:ok, %FunctionExecution{return_value: ^v}, _} = RingBuffer.read(buf, 0)
      assert RingBuffer.stats(buf).truncated_events == 0
    end
  end

  describe "benchmark_ingestion/3" do
    test "times every write and reports the original's shape", %{buf: buf} do
      event = %FunctionExecution{id: 1, module: M, function: :f, event_type: :call}
      before = RingBuffer.stats(buf).write_position
      stats = Ingestor.benchmark_ingestion(buf, event, 100)

      assert Map.keys(stats) |> Enum.sort() ==
               [:avg_time_ns, :max_time_ns, :min_time_ns, :operations, :total_time_ns]

      assert stats.operations == 100
      assert is_float(stats.avg_time_ns)
      assert stats.min_time_ns >= 0 and stats.min_time_ns <= stats.max_time_ns
      assert stats.total_time_ns >= stats.max_time_ns
      assert_in_delta stats.avg_time_ns, stats.total_time_ns / 100, 1.0e-9
      assert stats.min_time_ns <= stats.avg_time_ns and stats.avg_time_ns <= stats.max_time_ns
      # The writes are real: the events are in the ring, equal to the sample.
      assert RingBuffer.stats(buf).write_position == before + 100
      {events, _} = RingBuffer.read_batch(buf, before, 200)
      assert length(events) == 100 and Enum.all?(events, &(&1 == event))
    end

    test "defaults to 1,000 writes", %{buf: buf} do
      assert %{operations: 1000} = Ingestor.benchmark_ingestion(buf, :sample)
    end

    test "a full :drop_newest ring: rejected writes are timed and counted by the ring" do
      buf = new_ring!(size: 8, overflow_strategy: :drop_newest)
      assert %{operations: 20} = Ingestor.benchmark_ingestion(buf, :x, 20)
      assert RingBuffer.stats(buf).dropped_events == 12
    end

    test "bad arguments raise ArgumentError", %{buf: buf} do
      for n <- [0, -1, 1.5, nil, :many, 10_000_001] do
        assert_raise ArgumentError, fn -> Ingestor.benchmark_ingestion(buf, :e, n) end
      end

      for bad <- [nil, :buf, %{}] do
        assert_raise ArgumentError, fn -> Ingestor.benchmark_ingestion(bad, :e, 10) end
      end
    end
  end

  describe "validate_performance/1" do
    test "answers :ok or the measured miss, after 1,000 real writes", %{buf: buf} do
      before = RingBuffer.stats(buf).total_writes

      case Ingestor.validate_performance(buf) do
        :ok -> :ok
        {:error, {:performance_target_missed, avg, 1000}} -> assert avg > 1000
      end

      assert RingBuffer.stats(buf).total_writes == before + 1000
    end

    test "a non-buffer raises ArgumentError" do
      for bad <- [nil, :buf, %{ref: make_ref()}] do
        assert_raise ArgumentError, fn -> Ingestor.validate_performance(bad) end
      end
    end
  end
end

defmodule ElixirScope.Capture.IngestorGlobalBufferTest do
  # get_buffer/0 and set_buffer/1 use a node-wide :persistent_term.
  use ExUnit.Case, async: false

  import ElixirScope.RingTestHelpers

  alias ElixirScope.Capture.{Ingestor, RingBuffer}

  @key {Ingestor, :buffer}

  setup do
    previous = :persistent_term.get(@key, :__unset__)

    on_exit(fn ->
      case previous do
        :__unset__ -> :persistent_term.erase(@key)
        buffer -> :persistent_term.put(@key, buffer)
      end
    end)

    :ok
  end

  test "get_buffer/0 is {:error, :not_initialized} until set_buffer/1" do
    :persistent_term.erase(@key)
    assert Ingestor.get_buffer() == {:error, :not_initialized}

    buf = new_ring!(size: 8, name: :global)
    assert Ingestor.set_buffer(buf) == :ok
    assert Ingestor.get_buffer() == {:ok, buf}

    # Visible from other processes; usable to ingest.
    task = Task.async(fn -> Ingestor.get_buffer() end)
    assert {:ok, ^buf} = Task.await(task)
    {:ok, global} = Ingestor.get_buffer()
    :ok = Ingestor.ingest_performance_metric(global, :via_global, 1)
    assert {:ok, %{metric_name: :via_global}, 1} = RingBuffer.read(buf, 0)

    other = new_ring!(size: 16)
    assert Ingestor.set_buffer(other) == :ok
    assert Ingestor.get_buffer() == {:ok, other}
  end

  test "set_buffer/1 rejects non-buffers with ArgumentError and keeps the old one" do
    buf = new_ring!(size: 8)
    :ok = Ingestor.set_buffer(buf)

    for bad <- [nil, :buf, "buf", %{ref: make_ref()}, %URI{}, {:ok, buf}] do
      assert_raise ArgumentError, fn -> Ingestor.set_buffer(bad) end
    end

    assert Ingestor.get_buffer() == {:ok, buf}
  end
end

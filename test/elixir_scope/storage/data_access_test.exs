defmodule ElixirScope.Storage.DataAccessTest do
  use ExUnit.Case, async: true

  import Bitwise

  alias ElixirScope.Events
  alias ElixirScope.Storage.DataAccess

  alias ElixirScope.Events.{
    ErrorEvent,
    FunctionExecution,
    MessageEvent,
    PerformanceMetric,
    ProcessEvent,
    StateChange
  }

  doctest DataAccess

  defp new!(opts \\ []) do
    assert {:ok, %DataAccess{} = s} = DataAccess.new(opts)
    s
  end

  defp ids({:ok, events}), do: Enum.map(events, & &1.id)

  defp all_event_types(pid) do
    [
      %FunctionExecution{
        id: 1,
        timestamp: 100,
        wall_time: 5,
        module: Enum,
        function: :map,
        arity: 2,
        args: [[1, 2], &Function.identity/1],
        return_value: {:ok, "x"},
        duration_ns: 42,
        caller_pid: pid,
        correlation_id: make_ref(),
        event_type: :call
      },
      %ProcessEvent{id: 2, timestamp: 200, pid: pid, parent_pid: self(), event_type: :spawn},
      %MessageEvent{
        id: 3,
        timestamp: 300,
        from_pid: pid,
        to_pid: :registered,
        message: {:hello, %{a: [1.5, -(1 <<< 70)]}},
        event_type: :send
      },
      %StateChange{
        id: 4,
        timestamp: 400,
        server_pid: pid,
        callback: :handle_call,
        old_state: %{n: 1},
        new_state: %{n: 2},
        state_diff: :changed
      },
      %PerformanceMetric{id: 5, timestamp: 500, metric_name: :mem, value: 3.25, unit: :bytes},
      %ErrorEvent{
        id: 6,
        timestamp: 600,
        error_type: :error,
        error_class: RuntimeError,
        error_message: "boom",
        stacktrace: [{M, :f, 1, [file: ~c"m.ex", line: 3]}]
      },
      Events.function_entry(M, :f, 1, [:a], event_id: 7, timestamp: 700, pid: pid),
      Events.function_exit(M, :f, 1, 9, :ok, 10, :normal, event_id: 8, timestamp: 800, pid: pid),
      Events.message_send(pid, self(), :m, :send, event_id: 9, timestamp: 900),
      %{id: 10, timestamp: 1000, pid: pid, module: M, function: :g, payload: <<1, 2, 3>>},
      %{event_id: 11, timestamp: 1100},
      %URI{host: "example.com"},
      {:plain, :tuple},
      "a binary",
      :an_atom,
      12
    ]
  end

  describe "new/1" do
    test "defaults and options" do
      s = new!()
      assert %DataAccess{max_events: 1_000_000, name: nil} = s
      assert is_reference(s.ref)
      assert inspect(s) == "#DataAccess<[max_events: 1000000]>"
      s = new!(name: :store, max_events: 10)
      assert inspect(s) =~ "name: :store"
      assert DataAccess.get_stats(s).max_events == 10
    end

    test "bad options raise ArgumentError naming the problem" do
      for {opts, msg} <- [
            {[max_events: 0], ~r/max_events/},
            {[max_events: -1], ~r/max_events/},
            {[max_events: 1 <<< 30], ~r/max_events/},
            {[max_events: 1.0], ~r/max_events/},
            {[bogus: 1], ~r/unknown data access option/},
            {[{"k", 1}], ~r/keyword list/},
            {:nope, ~r/keyword list/},
            {%{max_events: 1}, ~r/keyword list/}
          ] do
        assert_raise ArgumentError, msg, fn -> DataAccess.new(opts) end
      end
    end
  end

  describe "store and read back" do
    test "every event type is storable and read back equal" do
      s = new!()
      events = all_event_types(spawn(fn -> :ok end))

      for e <- events, do: assert(DataAccess.store_event(s, e) == :ok)
      assert DataAccess.get_stats(s).total_events == length(events)

      for {e, id} <- Enum.zip(Enum.take(events, 11), 1..11) do
        assert DataAccess.get_event(s, id) == {:ok, e}
      end

      {:ok, all} = DataAccess.query_by_time_range(s, -(1 <<< 70), 1 <<< 70, limit: 100)
      assert Enum.sort(all) == Enum.sort(events)
    end

    test "store_events/2 stores every type in order" do
      s = new!()
      events = all_event_types(self())
      assert DataAccess.store_events(s, events) == {:ok, length(events)}
      {:ok, all} = DataAccess.query_by_time_range(s, 0, 1200, limit: 100)
      assert all == Enum.take(events, 11)
      assert DataAccess.store_events(s, []) == {:ok, 0}
    end

    test "the same id twice is stored once" do
      s = new!()
      assert DataAccess.store_event(s, %{id: 1, timestamp: 1, v: :first}) == :ok
      assert DataAccess.store_event(s, %{id: 1, timestamp: 2, v: :second}) == :ok
      assert DataAccess.store_events(s, [%{id: 1, v: :third}, %{id: 2}, %{id: 2}]) == {:ok, 3}

      stats = DataAccess.get_stats(s)
      assert stats.total_events == 2
      assert stats.duplicates == 3
      assert {:ok, %{v: :first}} = DataAccess.get_event(s, 1)
    end

    test "non-integer ids are keyed stably" do
      s = new!()
      ref = make_ref()

      for id <- ["s", {:t, 1}, ref, -5, 1 <<< 64] do
        assert DataAccess.store_event(s, %{id: id, x: id}) == :ok
        assert DataAccess.get_event(s, id) == {:ok, %{id: id, x: id}}
      end

      assert DataAccess.store_event(s, %{id: "s"}) == :ok
      assert DataAccess.get_stats(s).total_events == 5
      assert DataAccess.get_event(s, "other") == {:error, :not_found}
      assert DataAccess.get_event(s, 99) == {:error, :not_found}
      assert DataAccess.get_event(s, nil) == {:error, :not_found}
    end

    test "id-less events all get fresh ids" do
      s = new!()
      for _ <- 1..3, do: assert(DataAccess.store_event(s, %ProcessEvent{timestamp: 1}) == :ok)
      assert DataAccess.store_events(s, [:a, :a, %{x: 1}]) == {:ok, 3}
      assert DataAccess.get_stats(s).total_events == 6
    end

    test "an event larger than 1 MiB is refused, not truncated" do
      s = new!()
      big = %{id: 1, blob: :binary.copy(<<1>>, 2 <<< 20)}
      assert DataAccess.store_event(s, big) == {:error, :event_too_large}
      assert DataAccess.store_events(s, [%{id: 2}, big]) == {:error, :event_too_large}
      assert DataAccess.get_stats(s).total_events == 0
      ok = %{id: 3, blob: :binary.copy(<<1>>, 500_000)}
      assert DataAccess.store_event(s, ok) == :ok
      assert DataAccess.get_event(s, 3) == {:ok, ok}
    end
  end

  describe "queries" do
    setup do
      s = new!()
      a = spawn(fn -> :ok end)
      b = spawn(fn -> :ok end)

      events =
        for i <- 1..20 do
          %FunctionExecution{
            id: i,
            timestamp: i * 10,
            module: if(rem(i, 2) == 0, do: Even, else: Odd),
            function: if(i <= 10, do: :low, else: :high),
            caller_pid: if(i <= 5, do: a, else: b),
            correlation_id: {:corr, rem(i, 3)}
          }
        end

      {:ok, 20} = DataAccess.store_events(s, events)
      %{s: s, a: a, b: b}
    end

    test "by time range: inclusive bounds, limit, order", %{s: s} do
      assert ids(DataAccess.query_by_time_range(s, 30, 60)) == [3, 4, 5, 6]
      assert ids(DataAccess.query_by_time_range(s, 30, 60, order: :desc)) == [6, 5, 4, 3]
      assert ids(DataAccess.query_by_time_range(s, 0, 1000, limit: 3)) == [1, 2, 3]

      assert ids(DataAccess.query_by_time_range(s, 0, 1000, limit: 3, order: :desc)) ==
               [20, 19, 18]

      assert DataAccess.query_by_time_range(s, 61, 69) == {:ok, []}
      assert DataAccess.query_by_time_range(s, 60, 30) == {:ok, []}
      assert DataAccess.query_by_time_range(s, 0, 1000, limit: 0) == {:ok, []}
      assert length(elem(DataAccess.query_by_time_range(s, -(1 <<< 80), 1 <<< 80), 1)) == 20
    end

    test "default limit is 1000" do
      s = new!()
      {:ok, 1500} = DataAccess.store_events(s, Enum.map(1..1500, &%{id: &1, timestamp: &1}))
      assert length(elem(DataAccess.query_by_time_range(s, 0, 2000), 1)) == 1000
      assert length(elem(DataAccess.query_by_time_range(s, 0, 2000, limit: 5000), 1)) == 1500
    end

    test "time range with out-of-order timestamps", %{s: _} do
      s = new!()
      {:ok, _} = DataAccess.store_events(s, Enum.map([5, 1, 4, 2, 3], &%{id: &1, timestamp: &1}))
      assert ids(DataAccess.query_by_time_range(s, 2, 4)) == [2, 3, 4]
      assert ids(DataAccess.query_by_time_range(s, 0, 9, order: :desc)) == [5, 4, 3, 2, 1]
    end

    test "by process", %{s: s, a: a, b: b} do
      assert ids(DataAccess.query_by_process(s, a)) == [1, 2, 3, 4, 5]
      assert ids(DataAccess.query_by_process(s, a, order: :desc, limit: 2)) == [5, 4]
      assert ids(DataAccess.query_by_process(s, b, limit: 3)) == [6, 7, 8]
      assert DataAccess.query_by_process(s, self()) == {:ok, []}
    end

    test "by function", %{s: s} do
      assert ids(DataAccess.query_by_function(s, Even, :low)) == [2, 4, 6, 8, 10]

      assert ids(DataAccess.query_by_function(s, Odd, :high, order: :desc)) == [
               19,
               17,
               15,
               13,
               11
             ]

      assert ids(DataAccess.query_by_function(s, Odd, :high, limit: 1)) == [11]
      assert DataAccess.query_by_function(s, Even, :none) == {:ok, []}
    end

    test "by function for %Events{} entry/exit and plain maps" do
      s = new!()
      :ok = DataAccess.store_event(s, Events.function_entry(M, :f, 0, [], event_id: 1))
      :ok = DataAccess.store_event(s, Events.function_exit(M, :f, 0, 1, :ok, 1, :normal))
      :ok = DataAccess.store_event(s, %{id: 3, module: M, function: :f})
      :ok = DataAccess.store_event(s, %{id: 4, module: M, function: :g})
      {:ok, evs} = DataAccess.query_by_function(s, M, :f)
      assert length(evs) == 3
    end

    test "by correlation", %{s: s} do
      assert ids(DataAccess.query_by_correlation(s, {:corr, 0})) == [3, 6, 9, 12, 15, 18]

      assert ids(DataAccess.query_by_correlation(s, {:corr, 1}, order: :desc, limit: 2)) ==
               [19, 16]

      assert DataAccess.query_by_correlation(s, :unknown) == {:ok, []}

      t = new!()
      :ok = DataAccess.store_event(t, %{id: 1, correlation_id: 77})
      :ok = DataAccess.store_event(t, Events.new_event(:x, nil, correlation_id: 77, event_id: 2))
      :ok = DataAccess.store_event(t, %{id: 3})
      assert length(elem(DataAccess.query_by_correlation(t, 77), 1)) == 2
      assert [%{id: 3}] = elem(DataAccess.query_by_correlation(t, nil), 1)
    end

    test "bad query arguments raise ArgumentError naming the problem", %{s: s} do
      assert_raise ArgumentError, ~r/start_time/, fn ->
        DataAccess.query_by_time_range(s, :a, 1)
      end

      assert_raise ArgumentError, ~r/end_time/, fn ->
        DataAccess.query_by_time_range(s, 1, 1.0)
      end

      assert_raise ArgumentError, ~r/pid/, fn -> DataAccess.query_by_process(s, :name) end
      assert_raise ArgumentError, ~r/module/, fn -> DataAccess.query_by_function(s, "M", :f) end
      assert_raise ArgumentError, ~r/function/, fn -> DataAccess.query_by_function(s, M, 1) end

      for {opts, msg} <- [
            {[limit: -1], ~r/:limit/},
            {[limit: :all], ~r/:limit/},
            {[order: :up], ~r/:order/},
            {[foo: 1], ~r/unknown query option/},
            {[1, 2], ~r/keyword list/},
            {%{}, ~r/keyword list/}
          ] do
        assert_raise ArgumentError, msg, fn -> DataAccess.query_by_correlation(s, 1, opts) end
        assert_raise ArgumentError, msg, fn -> DataAccess.query_by_time_range(s, 0, 1, opts) end
      end
    end
  end

  describe "bounds and cleanup" do
    test "max_events evicts the oldest; total_events never exceeds it" do
      s = new!(max_events: 100)

      for chunk <- Enum.chunk_every(1..1000, 37) do
        {:ok, _} = DataAccess.store_events(s, Enum.map(chunk, &%{id: &1, timestamp: &1}))
        assert DataAccess.get_stats(s).total_events <= 100
      end

      stats = DataAccess.get_stats(s)
      assert stats.total_events == 100
      assert stats.evicted == 900
      assert stats.oldest_timestamp == 901
      assert stats.newest_timestamp == 1000
      assert DataAccess.get_event(s, 900) == {:error, :not_found}
      assert {:ok, %{id: 901}} = DataAccess.get_event(s, 901)
      assert ids(DataAccess.query_by_time_range(s, 0, 2000, limit: 1)) == [901]
      # an evicted id can be stored again
      assert DataAccess.store_event(s, %{id: 1, timestamp: 1}) == :ok
      assert {:ok, %{id: 1}} = DataAccess.get_event(s, 1)
      assert DataAccess.get_stats(s).total_events == 100
    end

    test "cleanup_old_events/2" do
      s = new!()
      {:ok, 100} = DataAccess.store_events(s, Enum.map(1..100, &%{id: &1, timestamp: &1}))
      assert DataAccess.get_stats(s).last_cleanup == nil

      before = System.system_time(:millisecond)
      assert DataAccess.cleanup_old_events(s, 41) == {:ok, 40}
      stats = DataAccess.get_stats(s)
      assert stats.total_events == 60
      assert stats.oldest_timestamp == 41
      assert stats.expired == 40
      assert is_integer(stats.last_cleanup) and stats.last_cleanup >= before
      assert DataAccess.get_event(s, 40) == {:error, :not_found}
      assert ids(DataAccess.query_by_time_range(s, 0, 45)) == [41, 42, 43, 44, 45]

      assert DataAccess.cleanup_old_events(s, 41) == {:ok, 0}
      assert DataAccess.cleanup_old_events(s, 1 <<< 70) == {:ok, 60}
      assert DataAccess.get_stats(s).total_events == 0
      assert DataAccess.get_stats(s).oldest_timestamp == nil

      assert_raise ArgumentError, ~r/cutoff_time/, fn ->
        DataAccess.cleanup_old_events(s, DateTime.utc_now())
      end
    end

    test "get_stats/1 keys and memory" do
      s = new!(max_events: 1000)
      empty = DataAccess.get_stats(s)

      for k <- [
            :total_events,
            :max_events,
            :oldest_timestamp,
            :newest_timestamp,
            :last_cleanup,
            :memory_usage
          ],
          do: assert(Map.has_key?(empty, k))

      assert %{total_events: 0, oldest_timestamp: nil, newest_timestamp: nil} = empty
      {:ok, _} = DataAccess.store_events(s, Enum.map(1..500, &%{id: &1, blob: "0123456789"}))
      assert DataAccess.get_stats(s).memory_usage > empty.memory_usage
    end

    test "timestamps default to monotonic time" do
      s = new!()
      t0 = System.monotonic_time(:nanosecond)
      :ok = DataAccess.store_event(s, %{id: 1})
      :ok = DataAccess.store_event(s, %{id: 2, timestamp: ~U[2020-01-01 00:00:00Z]})
      t1 = System.monotonic_time(:nanosecond)
      assert ids(DataAccess.query_by_time_range(s, t0, t1)) == [1, 2]
    end
  end

  describe "cleanup_old_events/2: the original's contract" do
    # As the original's tests: FunctionExecution events with string ids
    # and monotonic nanosecond timestamps, 1 ms apart.
    setup do
      s = new!(name: :"test_#{System.unique_integer()}")
      base = System.monotonic_time(:nanosecond)

      events =
        for i <- 1..10 do
          %FunctionExecution{
            id: "cleanup-event-#{i}",
            timestamp: base + i * 1_000_000,
            wall_time: System.system_time(:nanosecond),
            module: TestModule,
            function: :cleanup_test,
            event_type: :call
          }
        end

      {:ok, 10} = DataAccess.store_events(s, events)
      %{s: s, base: base, events: events}
    end

    test "removes the events older than the cutoff, keeps the others", %{s: s, base: base} do
      assert DataAccess.cleanup_old_events(s, base + 5 * 1_000_000) == {:ok, 4}
      stats = DataAccess.get_stats(s)
      assert stats.total_events == 6
      assert stats.oldest_timestamp == base + 5 * 1_000_000
      assert DataAccess.get_event(s, "cleanup-event-4") == {:error, :not_found}
      assert {:ok, %FunctionExecution{}} = DataAccess.get_event(s, "cleanup-event-5")
    end

    test "a cutoff in the same clock before every event removes nothing", %{s: s, base: base} do
      # The clock of Utils.monotonic_timestamp/0 and of the events.
      assert ElixirScope.Utils.monotonic_timestamp() >= base
      assert DataAccess.cleanup_old_events(s, base) == {:ok, 0}
      assert DataAccess.get_stats(s).total_events == 10
    end

    test "events stored quickly: a small batch does not wait for a dirty scheduler", %{
      base: base
    } do
      # The original's test computes its cutoff as "now - 1 ms" after
      # storing events stamped 1..10 ms after `base`: it holds only if
      # storing took under 2 ms. Small writes run on the caller's scheduler,
      # so they do not wait for a dirty scheduler thread to wake up (which
      # took tens of ms on a loaded machine).
      s = new!()
      assert DataAccess.store_event(s, %{id: 1, timestamp: base}) == :ok
      assert {:ok, 32} = DataAccess.store_events(s, Enum.map(2..33, &%{id: &1, timestamp: base}))
      assert {:ok, 33} = DataAccess.store_events(s, Enum.map(34..66, &%{id: &1, timestamp: base}))
      assert DataAccess.get_stats(s).total_events == 66
    end

    test "memory_usage drops after a cleanup that removed events" do
      s = new!()
      base = System.monotonic_time(:nanosecond)

      events =
        for i <- 1..1000 do
          %FunctionExecution{
            id: "cleanup-memory-#{i}",
            timestamp: base + i,
            wall_time: System.system_time(:nanosecond),
            module: TestModule,
            function: :cleanup_memory,
            args: [i, "some argument"],
            event_type: :call
          }
        end

      {:ok, 1000} = DataAccess.store_events(s, events)
      before = DataAccess.get_stats(s)
      assert {:ok, 499} = DataAccess.cleanup_old_events(s, base + 500)
      after_cleanup = DataAccess.get_stats(s)

      assert after_cleanup.memory_usage < before.memory_usage
      assert after_cleanup.payload_bytes < before.payload_bytes
      assert after_cleanup.total_events == 501
      assert after_cleanup.reclaimed_bytes > 0 and after_cleanup.compactions == 1

      assert after_cleanup.inserted ==
               after_cleanup.total_events + after_cleanup.evicted + after_cleanup.expired +
                 after_cleanup.duplicates + after_cleanup.rejected

      # What is left reads back equal, by id and by time.
      for e <- Enum.drop(events, 499), do: assert(DataAccess.get_event(s, e.id) == {:ok, e})
      assert {:ok, left} = DataAccess.query_by_time_range(s, base, base + 2000, limit: 2000)
      assert left == Enum.drop(events, 499)

      # Removing one more event still gives memory back.
      assert {:ok, 1} = DataAccess.cleanup_old_events(s, base + 501)
      assert DataAccess.get_stats(s).memory_usage < after_cleanup.memory_usage

      # Everything: back to about an empty store's size.
      {:ok, empty} = DataAccess.new()
      assert {:ok, 500} = DataAccess.cleanup_old_events(s, base + 2000)
      stats = DataAccess.get_stats(s)
      assert stats.total_events == 0
      assert stats.memory_usage <= DataAccess.get_stats(empty).memory_usage + 64 * 1024
      # It works on.
      :ok = DataAccess.store_event(s, hd(events))
      assert DataAccess.get_event(s, hd(events).id) == {:ok, hd(events)}
    end

    test "a full store and large events take the dirty path; nothing is lost" do
      s = new!(max_events: 10)
      for i <- 1..25, do: :ok = DataAccess.store_event(s, %{id: i, timestamp: i})
      stats = DataAccess.get_stats(s)
      assert {stats.total_events, stats.evicted} == {10, 15}
      assert ids(DataAccess.query_by_time_range(s, 0, 100)) == Enum.to_list(16..25)

      big = %{id: 100, timestamp: 100, blob: :binary.copy("x", 300_000)}
      s = new!()
      assert DataAccess.store_event(s, big) == :ok
      assert DataAccess.get_event(s, 100) == {:ok, big}
    end

    test "concurrent small writers and readers: every write stored once" do
      s = new!()

      writers =
        for w <- 1..4 do
          Task.async(fn ->
            for i <- 1..500,
                do: :ok = DataAccess.store_event(s, %{id: w * 10_000 + i, timestamp: i})
          end)
        end

      readers =
        for _ <- 1..2 do
          Task.async(fn ->
            for _ <- 1..50, do: {:ok, _} = DataAccess.query_by_time_range(s, 0, 1000, limit: 5000)
          end)
        end

      Enum.each(writers ++ readers, &Task.await(&1, 60_000))
      stats = DataAccess.get_stats(s)
      assert {stats.total_events, stats.inserted, stats.duplicates} == {2000, 2000, 0}
    end
  end

  describe "destroy and bad handles" do
    test "a destroyed store" do
      s = new!()
      :ok = DataAccess.store_event(s, %{id: 1})
      assert DataAccess.destroy(s) == :ok
      assert DataAccess.destroy(s) == :ok
      assert DataAccess.store_event(s, %{id: 2}) == {:error, :destroyed}
      assert DataAccess.store_events(s, [%{id: 2}]) == {:error, :destroyed}

      for f <- [
            fn -> DataAccess.get_event(s, 1) end,
            fn -> DataAccess.get_event(s, nil) end,
            fn -> DataAccess.get_stats(s) end,
            fn -> DataAccess.query_by_time_range(s, 0, 1) end,
            fn -> DataAccess.query_by_process(s, self()) end,
            fn -> DataAccess.query_by_function(s, M, :f) end,
            fn -> DataAccess.query_by_correlation(s, 1) end,
            fn -> DataAccess.cleanup_old_events(s, 1) end
          ] do
        assert_raise ArgumentError, ~r/destroyed/, f
      end
    end

    test "a forged struct or another term is not a store" do
      fakes = [
        %DataAccess{ref: make_ref(), max_events: 1},
        %DataAccess{ref: :nope, max_events: 1},
        %DataAccess{ref: ElixirScope.RingTestHelpers.new_ring!().ref, max_events: 1}
      ]

      for fake <- fakes do
        for f <- [
              fn -> DataAccess.store_event(fake, 1) end,
              fn -> DataAccess.store_events(fake, [1]) end,
              fn -> DataAccess.get_event(fake, 1) end,
              fn -> DataAccess.get_stats(fake) end,
              fn -> DataAccess.query_by_time_range(fake, 0, 1) end,
              fn -> DataAccess.query_by_process(fake, self()) end,
              fn -> DataAccess.query_by_function(fake, M, :f) end,
              fn -> DataAccess.query_by_correlation(fake, 1) end,
              fn -> DataAccess.cleanup_old_events(fake, 1) end,
              fn -> DataAccess.destroy(fake) end
            ] do
          assert_raise ArgumentError, ~r/not a store/, f
        end
      end

      for other <- [nil, %{ref: make_ref()}, %URI{}, make_ref()] do
        assert_raise ArgumentError, ~r/DataAccess/, fn -> DataAccess.store_event(other, 1) end
        assert_raise ArgumentError, ~r/DataAccess/, fn -> DataAccess.get_stats(other) end
        assert_raise ArgumentError, ~r/DataAccess/, fn -> DataAccess.destroy(other) end
        assert_raise ArgumentError, ~r/DataAccess/, fn -> DataAccess.get_event(other, 1) end
      end
    end

    test "store_events/2 with a non-list or improper list" do
      s = new!()
      assert_raise ArgumentError, ~r/must be a list/, fn -> DataAccess.store_events(s, :x) end
      assert_raise ArgumentError, ~r/proper list/, fn -> DataAccess.store_events(s, [1 | 2]) end
      assert DataAccess.get_stats(s).total_events == 0
    end
  end

  test "concurrent writers and readers" do
    s = new!(max_events: 5_000)

    tasks =
      for w <- 0..7 do
        Task.async(fn ->
          for i <- 0..499 do
            id = w * 1000 + i
            :ok = DataAccess.store_event(s, %{id: id, timestamp: id, pid: self()})
            if rem(i, 50) == 0, do: {:ok, _} = DataAccess.query_by_process(s, self())
          end

          {:ok, mine} = DataAccess.query_by_process(s, self())
          length(mine)
        end)
      end

    assert Enum.map(tasks, &Task.await/1) == List.duplicate(500, 8)
    assert DataAccess.get_stats(s).total_events == 4_000
  end

  test "10k events: store and query" do
    s = new!(max_events: 20_000)
    me = self()

    events =
      for i <- 1..10_000 do
        %FunctionExecution{
          id: i,
          timestamp: i,
          module: M,
          function: :"f#{rem(i, 10)}",
          caller_pid: me,
          correlation_id: rem(i, 100),
          args: [i]
        }
      end

    assert DataAccess.store_events(s, events) == {:ok, 10_000}
    assert DataAccess.get_stats(s).total_events == 10_000
    assert DataAccess.get_event(s, 5_000) == {:ok, Enum.at(events, 4_999)}
    {:ok, all} = DataAccess.query_by_time_range(s, 0, 10_000, limit: 10_000)
    assert all == events
    assert length(elem(DataAccess.query_by_process(s, me, limit: 20_000), 1)) == 10_000
    assert length(elem(DataAccess.query_by_function(s, M, :f3, limit: 20_000), 1)) == 1_000
    assert ids(DataAccess.query_by_correlation(s, 42, limit: 3)) == [42, 142, 242]
    assert DataAccess.cleanup_old_events(s, 5_001) == {:ok, 5_000}
    assert DataAccess.get_stats(s).total_events == 5_000
    assert DataAccess.destroy(s) == :ok
  end
end

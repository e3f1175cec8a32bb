defmodule ElixirScope.Storage.EventStoreTest do
  use ExUnit.Case, async: true

  alias ElixirScope.Events
  alias ElixirScope.Storage.{DataAccess, EventStore}

  setup do
    {:ok, store} = EventStore.start_link(name: nil)
    %{store: store}
  end

  # The original's test event: a FunctionEntry with the keys its tests add.
  defp entry(overrides) do
    %Events.FunctionEntry{module: TestModule, function: :test_function, arity: 0, args: []}
    |> Map.merge(%{
      id: "call_#{System.unique_integer([:positive])}",
      event_type: :function_entry,
      timestamp: System.monotonic_time(:millisecond),
      pid: self(),
      correlation_id: "corr_#{System.unique_integer([:positive])}"
    })
    |> Map.merge(overrides)
  end

  describe "storing" do
    test "stores and returns the event unchanged", %{store: store} do
      e = entry(%{})
      assert :ok = EventStore.store_event(store, e)
      assert {:ok, [^e]} = EventStore.query_events(store, [])
    end

    test "concurrent writers: every event is stored", %{store: store} do
      1..50
      |> Enum.map(fn i ->
        Task.async(fn -> EventStore.store_event(store, entry(%{sequence: i, pid: self()})) end)
      end)
      |> Task.await_many(10_000)
      |> Enum.each(&assert(&1 == :ok))

      assert {:ok, events} = EventStore.query_events(store, [])
      assert events |> Enum.map(& &1.sequence) |> Enum.sort() == Enum.to_list(1..50)
    end

    test "an id already stored is kept once", %{store: store} do
      e = entry(%{})
      :ok = EventStore.store_event(store, e)
      :ok = EventStore.store_event(store, %{e | args: [:other]})
      assert {:ok, [^e]} = EventStore.query_events(store, [])
      assert EventStore.get_index_stats(store).primary_table_size == 1
    end

    test "max_events bounds the store; the oldest go first" do
      {:ok, store} = EventStore.start_link(name: nil, max_events: 10)
      for i <- 1..25, do: :ok = EventStore.store_event(store, %{id: i, timestamp: i, pid: self()})
      assert {:ok, events} = EventStore.query_events(store, [])
      assert Enum.map(events, & &1.id) == Enum.to_list(16..25)
      assert EventStore.get_index_stats(store).primary_table_size == 10
    end

    test "registers under the module name by default, as the original" do
      {:ok, pid} = EventStore.start_link()
      assert Process.whereis(EventStore) == pid
      assert {:error, {:already_started, ^pid}} = EventStore.start_link([])
      GenServer.stop(pid)
    end
  end

  describe "querying" do
    setup %{store: store} do
      pid1 = spawn(fn -> :ok end)
      pid2 = spawn(fn -> :ok end)
      t = System.monotonic_time(:millisecond)

      events = [
        entry(%{pid: pid1, event_type: :function_entry, timestamp: t}),
        entry(%{pid: pid1, event_type: :function_exit, timestamp: t + 100}),
        entry(%{pid: pid2, event_type: :function_entry, timestamp: t + 200}),
        entry(%{pid: pid2, event_type: :message_send, timestamp: t + 300}),
        entry(%{pid: pid1, event_type: :state_change, timestamp: t + 400, session_id: "s1"})
      ]

      Enum.each(events, &(:ok = EventStore.store_event(store, &1)))
      %{events: events, pid1: pid1, pid2: pid2, t: t}
    end

    test "by pid, event type, time range and limit", %{store: store, pid1: p1, pid2: p2, t: t} do
      assert {:ok, e1} = EventStore.query_events(store, pid: p1)
      assert length(e1) == 3 and Enum.all?(e1, &(&1.pid == p1))
      assert {:ok, e2} = EventStore.query_events(store, %{pid: p2})
      assert length(e2) == 2

      assert {:ok, entries} = EventStore.query_events(store, event_type: :function_entry)
      assert Enum.map(entries, & &1.pid) == [p1, p2]
      assert {:ok, [_]} = EventStore.query_events(store, event_type: :message_send)
      assert {:ok, []} = EventStore.query_events(store, event_type: :nothing)

      assert {:ok, win} = EventStore.query_events(store, since: t + 150, until: t + 350)
      assert Enum.map(win, & &1.timestamp) == [t + 200, t + 300]

      assert {:ok, win2} =
               EventStore.query_events(store, %{
                 timestamp_since: t + 150,
                 timestamp_until: t + 350
               })

      assert win2 == win
      assert {:ok, tail} = EventStore.query_events(store, since: t + 250, until: :infinity)
      assert length(tail) == 2

      assert {:ok, three} = EventStore.query_events(store, limit: 3)
      assert Enum.map(three, & &1.timestamp) == [t, t + 100, t + 200]
      assert {:ok, []} = EventStore.query_events(store, limit: 0)
    end

    test "filters combine", %{store: store, pid1: p1, t: t} do
      assert {:ok, [e]} =
               EventStore.query_events(store,
                 pid: p1,
                 event_type: :function_entry,
                 since: t - 100,
                 until: t + 100
               )

      assert e.pid == p1 and e.event_type == :function_entry
    end

    test "order: :desc gives the newest first; other keys filter by field", %{store: store, t: t} do
      assert {:ok, [a, b]} = EventStore.query_events(store, order: :desc, limit: 2)
      assert {a.timestamp, b.timestamp} == {t + 400, t + 300}
      assert {:ok, [s]} = EventStore.query_events(store, %{session_id: "s1", order: :asc})
      assert s.event_type == :state_change
      assert {:ok, []} = EventStore.query_events(store, session_id: "other")
    end

    test "index sizes are exact", %{store: store} do
      :ok = EventStore.store_event(store, %{id: :plain, timestamp: 1})

      :ok =
        EventStore.store_event(store, %{id: :ast, timestamp: 2, ast_node_id: "n1", pid: self()})

      assert EventStore.get_index_stats(store) == %{
               primary_table_size: 7,
               temporal_index_size: 7,
               process_index_size: 6,
               # 5 function entries naming module and function, 5 typed events
               function_index_size: 10,
               event_type_index_size: 5,
               ast_index_size: 1
             }
    end

    test "get_events_via_data_access/1 and data_access/1", %{store: store, events: events} do
      assert {:ok, ^events} = EventStore.get_events_via_data_access(store)
      s = EventStore.data_access(store)
      assert {:ok, [_, _]} = DataAccess.query_by_event_type(s, :function_entry)
    end
  end

  describe "bad input" do
    test "bad filters and options raise ArgumentError", %{store: store} do
      for f <- [
            [pid: :nope],
            [limit: -1],
            [limit: :all],
            [since: "x"],
            [until: 1.5],
            [order: :up],
            [{"k", 1}],
            :x,
            42
          ] do
        assert_raise ArgumentError, fn -> EventStore.query_events(store, f) end
      end

      for o <- [[max_events: 0], [max_events: :x], [name: "s"], [bogus: 1], :x] do
        assert_raise ArgumentError, fn -> EventStore.start_link(o) end
      end
    end

    test "any term is stored", %{store: store} do
      for t <- [:atom, {:tuple}, "bin", 1, [1, 2], %{}] do
        assert :ok = EventStore.store_event(store, t)
      end

      assert {:ok, all} = EventStore.query_events(store, [])
      assert length(all) == 6
    end

    test "an event too large is refused", %{store: store} do
      big = %{id: 1, blob: :binary.copy(<<1>>, 2_000_000)}
      assert {:error, :event_too_large} = EventStore.store_event(store, big)
      assert {:ok, []} = EventStore.query_events(store, [])
    end
  end
end

defmodule ElixirScope.EventStoreTest do
  # The shared store is node-wide.
  use ExUnit.Case, async: false

  alias ElixirScope.EventStore

  test "stores component events in the shared store and queries them" do
    {:ok, pid} = EventStore.get_or_create_event_store()
    assert {:ok, ^pid} = EventStore.get_or_create_event_store()
    assert Process.whereis(EventStore) == pid
    tag = :"type_#{System.unique_integer([:positive])}"
    t0 = System.monotonic_time(:nanosecond)
    assert :ok = EventStore.store_event(:file_watcher, tag, %{files: 3})
    assert :ok = EventStore.store_event(:other, tag, %{files: 4})

    assert {:ok, [a, b]} = EventStore.query_events(event_type: tag)
    assert %{component: :file_watcher, event_type: ^tag, data: %{files: 3}} = a
    assert a.pid == self() and b.component == :other
    assert is_integer(a.timestamp) and a.timestamp >= t0 and a.timestamp <= b.timestamp
    assert %DateTime{} = a.wall_time

    assert {:ok, [^b]} = EventStore.query_events(%{event_type: tag, component: :other})
    assert {:ok, [^a, ^b]} = EventStore.query_events(since: t0, event_type: tag)
    stats = EventStore.get_stats()
    assert stats.primary_table_size >= 2 and stats.event_type_index_size >= 2
  end

  test "the shared store outlives the process that started it" do
    task = Task.async(fn -> EventStore.get_or_create_event_store() end)
    {:ok, pid} = Task.await(task)
    refute Process.alive?(task.pid)
    assert Process.alive?(pid)
    assert {:ok, ^pid} = EventStore.get_or_create_event_store()
  end

  test "bad arguments raise ArgumentError" do
    assert_raise ArgumentError, fn -> EventStore.store_event("c", :t, 1) end
    assert_raise ArgumentError, fn -> EventStore.store_event(:c, "t", 1) end
    assert_raise ArgumentError, fn -> EventStore.query_events(pid: 1) end
  end
end

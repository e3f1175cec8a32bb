defmodule ElixirScope.Capture.TemporalStorageTest do
  use ExUnit.Case, async: true

  alias ElixirScope.Capture.TemporalStorage
  alias ElixirScope.Storage.DataAccess

  setup do
    {:ok, storage} = TemporalStorage.start_link()
    %{storage: storage}
  end

  defp ev(ts, ast, corr, data \\ %{}),
    do: %{timestamp: ts, ast_node_id: ast, correlation_id: corr, data: data}

  test "stores the normalized form and returns it by time, AST node and correlation", %{
    storage: s
  } do
    :ok = TemporalStorage.store_event(s, ev(3000, "node2", "corr1", %{step: 3}))
    :ok = TemporalStorage.store_event(s, ev(1000, "node1", "corr1", %{step: 1}))
    :ok = TemporalStorage.store_event(s, ev(2000, "node1", "corr2", %{step: 2}))

    assert {:ok, [a, b]} = TemporalStorage.get_events_in_range(s, 1000, 2000)
    assert %{timestamp: 1000, ast_node_id: "node1", correlation_id: "corr1", data: %{step: 1}} = a
    assert is_integer(a.event_id) and a.event_id != b.event_id

    assert Map.keys(a) |> Enum.sort() == [
             :ast_node_id,
             :correlation_id,
             :data,
             :event_id,
             :timestamp
           ]

    assert b.timestamp == 2000

    assert {:ok, n1} = TemporalStorage.get_events_for_ast_node(s, "node1")
    assert Enum.map(n1, & &1.data.step) == [1, 2]
    assert {:ok, []} = TemporalStorage.get_events_for_ast_node(s, "nope")
    assert {:ok, c1} = TemporalStorage.get_events_for_correlation(s, "corr1")
    assert Enum.map(c1, & &1.data.step) == [1, 3]
    assert {:ok, all} = TemporalStorage.get_all_events(s)
    assert Enum.map(all, & &1.timestamp) == [1000, 2000, 3000]
  end

  test "an event without :data is kept whole; without :timestamp it gets one", %{storage: s} do
    t0 = ElixirScope.Utils.monotonic_timestamp()
    :ok = TemporalStorage.store_event(s, %{kind: :bare})
    assert {:ok, [e]} = TemporalStorage.get_all_events(s)
    assert e.data == %{kind: :bare} and e.ast_node_id == nil and e.timestamp >= t0
  end

  test "stats are exact, and max_events bounds the storage" do
    {:ok, s} =
      TemporalStorage.start_link(
        max_events: 10,
        name: :"ts_#{System.unique_integer([:positive])}"
      )

    for i <- 1..25,
        do: :ok = TemporalStorage.store_event(s, ev(i, if(rem(i, 2) == 0, do: "even"), i))

    assert {:ok, st} = TemporalStorage.get_stats(s)
    assert %{total_events: 10, oldest_event: 16, newest_event: 25, events_table_size: 10} = st
    assert %{ast_index_size: 5, evicted: 15, stored: 25, max_events: 10} = st
    assert is_integer(st.created_at) and st.memory_usage > 0
    assert {:ok, evens} = TemporalStorage.get_events_for_ast_node(s, "even")
    assert Enum.map(evens, & &1.timestamp) == [16, 18, 20, 22, 24]
  end

  test "store_events/2 stores a batch in order", %{storage: s} do
    assert {:ok, 3} =
             TemporalStorage.store_events(s, [ev(5, "a", 1), ev(5, "b", 1), ev(4, "c", 1)])

    assert {:ok, es} = TemporalStorage.get_events_for_correlation(s, 1)
    assert Enum.map(es, & &1.ast_node_id) == ["c", "a", "b"]
    assert %DataAccess{max_events: 100_000} = TemporalStorage.data_access(s)
  end

  test "bad input raises ArgumentError", %{storage: s} do
    assert_raise ArgumentError, fn -> TemporalStorage.store_event(s, :not_a_map) end
    assert_raise ArgumentError, fn -> TemporalStorage.store_event(s, %{timestamp: "soon"}) end
    assert_raise ArgumentError, fn -> TemporalStorage.store_events(s, [%{}, 1]) end
    assert_raise ArgumentError, fn -> TemporalStorage.get_events_in_range(s, :a, 1) end
    assert_raise ArgumentError, fn -> TemporalStorage.get_all_events(:not_running) end
    assert_raise ArgumentError, fn -> TemporalStorage.get_stats(self()) end
    assert_raise ArgumentError, fn -> TemporalStorage.start_link(max_events: 0) end
    assert_raise ArgumentError, fn -> TemporalStorage.start_link(bogus: 1) end

    assert {:error, :event_too_large} =
             TemporalStorage.store_event(s, %{data: :binary.copy(<<1>>, 2_000_000)})
  end
end

defmodule ElixirScope.Query.EngineTest do
  use ExUnit.Case, async: true

  alias ElixirScope.Query.Engine
  alias ElixirScope.Storage.EventStore

  setup do
    {:ok, store} = EventStore.start_link(name: nil)
    t = 1_000_000
    p1 = spawn(fn -> :ok end)
    p2 = spawn(fn -> :ok end)

    for {pid, type, dt, i} <- [
          {p1, :function_entry, 0, 1},
          {p1, :function_exit, 100, 2},
          {p2, :function_entry, 200, 3},
          {p2, :message_send, 300, 4},
          {p1, :state_change, 400, 5}
        ] do
      :ok = EventStore.store_event(store, %{id: i, pid: pid, event_type: type, timestamp: t + dt})
    end

    %{store: store, p1: p1, p2: p2, t: t}
  end

  describe "analyze_query/1 (the original's static analysis)" do
    test "index choice and relative costs" do
      assert %Engine{index_type: :temporal, estimated_cost: c1} =
               Engine.analyze_query(since: 1, until: 2)

      assert %Engine{index_type: :process, estimated_cost: c2} = Engine.analyze_query(pid: self())

      assert %Engine{index_type: :event_type, estimated_cost: c3} =
               Engine.analyze_query(event_type: :x)

      assert %Engine{index_type: :ast_node} = Engine.analyze_query(ast_node_id: "n")
      assert %Engine{index_type: :full_scan, estimated_cost: c4} = Engine.analyze_query(custom: 1)
      assert c2 < c3 and c3 < c1 and c1 < c4
    end

    test "post-filters and suggestions" do
      s = Engine.analyze_query(pid: self(), event_type: :x, since: 1, until: 2)
      assert s.index_type == :process
      assert s.post_filters == [:event_type, :temporal]

      assert s.optimization_suggestions == [
               "Consider adding a limit to reduce memory usage and improve response time"
             ]

      assert Engine.get_optimization_suggestions(nil, pid: self(), limit: 1) == [
               "Query is already well optimized"
             ]

      assert Enum.any?(
               Engine.get_optimization_suggestions(nil, event_type: :x, limit: 5),
               &(&1 =~ "pid filter")
             )

      assert Enum.any?(
               Engine.get_optimization_suggestions(nil, since: 0, until: 4_000_000, limit: 1),
               &(&1 =~ "narrowing")
             )
    end
  end

  describe "the planner's analysis" do
    test "analyze_query/2 and estimate_query_cost/2 count stored events", %{store: store, p1: p1} do
      assert %Engine{index_type: :process, estimated_cost: 3} =
               Engine.analyze_query(store, pid: p1)

      assert %Engine{index_type: :event_type, estimated_cost: 2} =
               Engine.analyze_query(store, event_type: :function_entry)

      assert %Engine{index_type: :full_scan, estimated_cost: 5} = Engine.analyze_query(store, [])
      narrow = Engine.estimate_query_cost(store, pid: self())
      broad = Engine.estimate_query_cost(store, event_type: :function_entry)
      all = Engine.estimate_query_cost(store, [])
      assert {narrow, broad, all} == {0, 2, 5}
      # Not a running store: the static cost.
      assert Engine.estimate_query_cost(:nobody, pid: self()) == 25
    end
  end

  describe "execution" do
    test "execute_query/2 filters, combines and orders", %{store: store, p1: p1, t: t} do
      assert {:ok, r} = Engine.execute_query(store, pid: p1, limit: 10)
      assert length(r) == 3 and Enum.all?(r, &(&1.pid == p1))

      assert {:ok, [e]} =
               Engine.execute_query(store,
                 pid: p1,
                 event_type: :function_entry,
                 since: t - 100,
                 until: t + 500
               )

      assert e.id == 1
      assert {:ok, []} = Engine.execute_query(store, pid: spawn(fn -> :ok end))
      assert {:ok, r} = Engine.execute_query(store, limit: 10)
      assert Enum.map(r, & &1.timestamp) == Enum.sort(Enum.map(r, & &1.timestamp))
    end

    test "execute_query_with_metrics/2 reports the plan used", %{store: store, p1: p1} do
      assert {:ok, r, m} = Engine.execute_query_with_metrics(store, event_type: :function_entry)

      assert %{
               index_used: :event_type,
               events_scanned: 2,
               events_returned: 2,
               filter_efficiency: 1.0
             } = m

      assert length(r) == 2 and is_integer(m.execution_time_us) and m.execution_time_us >= 0
      refute Map.has_key?(m, :optimization_suggestions)

      assert {:ok, _, %{index_used: :process, events_scanned: 3}} =
               Engine.execute_query_with_metrics(store, pid: p1)

      assert {:ok, [], m} = Engine.execute_query_with_metrics(store, custom_attribute: :v)
      assert %{index_used: :full_scan, events_scanned: 5, filter_efficiency: 0.0} = m
      assert [_ | _] = m.optimization_suggestions
    end

    test "invalid queries and unavailable stores are errors", %{store: store} do
      for {q, reason} <- [
            {[pid: "not_a_pid"], :invalid_pid},
            {[limit: -1], :invalid_limit},
            {[limit: :all], :invalid_limit},
            {[since: "invalid"], :invalid_timestamp}
          ] do
        assert {:error, ^reason} = Engine.execute_query(store, q)
        assert {:error, ^reason} = Engine.execute_query(:invalid_store, q)
      end

      assert {:error, :store_unavailable} =
               Engine.execute_query(:non_existent_store, event_type: :x)

      assert {:error, :store_unavailable} = Engine.execute_query_with_metrics(self(), [])
      assert {:error, :invalid_query} = Engine.execute_query(store, order: :sideways)
      assert_raise ArgumentError, fn -> Engine.analyze_query(:nope) end
      assert_raise ArgumentError, fn -> Engine.analyze_query(store, [1]) end
    end
  end
end

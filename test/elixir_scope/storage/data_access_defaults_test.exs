defmodule ElixirScope.Storage.DataAccessDefaultsTest do
  # The default store and the instrumentation plan are node-wide.
  use ExUnit.Case, async: false

  alias ElixirScope.Events
  alias ElixirScope.Storage.{DataAccess, QueryCoordinator}

  describe "default storage (the original's one-argument functions)" do
    test "store_events/1, event_exists?/1 and get_events_since/1 share one store" do
      t0 = System.monotonic_time(:nanosecond)
      id = System.unique_integer([:positive])
      events = for i <- 0..2, do: %{id: id + i, timestamp: t0 + i, pid: self()}
      assert :ok = DataAccess.store_events(events)
      assert DataAccess.event_exists?(id)
      assert DataAccess.event_exists?(id + 2)
      refute DataAccess.event_exists?({:never, id})

      since = DataAccess.get_events_since(t0)
      assert Enum.take(since, 3) == events
      # Events stamped after "now" are not "since" anything yet.
      :ok = DataAccess.store_events([%{id: {:future, id}, timestamp: t0 + 3_600_000_000_000}])
      refute Enum.any?(DataAccess.get_events_since(t0), &(&1.id == {:future, id}))

      assert {:ok, %DataAccess{name: :elixir_scope_default}} = DataAccess.default_storage()
    end

    test "concurrent first calls create one store" do
      stores =
        1..8
        |> Enum.map(fn _ -> Task.async(&DataAccess.default_storage/0) end)
        |> Task.await_many()

      assert stores |> Enum.uniq() |> length() == 1
    end

    test "store_events/1 reports a refused event" do
      big = %{id: {:big, System.unique_integer()}, blob: :binary.copy(<<0>>, 2_000_000)}
      assert {:error, :event_too_large} = DataAccess.store_events([big])
      refute DataAccess.event_exists?(big.id)
    end

    test "the instrumentation plan round-trips and is replaced" do
      previous = DataAccess.get_instrumentation_plan()

      on_exit(fn ->
        case previous do
          {:ok, p} -> DataAccess.store_instrumentation_plan(p)
          {:error, :not_found} -> :persistent_term.erase({DataAccess, :instrumentation_plan})
        end
      end)

      :persistent_term.erase({DataAccess, :instrumentation_plan})
      assert {:error, :not_found} = DataAccess.get_instrumentation_plan()
      plan = %{modules: %{MyApp => %{level: :full}}, version: 1}
      assert :ok = DataAccess.store_instrumentation_plan(plan)
      assert {:ok, ^plan} = DataAccess.get_instrumentation_plan()
      assert :ok = DataAccess.store_instrumentation_plan(nil)
      assert {:ok, nil} = DataAccess.get_instrumentation_plan()
    end

    test "bad arguments raise ArgumentError" do
      assert_raise ArgumentError, fn -> DataAccess.get_events_since(:yesterday) end
      assert_raise ArgumentError, fn -> DataAccess.store_events(:not_a_list) end
      assert_raise ArgumentError, fn -> DataAccess.store_events([1 | 2]) end
    end
  end

  describe "event-type and AST-node indexes" do
    setup do
      {:ok, s} = DataAccess.new(max_events: 50)
      %{s: s}
    end

    test "maps and structs are found by :event_type and :ast_node_id", %{s: s} do
      e1 = %{id: 1, timestamp: 1, event_type: :function_entry, ast_node_id: "def_1"}
      e2 = %{id: 2, timestamp: 2, event_type: :function_exit, ast_node_id: "def_1"}
      e3 = %{id: 3, timestamp: 3, event_type: :function_entry}
      e4 = Events.new_event(:custom, %{a: 1}, event_id: 4, timestamp: 4)
      {:ok, 4} = DataAccess.store_events(s, [e1, e2, e3, e4])

      assert {:ok, [^e1, ^e3]} = DataAccess.query_by_event_type(s, :function_entry)
      assert {:ok, [^e3, ^e1]} = DataAccess.query_by_event_type(s, :function_entry, order: :desc)
      assert {:ok, [^e1]} = DataAccess.query_by_event_type(s, :function_entry, limit: 1)
      assert {:ok, [^e4]} = DataAccess.query_by_event_type(s, :custom)
      assert {:ok, [^e1, ^e2]} = DataAccess.query_by_ast_node(s, "def_1")
      assert {:ok, []} = DataAccess.query_by_ast_node(s, "def_2")
      assert {:ok, []} = DataAccess.query_by_ast_node(s, nil)

      assert DataAccess.index_sizes(s) == %{
               total: 4,
               with_pid: 1,
               with_function: 0,
               event_type: 4,
               ast_node: 2
             }
    end

    test "evicted events leave the indexes and their counts", %{s: s} do
      for i <- 1..120 do
        :ok =
          DataAccess.store_event(s, %{
            id: i,
            timestamp: i,
            event_type: rem(i, 3),
            ast_node_id: rem(i, 2)
          })
      end

      assert {:ok, zeros} = DataAccess.query_by_event_type(s, 0, limit: 1000)
      assert Enum.map(zeros, & &1.id) == for(i <- 71..120, rem(i, 3) == 0, do: i)
      assert {:ok, odd} = DataAccess.query_by_ast_node(s, 1, limit: 1000)
      assert length(odd) == 25
      assert %{total: 50, event_type: 50, ast_node: 50} = DataAccess.index_sizes(s)
      {:ok, n} = DataAccess.cleanup_old_events(s, 101)
      assert n == 30
      assert %{total: 20, event_type: 20, ast_node: 20, with_pid: 0} = DataAccess.index_sizes(s)
    end

    test "the planner walks them", %{s: s} do
      for i <- 1..50 do
        type = if i == 7, do: :rare, else: :common
        :ok = DataAccess.store_event(s, %{id: i, timestamp: i, pid: self(), event_type: type})
      end

      assert {:ok, %{events: [%{id: 7}], plan: :event_type, estimate: 1}} =
               QueryCoordinator.query(s, event_type: :rare, as: :event)

      assert {:ok, %{events: [%{id: 7}], plan: :event_type}} =
               QueryCoordinator.query(s, event_type: :rare, pid: self(), from: 0, as: :event)

      assert {:ok, %{events: [], plan: :ast_node}} =
               QueryCoordinator.query(s, ast_node_id: "none", as: :event)
    end
  end
end

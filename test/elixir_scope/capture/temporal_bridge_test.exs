defmodule ElixirScope.Capture.TemporalBridgeTest do
  use ExUnit.Case, async: true

  alias ElixirScope.Capture.{TemporalBridge, TemporalStorage}

  setup do
    {:ok, bridge} = TemporalBridge.start_link(flush_interval: 60_000)
    %{bridge: bridge}
  end

  defp entry(ts, m, f, corr, ast),
    do: %{
      timestamp: ts,
      event_type: :function_entry,
      correlation_id: corr,
      ast_node_id: ast,
      data: %{module: m, function: f}
    }

  defp exit_(ts, corr, ast),
    do: %{
      timestamp: ts,
      event_type: :function_exit,
      correlation_id: corr,
      ast_node_id: ast,
      data: %{}
    }

  test "correlated events are stamped and visible to the next query", %{bridge: b} do
    :ok = TemporalBridge.correlate_event(b, entry(100, MyMod, :run, "c1", "def_run"))
    # No flush: the query writes the buffer first.
    assert {:ok, [e]} = TemporalBridge.get_events_in_range(b, 0, 1000)
    assert %{timestamp: 100, correlation_id: "c1", ast_node_id: "def_run"} = e
    assert %{event_type: :function_entry, temporal_correlation: true, bridge_id: id} = e.data
    assert is_integer(id) and is_integer(e.data.bridge_timestamp)
    assert {:ok, [^e]} = TemporalBridge.get_events_for_ast_node(b, "def_run")
    assert {:ok, [^e]} = TemporalBridge.get_events_for_correlation(b, "c1")
  end

  test "the buffer is written in arrival order when full, and counted" do
    {:ok, b} = TemporalBridge.start_link(buffer_size: 3, flush_interval: 60_000)
    for i <- 1..7, do: :ok = TemporalBridge.correlate_event(b, %{timestamp: 5, seq: i})
    assert {:ok, st} = TemporalBridge.get_stats(b)
    assert %{events_processed: 7, events_stored: 6, events_buffered: 1, buffer_flushes: 2} = st
    assert st.temporal_storage.total_events == 6
    :ok = TemporalBridge.flush_buffer(b)
    assert {:ok, es} = TemporalBridge.get_events_in_range(b, 5, 5)
    assert Enum.map(es, & &1.data.seq) == Enum.to_list(1..7)

    assert {:ok, %{events_stored: 7, store_errors: 0, events_buffered: 0}} =
             TemporalBridge.get_stats(b)
  end

  test "the flush interval writes the buffer on its own" do
    {:ok, b} = TemporalBridge.start_link(flush_interval: 10)
    :ok = TemporalBridge.correlate_event(b, %{timestamp: 1})
    # get_stats/1 does not write the buffer: only the timer does.
    assert Enum.any?(1..500, fn _ ->
             Process.sleep(10)
             match?({:ok, %{events_stored: 1, events_buffered: 0}}, TemporalBridge.get_stats(b))
           end)
  end

  test "an event too large is counted, the others stored" do
    {:ok, b} = TemporalBridge.start_link(flush_interval: 60_000)
    :ok = TemporalBridge.correlate_event(b, %{timestamp: 1, n: 1})
    :ok = TemporalBridge.correlate_event(b, %{timestamp: 2, blob: :binary.copy(<<1>>, 2_000_000)})
    :ok = TemporalBridge.correlate_event(b, %{timestamp: 3, n: 3})
    assert {:ok, es} = TemporalBridge.get_events_in_range(b, 0, 10)
    assert Enum.map(es, & &1.timestamp) == [1, 3]

    assert {:ok, %{events_processed: 3, events_stored: 2, store_errors: 1}} =
             TemporalBridge.get_stats(b)
  end

  test "reconstruct_state_at/2 replays entries, exits, variables and state", %{bridge: b} do
    for e <- [
          entry(10, A, :outer, "c1", "n1"),
          entry(20, B, :inner, "c2", "n2"),
          exit_(30, "c2", "n2"),
          %{timestamp: 40, event_type: :local_variable_snapshot, data: %{variables: %{x: 1}}},
          %{timestamp: 50, event_type: :state_change, data: %{state: %{count: 2}}},
          exit_(60, "c1", "n1")
        ],
        do: :ok = TemporalBridge.correlate_event(b, e)

    assert {:ok, at25} = TemporalBridge.reconstruct_state_at(b, 25)

    assert %{
             "Elixir.A.outer" => %{status: :active},
             "Elixir.B.inner" => %{status: :active, entry_time: 20}
           } = at25

    assert {:ok, at45} = TemporalBridge.reconstruct_state_at(b, 45)
    # Only the exiting function completes (the original completed both).
    assert at45["Elixir.A.outer"].status == :active
    assert %{status: :completed, exit_time: 30} = at45["Elixir.B.inner"]
    assert at45.x == 1

    assert {:ok, at99} = TemporalBridge.reconstruct_state_at(b, 99)
    assert %{status: :completed, exit_time: 60} = at99["Elixir.A.outer"]
    assert at99.count == 2
    assert {:ok, %{}} = TemporalBridge.reconstruct_state_at(b, 5)
  end

  test "trace_execution_path/2 and get_active_ast_nodes/3", %{bridge: b} do
    for e <- [
          entry(10, A, :f, "c1", "n1"),
          entry(20, A, :g, "c2", "n2"),
          exit_(30, "c1", "n1"),
          entry(40, A, :h, "c3", "n3")
        ],
        do: :ok = TemporalBridge.correlate_event(b, e)

    assert {:ok, path} = TemporalBridge.trace_execution_path(b, %{correlation_id: "c1"})
    assert Enum.map(path, & &1.timestamp) == [10, 30]
    assert {:error, :no_correlation_id} = TemporalBridge.trace_execution_path(b, %{})
    assert {:ok, ["n1", "n2"]} = TemporalBridge.get_active_ast_nodes(b, 0, 30)
    assert {:ok, ["n3"]} = TemporalBridge.get_active_ast_nodes(b, 35, 50)
  end

  test "a given storage is used, and handler registration", %{bridge: _} do
    {:ok, s} = TemporalStorage.start_link()
    {:ok, b} = TemporalBridge.start_link(temporal_storage: s, flush_interval: 60_000)
    :ok = TemporalBridge.correlate_event(b, %{timestamp: 7})
    :ok = TemporalBridge.flush_buffer(b)
    assert {:ok, [%{timestamp: 7}]} = TemporalStorage.get_all_events(s)

    assert :ok = TemporalBridge.register_as_handler(b)
    assert {:ok, ^b} = TemporalBridge.get_registered_bridge()
    assert :ok = TemporalBridge.unregister_handler()
    assert {:error, :not_registered} = TemporalBridge.get_registered_bridge()
  end

  test "bad input raises ArgumentError", %{bridge: b} do
    assert_raise ArgumentError, fn -> TemporalBridge.correlate_event(b, :x) end
    assert_raise ArgumentError, fn -> TemporalBridge.correlate_event(:nobody, %{}) end
    assert_raise ArgumentError, fn -> TemporalBridge.reconstruct_state_at(b, 1.5) end
    assert_raise ArgumentError, fn -> TemporalBridge.trace_execution_path(b, [1]) end
    assert_raise ArgumentError, fn -> TemporalBridge.get_events_in_range(b, 0, :later) end
    assert_raise ArgumentError, fn -> TemporalBridge.register_as_handler(self()) end
    assert_raise ArgumentError, fn -> TemporalBridge.start_link(buffer_size: 0) end
    assert_raise ArgumentError, fn -> TemporalBridge.start_link(temporal_storage: :nobody) end
  end
end

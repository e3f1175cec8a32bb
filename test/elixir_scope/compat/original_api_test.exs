defmodule ElixirScope.Compat.OriginalApiTest do
  # Code written as a user of the original pure-Elixir ElixirScope would
  # write it, against its EventStore, Storage.EventStore, TemporalStorage,
  # TemporalBridge, Query.Engine and Events structs: it must run unchanged
  # here, except for the fixes the README's "Differences from the original
  # ElixirScope" lists (each use of one is marked "documented fix").
  # Not async: ElixirScope.EventStore and the bridge handler are node-wide.
  use ExUnit.Case, async: false

  alias ElixirScope.Capture.{TemporalBridge, TemporalStorage}
  alias ElixirScope.Events
  alias ElixirScope.Query.Engine
  alias ElixirScope.Storage.EventStore

  defp unique(tag), do: :"#{tag}_#{System.unique_integer([:positive])}"

  describe "ElixirScope.EventStore (the components' 3-argument API)" do
    test "store, query, stats" do
      {:ok, store} = ElixirScope.EventStore.get_or_create_event_store()
      assert is_pid(store)
      assert {:ok, ^store} = ElixirScope.EventStore.get_or_create_event_store()

      type = unique(:file_changed)
      :ok = ElixirScope.EventStore.store_event(:file_watcher, type, %{path: "lib/a.ex"})
      :ok = ElixirScope.EventStore.store_event(:compiler, type, %{path: "lib/b.ex"})

      {:ok, events} = ElixirScope.EventStore.query_events(event_type: type)
      assert Enum.map(events, & &1.component) == [:file_watcher, :compiler]
      assert Enum.map(events, & &1.data.path) == ["lib/a.ex", "lib/b.ex"]
      assert Enum.all?(events, &(&1.pid == self() and &1.event_type == type))
      # documented fix: timestamp is monotonic ns (so time filters work);
      # the original's DateTime is wall_time.
      assert Enum.all?(events, &match?(%DateTime{}, &1.wall_time))

      {:ok, [only]} = ElixirScope.EventStore.query_events(event_type: type, limit: 1)
      assert only.component == :file_watcher

      stats = ElixirScope.EventStore.get_stats()

      for k <-
            [:temporal_index_size, :process_index_size, :function_index_size] ++
              [:primary_table_size],
          do: assert(is_integer(stats[k]), "missing #{k}")
    end
  end

  describe "ElixirScope.Storage.EventStore" do
    setup do
      name = unique(:my_event_store)
      {:ok, store} = EventStore.start_link(name: name)
      on_exit(fn -> if Process.alive?(store), do: GenServer.stop(store) end)
      %{store: store, name: name}
    end

    test "its struct, start_link/0,1, and the registered name", %{store: store, name: name} do
      assert Process.whereis(name) == store

      original = [:name, :primary_table, :temporal_index, :process_index, :function_index]
      assert (original ++ [:event_counter]) -- Map.keys(%EventStore{}) == []

      # start_link/0 registers under the module's name, as the original.
      {:ok, default} = EventStore.start_link()
      assert Process.whereis(EventStore) == default
      GenServer.stop(default)
    end

    test "store_event/2, query_events/2 with its filter keys", %{store: store, name: name} do
      base = System.monotonic_time(:nanosecond)
      p1 = spawn(fn -> :ok end)
      p2 = spawn(fn -> :ok end)

      events = [
        %{pid: p1, event_type: :function_entry, timestamp: base, module: M, function: :f},
        %{pid: p1, event_type: :function_exit, timestamp: base + 100, module: M, function: :f},
        %{pid: p2, event_type: :function_entry, timestamp: base + 200, module: N, function: :g},
        %{pid: p2, event_type: :message_send, timestamp: base + 300},
        %{pid: p1, event_type: :state_change, timestamp: base + 400}
      ]

      Enum.each(events, fn e -> :ok = EventStore.store_event(store, e) end)

      # By name, as the original's callers did.
      {:ok, all} = EventStore.query_events(name, [])
      assert length(all) == 5

      {:ok, mine} = EventStore.query_events(store, pid: p1)
      assert Enum.map(mine, & &1.event_type) == [:function_entry, :function_exit, :state_change]

      {:ok, window} = EventStore.query_events(store, since: base + 100, until: base + 300)
      assert Enum.map(window, & &1.timestamp) == [base + 100, base + 200, base + 300]

      # Map filters and the timestamp_* spelling.
      {:ok, later} = EventStore.query_events(store, %{timestamp_since: base + 300})
      assert Enum.map(later, & &1.timestamp) == [base + 300, base + 400]

      {:ok, entries} = EventStore.query_events(store, event_type: :function_entry)
      assert Enum.map(entries, & &1.pid) == [p1, p2]

      {:ok, two} = EventStore.query_events(store, limit: 2)
      assert length(two) == 2

      {:ok, combined} =
        EventStore.query_events(store, pid: p2, event_type: :function_entry, since: base)

      assert [%{function: :g}] = combined

      stats = EventStore.get_index_stats(store)
      assert stats.primary_table_size == 5
      assert stats.temporal_index_size == 5
      assert stats.process_index_size == 5
      assert is_integer(stats.function_index_size)

      {:ok, via} = EventStore.get_events_via_data_access(store)
      assert Enum.sort_by(via, & &1.timestamp) == Enum.sort_by(events, & &1.timestamp)
    end
  end

  describe "ElixirScope.Capture.TemporalStorage" do
    test "the original's Cinema Debugger storage flow" do
      {:ok, storage} = TemporalStorage.start_link()
      {:ok, _named} = TemporalStorage.start_link(name: unique(:my_storage))

      for {ts, node, corr} <-
            [{1500, "def_1", "exec_1"}, {1000, "def_2", "exec_1"}] ++
              [{2500, "def_1", "exec_2"}] do
        :ok =
          TemporalStorage.store_event(storage, %{
            timestamp: ts,
            ast_node_id: node,
            correlation_id: corr,
            data: %{value: ts}
          })
      end

      {:ok, in_range} = TemporalStorage.get_events_in_range(storage, 1000, 2000)
      assert Enum.map(in_range, & &1.timestamp) == [1000, 1500]

      {:ok, node_events} = TemporalStorage.get_events_for_ast_node(storage, "def_1")
      assert Enum.map(node_events, & &1.timestamp) == [1500, 2500]

      {:ok, corr_events} = TemporalStorage.get_events_for_correlation(storage, "exec_1")
      assert Enum.map(corr_events, & &1.timestamp) == [1000, 1500]

      {:ok, all} = TemporalStorage.get_all_events(storage)
      assert Enum.map(all, & &1.timestamp) == [1000, 1500, 2500]
      assert Enum.all?(all, &(Map.has_key?(&1, :event_id) and is_map(&1.data)))

      {:ok, stats} = TemporalStorage.get_stats(storage)
      assert stats.total_events == 3
      assert stats.events_table_size == 3
      assert is_integer(stats.ast_index_size) and is_integer(stats.memory_usage)
    end
  end

  describe "ElixirScope.Capture.TemporalBridge" do
    test "correlate, flush, query, reconstruct, trace a path, register" do
      {:ok, bridge} = TemporalBridge.start_link(buffer_size: 10, flush_interval: 50)

      :ok =
        TemporalBridge.correlate_event(bridge, %{
          timestamp: 1000,
          correlation_id: "exec_1",
          ast_node_id: "def_run",
          event_type: :function_entry,
          data: %{module: MyApp.Worker, function: :run}
        })

      :ok =
        TemporalBridge.correlate_event(bridge, %{
          timestamp: 1100,
          correlation_id: "exec_1",
          ast_node_id: "assign_x",
          event_type: :local_variable_snapshot,
          data: %{variables: %{x: 42}}
        })

      :ok =
        TemporalBridge.correlate_event(bridge, %{
          timestamp: 1200,
          correlation_id: "exec_1",
          ast_node_id: "def_run",
          event_type: :function_exit,
          data: %{}
        })

      :ok = TemporalBridge.flush_buffer(bridge)

      {:ok, events} = TemporalBridge.get_events_in_range(bridge, 0, 2000)
      assert length(events) == 3

      {:ok, state} = TemporalBridge.reconstruct_state_at(bridge, 1150)
      assert state["Elixir.MyApp.Worker.run"].status == :active
      assert state.x == 42
      {:ok, state} = TemporalBridge.reconstruct_state_at(bridge, 1300)
      assert state["Elixir.MyApp.Worker.run"].status == :completed

      {:ok, path} = TemporalBridge.trace_execution_path(bridge, hd(events))
      assert Enum.map(path, & &1.ast_node_id) == ["def_run", "assign_x", "def_run"]
      assert {:error, :no_correlation_id} = TemporalBridge.trace_execution_path(bridge, %{})

      {:ok, nodes} = TemporalBridge.get_active_ast_nodes(bridge, 1000, 1150)
      assert Enum.sort(nodes) == ["assign_x", "def_run"]

      {:ok, by_node} = TemporalBridge.get_events_for_ast_node(bridge, "def_run")
      assert length(by_node) == 2
      {:ok, by_corr} = TemporalBridge.get_events_for_correlation(bridge, "exec_1")
      assert length(by_corr) == 3

      {:ok, stats} = TemporalBridge.get_stats(bridge)
      assert stats.events_processed == 3 and is_map(stats.temporal_storage)

      :ok = TemporalBridge.register_as_handler(bridge)
      assert {:ok, ^bridge} = TemporalBridge.get_registered_bridge()
      :ok = TemporalBridge.unregister_handler()
      assert {:error, :not_registered} = TemporalBridge.get_registered_bridge()
    end
  end

  describe "ElixirScope.Query.Engine" do
    setup do
      {:ok, store} = EventStore.start_link(name: unique(:query_store))
      on_exit(fn -> if Process.alive?(store), do: GenServer.stop(store) end)
      base = System.monotonic_time(:millisecond)
      pid1 = spawn(fn -> :ok end)

      for {pid, type, dt} <-
            [{pid1, :function_entry, 0}, {pid1, :function_exit, 100}] ++
              [{self(), :function_entry, 200}, {self(), :message_send, 300}] do
        :ok = EventStore.store_event(store, %{pid: pid, event_type: type, timestamp: base + dt})
      end

      %{store: store, pid1: pid1, base: base}
    end

    test "analyze_query/1 picks the index, the post-filters and suggestions", %{pid1: pid1} do
      assert %Engine{index_type: :temporal} = Engine.analyze_query(since: 1000, until: 2000)
      assert %Engine{index_type: :process} = Engine.analyze_query(pid: self())
      assert %Engine{index_type: :event_type} = Engine.analyze_query(event_type: :function_entry)
      assert %Engine{index_type: :full_scan} = Engine.analyze_query(custom_filter: :some_value)

      strategy = Engine.analyze_query(pid: pid1, event_type: :function_entry, since: 1, until: 2)
      assert strategy.index_type == :process
      assert strategy.post_filters == [:event_type, :temporal]
      assert is_integer(strategy.estimated_cost)
      assert is_list(strategy.optimization_suggestions)
    end

    test "estimate_query_cost/2, execute_query/2, execute_query_with_metrics/2", ctx do
      assert is_integer(Engine.estimate_query_cost(ctx.store, pid: ctx.pid1))

      {:ok, events} = Engine.execute_query(ctx.store, pid: ctx.pid1)
      assert Enum.map(events, & &1.event_type) == [:function_entry, :function_exit]

      {:ok, events} = Engine.execute_query(ctx.store, event_type: :function_entry, limit: 1)
      assert length(events) == 1

      {:ok, events, metrics} =
        Engine.execute_query_with_metrics(ctx.store, since: ctx.base + 100, until: ctx.base + 200)

      assert length(events) == 2
      assert is_integer(metrics.execution_time_us)
      assert metrics.events_returned == 2
      assert metrics.index_used == :temporal
      assert is_integer(metrics.events_scanned) and is_float(metrics.filter_efficiency)
    end
  end

  describe "ElixirScope.Events" do
    # The original's field names, struct by struct (its documentation).
    @fields %{
      Events =>
        [:event_id, :timestamp, :wall_time, :node, :pid, :correlation_id, :parent_id] ++
          [:event_type, :data],
      Events.FunctionExecution =>
        [:id, :timestamp, :wall_time, :module, :function, :arity, :args, :return_value] ++
          [:duration_ns, :caller_pid, :correlation_id, :event_type],
      Events.ProcessEvent => [:id, :timestamp, :wall_time, :pid, :parent_pid, :event_type],
      Events.ProcessSpawn =>
        [:spawned_pid, :parent_pid, :spawn_module, :spawn_function, :spawn_args, :spawn_opts] ++
          [:registered_name],
      Events.MessageEvent =>
        [:id, :timestamp, :wall_time, :from_pid, :to_pid, :message] ++
          [:event_type],
      Events.MessageSend => [
        :sender_pid,
        :receiver_pid,
        :message,
        :message_id,
        :send_type,
        :call_ref
      ],
      Events.MessageReceive =>
        [:receiver_pid, :sender_pid, :message, :message_id, :receive_type, :queue_time_ns] ++
          [:pattern_matched],
      Events.MessageReceived => [:pid, :message, :correlation_id, :timestamp, :wall_time],
      Events.MessageSent =>
        [:from_pid, :to_pid, :message, :correlation_id, :timestamp] ++
          [:wall_time],
      Events.CallbackReply =>
        [:server_pid, :callback, :call_id, :reply, :new_state, :timeout, :hibernate] ++
          [:continue_data, :pid, :correlation_id, :timestamp, :wall_time],
      Events.VariableAssignment => [
        :variable_name,
        :old_value,
        :new_value,
        :assignment_type,
        :scope_context,
        :line_number
      ],
      Events.PerformanceMetric =>
        [:id, :timestamp, :wall_time, :metric_name, :value, :metadata, :metric_type, :unit] ++
          [:source_context],
      Events.GarbageCollection =>
        [:heap_size_before, :heap_size_after, :old_heap_size, :stack_size, :recent_size] ++
          [:mbuf_size, :gc_type, :gc_reason, :duration_ns],
      Events.ErrorEvent => [
        :error_type,
        :error_class,
        :error_message,
        :stacktrace,
        :context,
        :recovery_action
      ],
      Events.CrashDump =>
        [:crashed_pid, :supervisor_pid, :restart_strategy, :restart_count, :crash_reason] ++
          [:process_state, :linked_pids, :monitors],
      Events.VMEvent => [:event_type, :event_data, :scheduler_id, :system_time, :node_name],
      Events.SchedulerEvent =>
        [:scheduler_id, :event_type, :process_count, :port_count, :run_queue_length] ++
          [:utilization],
      Events.NodeEvent => [:event_type, :node_name, :node_type, :connection_id, :extra_info],
      Events.TableEvent =>
        [:table_name, :table_type, :operation, :key, :value, :operation_count] ++
          [:execution_time_ns],
      Events.TraceControl => [:operation, :trace_type, :target, :trace_flags, :reason],
      Events.FunctionEntry =>
        [:module, :function, :arity, :args, :call_id, :caller_module, :caller_function] ++
          [:caller_line, :pid, :correlation_id, :timestamp, :wall_time],
      Events.FunctionExit =>
        [:module, :function, :arity, :call_id, :result, :duration_ns, :exit_reason, :pid] ++
          [:correlation_id, :timestamp, :wall_time],
      Events.ProcessExit =>
        [:exited_pid, :exit_reason, :lifetime_ns, :message_count, :final_state, :pid] ++
          [:reason, :correlation_id, :timestamp, :wall_time],
      Events.StateChange =>
        [:server_pid, :callback, :old_state, :new_state, :state_diff, :trigger_message] ++
          [:trigger_call_id, :pid, :correlation_id, :timestamp, :wall_time],
      Events.StateSnapshot =>
        [:server_pid, :snapshot_id, :state, :checkpoint_type, :sequence_number] ++
          [:memory_usage, :message_queue_len, :pid, :session_id, :correlation_id, :timestamp] ++
          [:wall_time]
    }

    test "every struct has the original's fields (ours may add more)" do
      for {mod, fields} <- @fields do
        keys = Map.keys(struct(mod))
        assert fields -- keys == [], "#{inspect(mod)} lacks #{inspect(fields -- keys)}"
        # Each can be built with every original field set.
        built = struct!(mod, Map.new(fields, &{&1, :set}))
        assert Enum.all?(fields, &(Map.fetch!(built, &1) == :set))
      end
    end

    test "the constructors, serialize/deserialize" do
      entry = Events.function_entry(MyMod, :run, 1, [:a])
      assert %Events{event_type: :function_entry, data: %Events.FunctionEntry{}} = entry
      assert entry.data.module == MyMod and entry.data.arity == 1
      assert is_integer(entry.event_id) and is_integer(entry.timestamp)

      exit_ = Events.function_exit(MyMod, :run, 1, entry.data.call_id, :ok, 1_000, :normal)
      assert exit_.data.result == :ok and exit_.data.duration_ns == 1_000

      send_ = Events.message_send(self(), self(), :hi, :send)
      assert send_.data.sender_pid == self() and send_.data.send_type == :send

      change = Events.state_change(self(), :handle_call, %{n: 1}, %{n: 2})
      assert change.data.old_state == %{n: 1} and change.data.new_state == %{n: 2}

      spawn_ = Events.process_spawn(self(), self(), MyMod, :run, [])
      assert spawn_.data.spawn_module == MyMod

      custom = Events.new_event(:custom, %{x: 1}, correlation_id: "c")
      assert custom.correlation_id == "c" and custom.data == %{x: 1}

      for e <- [entry, exit_, send_, change, spawn_, custom] do
        bin = Events.serialize(e)
        assert Events.deserialize(bin) == e
        assert Events.serialized_size(e) == byte_size(bin)
      end
    end
  end
end

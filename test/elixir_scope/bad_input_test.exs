defmodule ElixirScope.BadInputTest do
  @moduledoc """
  Feeds wrong-type inputs to every public function of `RingBuffer`,
  `Ingestor`, `Events`, `DataAccess`, `EventCorrelator`, `Utils`,
  `TraceFile`, `Config` and `BackpressureManager` (and to the raw NIFs):
  each call must return a documented result or raise `ArgumentError`, and
  the VM must survive.
  """
  # set_buffer/1 writes a node-wide :persistent_term.
  use ExUnit.Case, async: false

  import Bitwise
  import ElixirScope.RingTestHelpers

  alias ElixirScope.Capture.{
    BackpressureManager,
    EventCorrelator,
    Ingestor,
    RingBuffer,
    TemporalBridge,
    TemporalStorage
  }

  alias ElixirScope.Query.Engine
  alias ElixirScope.{Config, Events, Export, Native, TraceFile, Utils}
  alias ElixirScope.Storage.{DataAccess, EventStore}

  @moduletag timeout: 300_000

  @buffer_key {Ingestor, :buffer}

  # Modules whose every public function the sweep calls with bad input.
  @swept [
    RingBuffer,
    Ingestor,
    Events,
    DataAccess,
    EventCorrelator,
    Utils,
    TraceFile,
    Export,
    Config,
    BackpressureManager,
    EventStore,
    ElixirScope.EventStore,
    TemporalStorage,
    TemporalBridge,
    Engine
  ]

  setup do
    previous = :persistent_term.get(@buffer_key, :__unset__)
    # The sweep updates the application's Config (a path no pipeline uses).
    query_timeout = Config.get([:interface, :query_timeout])

    on_exit(fn ->
      :ok = Config.update([:interface, :query_timeout], query_timeout)

      case previous do
        :__unset__ -> :persistent_term.erase(@buffer_key)
        buffer -> :persistent_term.put(@buffer_key, buffer)
      end
    end)

    :ok
  end

  # ---------------------------------------------------------------------------
  # Inputs
  # ---------------------------------------------------------------------------

  defp destroyed_ring do
    buf = new_ring!(size: 8)
    :ok = RingBuffer.write(buf, :x)
    :ok = RingBuffer.destroy(buf)
    buf
  end

  defp new_store! do
    {:ok, store} = DataAccess.new(max_events: 16)
    :ok = DataAccess.store_event(store, %{id: 1, timestamp: 1})
    store
  end

  defp destroyed_store do
    store = new_store!()
    :ok = DataAccess.destroy(store)
    store
  end

  # A directory for files the sweep writes (it runs there: bad values such
  # as "string" are valid relative paths).
  defp sweep_dir do
    dir = Path.join(System.tmp_dir!(), "es_bad_input_#{System.pid()}")
    File.mkdir_p!(dir)
    dir
  end

  defp tmp_path, do: Path.join(sweep_dir(), "t#{System.unique_integer([:positive])}.estrace")

  defp saved_file! do
    path = tmp_path()
    {:ok, _} = TraceFile.save(new_store!(), path, sync: false)
    path
  end

  defp fake_ring, do: %RingBuffer{ref: make_ref(), size: 8, overflow_strategy: :drop_oldest}

  defp new_corr! do
    {:ok, pid} = EventCorrelator.start_link(cleanup_interval_ms: 10)
    pid
  end

  defp corr! do
    case Process.get(:bad_input_correlator) do
      pid when is_pid(pid) -> pid
      nil -> tap(new_corr!(), &Process.put(:bad_input_correlator, &1))
    end
  end

  # A private Config (applying to no pipeline), one per test process.
  defp cfg! do
    case Process.get(:bad_input_config) do
      pid when is_pid(pid) ->
        pid

      nil ->
        {:ok, pid} = Config.start_link(name: nil, pipeline: false, env: false)
        tap(pid, &Process.put(:bad_input_config, &1))
    end
  end

  # A BackpressureManager of no pipeline (it observes nothing).
  defp bpm! do
    case Process.get(:bad_input_bpm) do
      pid when is_pid(pid) ->
        pid

      nil ->
        {:ok, pid} = BackpressureManager.start_link(name: nil, pipeline: :es_sweep_no_pipeline)
        tap(pid, &Process.put(:bad_input_bpm, &1))
    end
  end

  # A server started by the sweep is stopped at once (start_link/0 would
  # otherwise hold the default name).
  defp started_or_error?({:ok, pid}) when is_pid(pid) do
    Process.unlink(pid)
    GenServer.stop(pid)
    true
  end

  defp started_or_error?({:error, _}), do: true
  defp started_or_error?(_), do: false

  defp level_result?(l) when l in [:normal, :elevated, :high, :critical], do: true
  defp level_result?(other), do: other == {:error, :not_running}

  defp tstore!, do: tap(elem(TemporalStorage.start_link(max_events: 16), 1), &Process.unlink/1)
  defp bridge!, do: tap(elem(TemporalBridge.start_link(max_events: 16), 1), &Process.unlink/1)

  defp engine_result?({:ok, events}), do: is_list(events)
  defp engine_result?({:ok, events, %{}}), do: is_list(events)
  defp engine_result?({:error, r}), do: is_atom(r)
  defp engine_result?(_), do: false

  defp es!, do: tap(elem(EventStore.start_link(name: nil, max_events: 16), 1), &Process.unlink/1)

  defp es_started?({:ok, pid}), do: is_pid(pid)
  defp es_started?({:error, {:already_started, pid}}), do: is_pid(pid)
  defp es_started?(_), do: false

  defp corr_started?({:ok, pid}), do: is_pid(pid)
  defp corr_started?(_), do: false

  defp correlated?(%EventCorrelator.CorrelatedEvent{}), do: true
  defp correlated?(_), do: false

  defp bad_values do
    [
      :atom,
      "string",
      "",
      -1,
      0,
      1 <<< 70,
      -(1 <<< 70),
      (1 <<< 64) - 1,
      1 <<< 64,
      1 <<< 63,
      1.5,
      -0.0,
      nil,
      true,
      [],
      [1, 2, 3],
      [1 | 2],
      [{:size, :bad}],
      [{"key", 1}],
      {},
      {:a, :b},
      %{},
      %{a: 1},
      <<1::3>>,
      make_ref(),
      self(),
      hd(Port.list()),
      fn -> :ok end,
      &Enum.map/2,
      %URI{},
      %{ref: make_ref(), size: 8},
      fake_ring(),
      %RingBuffer{ref: :not_a_ref, size: 8, overflow_strategy: :drop_oldest},
      %RingBuffer{ref: make_ref(), size: -1, overflow_strategy: :nope},
      destroyed_ring(),
      %DataAccess{ref: make_ref(), max_events: 16},
      destroyed_store()
    ]
  end

  # ---------------------------------------------------------------------------
  # Result contracts
  # ---------------------------------------------------------------------------

  defp write_result?(:ok), do: true
  defp write_result?({:error, r}), do: r in [:buffer_full, :destroyed]
  defp write_result?(_), do: false

  defp batch_result?({:ok, n}), do: is_integer(n) and n >= 0
  defp batch_result?({:error, :destroyed}), do: true

  defp batch_result?({:error, {:partial_success, n, [buffer_full: r]}}),
    do: is_integer(n) and n >= 0 and is_integer(r) and r > 0

  defp batch_result?(_), do: false

  defp read_result?({:ok, _event, next}), do: is_integer(next) and next > 0
  defp read_result?({:lapped, m, _event, next}), do: m > 0 and next > 0
  defp read_result?(:empty), do: true
  defp read_result?(_), do: false

  defp read_batch_result?({events, next}), do: is_list(events) and is_integer(next) and next >= 0

  defp read_batch_result?({events, next, missed}),
    do: is_list(events) and is_integer(next) and is_integer(missed) and missed >= 0

  defp read_batch_result?(_), do: false

  defp stats_result?(stats),
    do:
      is_map(stats) and
        Enum.all?(
          [:size, :write_position, :read_position, :available_events, :dropped],
          &Map.has_key?(stats, &1)
        )

  defp new_result?({:ok, %RingBuffer{ref: ref}}), do: is_reference(ref)

  defp new_result?({:error, r}),
    do: r in [:invalid_size, :size_must_be_power_of_2, :invalid_overflow_strategy]

  defp new_result?(_), do: false

  defp store_new_result?({:ok, %DataAccess{ref: ref}}), do: is_reference(ref)
  defp store_new_result?(_), do: false

  defp store_result?(:ok), do: true
  defp store_result?({:error, r}), do: r in [:event_too_large, :destroyed]
  defp store_result?(_), do: false

  defp store_batch_result?({:ok, n}), do: is_integer(n) and n >= 0
  defp store_batch_result?(other), do: other != :ok and store_result?(other)

  defp query_result?({:ok, events}), do: is_list(events)
  defp query_result?(_), do: false

  defp get_event_result?({:ok, _}), do: true
  defp get_event_result?({:error, :not_found}), do: true
  defp get_event_result?(_), do: false

  defp store_stats_result?(stats),
    do: is_map(stats) and Map.has_key?(stats, :total_events) and Map.has_key?(stats, :max_events)

  defp event?(%Events{}), do: true
  defp event?(_), do: false

  # A fun handed out by create_fast_ingestor/1 must itself honour the
  # contract when called.
  defp fast_ingestor_result?(fun) when is_function(fun, 1) do
    case classify(fn -> fun.({:probe, 1}) end) do
      {:returned, r} -> write_result?(r)
      {:argument_error, _} -> true
      _ -> false
    end
  end

  defp fast_ingestor_result?(_), do: false

  defp bench_result?(%{operations: n, total_time_ns: t, avg_time_ns: a, min_time_ns: lo}),
    do: is_integer(n) and n > 0 and is_integer(t) and is_float(a) and is_integer(lo)

  defp bench_result?(_), do: false

  defp save_result?({:ok, %{events: n}}), do: is_integer(n)
  defp save_result?({:error, {r, %{offset: _}}}), do: is_atom(r)
  defp save_result?({:error, r}), do: r in [:no_pipeline, :no_trace, :metadata_too_large]
  defp save_result?(_), do: false

  defp load_result?({:ok, %DataAccess{source: %{files: _}}}), do: true
  defp load_result?({:error, {r, %{offset: _}}}), do: is_atom(r)
  defp load_result?(_), do: false

  defp info_result?({:ok, %{version: 1}}), do: true
  defp info_result?(other), do: load_result?(other)

  defp export_result?({:ok, %{format: f, events: n}}), do: f in Export.formats() and is_integer(n)
  defp export_result?(other), do: load_result?(other) or save_result?(other)

  defp resolve_result?({:ok, %DataAccess{}, _}), do: true
  defp resolve_result?({:error, r}), do: r in [:no_pipeline, :no_trace]
  defp resolve_result?(_), do: false

  defp any?(_), do: true
  defp never?(_), do: false

  # ---------------------------------------------------------------------------
  # The sweep table: {module, function, valid args (given a fresh ring), contract}
  # ---------------------------------------------------------------------------

  defp specs do
    me = self()
    ok_write = &write_result?/1

    [
      # RingBuffer
      {RingBuffer, :new, fn _ -> [] end, &new_result?/1},
      {RingBuffer, :new, fn _ -> [[size: 8]] end, &new_result?/1},
      {RingBuffer, :write, fn b -> [b, :event] end, ok_write},
      {RingBuffer, :write_batch, fn b -> [b, [1, 2]] end, &batch_result?/1},
      {RingBuffer, :read, fn b -> [b] end, &read_result?/1},
      {RingBuffer, :read, fn b -> [b, 0] end, &read_result?/1},
      {RingBuffer, :read_batch, fn b -> [b, 0, 10] end, &read_batch_result?/1},
      {RingBuffer, :read_batch, fn b -> [b, 0, 10, [with_missed: true]] end,
       &read_batch_result?/1},
      {RingBuffer, :stats, fn b -> [b] end, &stats_result?/1},
      # size/1 only reads the struct field (even of a forged struct).
      {RingBuffer, :size, fn b -> [b] end, &any?/1},
      {RingBuffer, :clear, fn b -> [b] end, &(&1 == :ok)},
      {RingBuffer, :destroy, fn b -> [b] end, &(&1 == :ok)},
      # bad_buffer!/1 (public, @doc false) always raises.
      {RingBuffer, :bad_buffer!, fn b -> [b] end, &never?/1},
      # Ingestor
      {Ingestor, :ingest_function_call, fn b -> [b, M, :f, [1], me, :corr] end, ok_write},
      {Ingestor, :ingest_function_return, fn b -> [b, :ret, 10, :corr] end, ok_write},
      {Ingestor, :ingest_process_spawn, fn b -> [b, me, me] end, ok_write},
      {Ingestor, :ingest_message_send, fn b -> [b, me, me, :msg] end, ok_write},
      {Ingestor, :ingest_state_change, fn b -> [b, me, 1, 2] end, ok_write},
      {Ingestor, :ingest_state_snapshot, fn b -> [b, me, %{n: 1}] end, ok_write},
      {Ingestor, :ingest_state_snapshot, fn b -> [b, me, %{n: 1}, :why] end, ok_write},
      {Ingestor, :ingest_performance_metric, fn b -> [b, :m, 1] end, ok_write},
      {Ingestor, :ingest_performance_metric, fn b -> [b, :m, 1, %{}] end, ok_write},
      {Ingestor, :ingest_error, fn b -> [b, :error, "msg", []] end, ok_write},
      {Ingestor, :ingest_message_receive, fn b -> [b, me, :msg] end, ok_write},
      {Ingestor, :ingest_process_exit, fn b -> [b, me, :normal] end, ok_write},
      {Ingestor, :ingest_function_exception, fn b -> [b, :error, :badarg, 5, :corr] end,
       ok_write},
      {Ingestor, :ingest_generic_event, fn b -> [b, :t, %{}, me, nil, 0, 0] end, ok_write},
      {Ingestor, :ingest_batch, fn b -> [b, [1, 2]] end, &batch_result?/1},
      {Ingestor, :create_fast_ingestor, fn b -> [b] end, &fast_ingestor_result?/1},
      {Ingestor, :benchmark_ingestion, fn b -> [b, :e] end, &bench_result?/1},
      {Ingestor, :benchmark_ingestion, fn b -> [b, :e, 10] end, &bench_result?/1},
      {Ingestor, :validate_performance, fn b -> [b] end,
       &(&1 == :ok or match?({:error, {:performance_target_missed, _, 1000}}, &1))},
      {Ingestor, :get_buffer, fn _ -> [] end,
       &(match?({:ok, %RingBuffer{}}, &1) or &1 == {:error, :not_initialized})},
      {Ingestor, :set_buffer, fn b -> [b] end, &(&1 == :ok)},
      # Events
      {Events, :generate_id, fn _ -> [] end, &(is_integer(&1) and &1 > 0)},
      {Events, :max_inflated_bytes, fn _ -> [] end, &(is_integer(&1) and &1 > 0)},
      {Events, :new_event, fn _ -> [:t, %{}] end, &event?/1},
      {Events, :new_event, fn _ -> [:t, %{}, [event_id: 1]] end, &event?/1},
      {Events, :function_entry, fn _ -> [M, :f, 1, [1]] end, &event?/1},
      {Events, :function_entry, fn _ -> [M, :f, 1, [1], [caller_line: 3]] end, &event?/1},
      {Events, :function_exit, fn _ -> [M, :f, 1, 7, :ok, 10, :normal] end, &event?/1},
      {Events, :function_exit, fn _ -> [M, :f, 1, 7, :ok, 10, :normal, [pid: me]] end, &event?/1},
      {Events, :message_send, fn _ -> [me, me, :m, :send] end, &event?/1},
      {Events, :message_send, fn _ -> [me, me, :m, :send, [call_ref: make_ref()]] end, &event?/1},
      {Events, :state_change, fn _ -> [me, :cb, 1, 2] end, &event?/1},
      {Events, :state_change, fn _ -> [me, :cb, 1, 2, [trigger_message: :m]] end, &event?/1},
      {Events, :process_spawn, fn _ -> [me, me, M, :f, []] end, &event?/1},
      {Events, :process_spawn, fn _ -> [me, me, M, :f, [], [registered_name: :n]] end, &event?/1},
      {Events, :serialize, fn _ -> [Events.new_event(:t, %{})] end, &is_binary/1},
      {Events, :serialized_size, fn _ -> [%{a: 1}] end, &(is_integer(&1) and &1 > 0)},
      {Events, :deserialize, fn _ -> [Events.serialize(%{a: 1})] end, &any?/1},
      # DataAccess (the ring argument is not used: each call gets a fresh store)
      {DataAccess, :new, fn _ -> [] end, &store_new_result?/1},
      {DataAccess, :new, fn _ -> [[max_events: 8]] end, &store_new_result?/1},
      {DataAccess, :store_event, fn _ -> [new_store!(), %{id: 2}] end, &store_result?/1},
      {DataAccess, :store_events, fn _ -> [new_store!(), [1, %{id: 2}]] end,
       &store_batch_result?/1},
      {DataAccess, :get_event, fn _ -> [new_store!(), 1] end, &get_event_result?/1},
      {DataAccess, :query_by_time_range, fn _ -> [new_store!(), 0, 10] end, &query_result?/1},
      {DataAccess, :query_by_time_range, fn _ -> [new_store!(), 0, 10, [limit: 5]] end,
       &query_result?/1},
      {DataAccess, :query_by_process, fn _ -> [new_store!(), me] end, &query_result?/1},
      {DataAccess, :query_by_process, fn _ -> [new_store!(), me, [order: :desc]] end,
       &query_result?/1},
      {DataAccess, :query_by_function, fn _ -> [new_store!(), M, :f] end, &query_result?/1},
      {DataAccess, :query_by_function, fn _ -> [new_store!(), M, :f, [limit: 1]] end,
       &query_result?/1},
      {DataAccess, :query_by_correlation, fn _ -> [new_store!(), :c] end, &query_result?/1},
      {DataAccess, :query_by_correlation, fn _ -> [new_store!(), :c, [limit: 1]] end,
       &query_result?/1},
      {DataAccess, :get_stats, fn _ -> [new_store!()] end, &store_stats_result?/1},
      {DataAccess, :cleanup_old_events, fn _ -> [new_store!(), 5] end,
       &match?({:ok, n} when is_integer(n), &1)},
      {DataAccess, :destroy, fn _ -> [new_store!()] end, &(&1 == :ok)},
      {DataAccess, :get_correlated, fn _ -> [new_store!(), 1] end, &get_event_result?/1},
      {DataAccess, :causal_chain, fn _ -> [new_store!(), 1] end, &query_result?/1},
      {DataAccess, :call_contents, fn _ -> [new_store!(), 1] end, &query_result?/1},
      {DataAccess, :call_contents, fn _ -> [new_store!(), 1, [limit: 5]] end, &query_result?/1},
      {DataAccess, :children, fn _ -> [new_store!(), 1] end, &query_result?/1},
      {DataAccess, :children, fn _ -> [new_store!(), 1, [limit: 5]] end, &query_result?/1},
      {DataAccess, :query_by_event_type, fn _ -> [new_store!(), :t] end, &query_result?/1},
      {DataAccess, :query_by_event_type, fn _ -> [new_store!(), :t, [limit: 1]] end,
       &query_result?/1},
      {DataAccess, :query_by_ast_node, fn _ -> [new_store!(), "n"] end, &query_result?/1},
      {DataAccess, :query_by_ast_node, fn _ -> [new_store!(), "n", [limit: 1]] end,
       &query_result?/1},
      {DataAccess, :index_sizes, fn _ -> [new_store!()] end, &is_map/1},
      {DataAccess, :tag_key, fn _ -> [:t] end, &(is_integer(&1) and &1 >= 0)},
      # Default storage (node-wide; any event and any plan are accepted)
      {DataAccess, :default_storage, fn _ -> [] end, &match?({:ok, %DataAccess{}}, &1)},
      {DataAccess, :get_events_since, fn _ -> [0] end, &is_list/1},
      {DataAccess, :event_exists?, fn _ -> [1] end, &is_boolean/1},
      {DataAccess, :store_events, fn _ -> [[%{id: :sweep}]] end,
       &(&1 == :ok or store_result?(&1))},
      {DataAccess, :get_instrumentation_plan, fn _ -> [] end,
       &(match?({:ok, _}, &1) or &1 == {:error, :not_found})},
      {DataAccess, :store_instrumentation_plan, fn _ -> [%{}] end, &(&1 == :ok)},
      # Storage.EventStore (a fresh store per call) and the shared EventStore
      {EventStore, :start_link, fn _ -> [] end, &es_started?/1},
      {EventStore, :start_link, fn _ -> [[name: nil, max_events: 8]] end, &es_started?/1},
      {EventStore, :start, fn _ -> [[name: nil]] end, &es_started?/1},
      {EventStore, :child_spec, fn _ -> [[]] end, &is_map/1},
      {EventStore, :store_event, fn _ -> [es!(), %{id: 1}] end, &store_result?/1},
      {EventStore, :query_events, fn _ -> [es!(), [pid: me]] end, &query_result?/1},
      {EventStore, :get_index_stats, fn _ -> [es!()] end, &is_map/1},
      {EventStore, :get_events_via_data_access, fn _ -> [es!()] end, &query_result?/1},
      {EventStore, :data_access, fn _ -> [es!()] end, &match?(%DataAccess{}, &1)},
      {EventStore, :compile!, fn _ -> [[limit: 1]] end, &is_map/1},
      {ElixirScope.EventStore, :store_event, fn _ -> [:c, :t, 1] end, &store_result?/1},
      {ElixirScope.EventStore, :get_or_create_event_store, fn _ -> [] end, &es_started?/1},
      {ElixirScope.EventStore, :query_events, fn _ -> [[limit: 1]] end, &query_result?/1},
      {ElixirScope.EventStore, :get_stats, fn _ -> [] end, &is_map/1},
      # TemporalStorage, TemporalBridge (fresh processes), Query.Engine
      {TemporalStorage, :start_link, fn _ -> [] end, &es_started?/1},
      {TemporalStorage, :start_link, fn _ -> [[max_events: 8]] end, &es_started?/1},
      {TemporalStorage, :store_event, fn _ -> [tstore!(), %{timestamp: 1}] end, &store_result?/1},
      {TemporalStorage, :store_events, fn _ -> [tstore!(), [%{}]] end, &store_batch_result?/1},
      {TemporalStorage, :normalize!, fn _ -> [%{}] end, &is_map/1},
      {TemporalStorage, :get_events_in_range, fn _ -> [tstore!(), 0, 10] end, &query_result?/1},
      {TemporalStorage, :get_events_for_ast_node, fn _ -> [tstore!(), "n"] end, &query_result?/1},
      {TemporalStorage, :get_events_for_correlation, fn _ -> [tstore!(), "c"] end,
       &query_result?/1},
      {TemporalStorage, :get_all_events, fn _ -> [tstore!()] end, &query_result?/1},
      {TemporalStorage, :get_stats, fn _ -> [tstore!()] end, &match?({:ok, %{}}, &1)},
      {TemporalStorage, :data_access, fn _ -> [tstore!()] end, &match?(%DataAccess{}, &1)},
      {TemporalBridge, :start_link, fn _ -> [] end, &es_started?/1},
      {TemporalBridge, :start_link, fn _ -> [[buffer_size: 2]] end, &es_started?/1},
      {TemporalBridge, :correlate_event, fn _ -> [bridge!(), %{}] end, &(&1 == :ok)},
      {TemporalBridge, :get_events_in_range, fn _ -> [bridge!(), 0, 10] end, &query_result?/1},
      {TemporalBridge, :get_events_for_ast_node, fn _ -> [bridge!(), "n"] end, &query_result?/1},
      {TemporalBridge, :get_events_for_correlation, fn _ -> [bridge!(), "c"] end,
       &query_result?/1},
      {TemporalBridge, :get_stats, fn _ -> [bridge!()] end, &match?({:ok, %{}}, &1)},
      {TemporalBridge, :flush_buffer, fn _ -> [bridge!()] end, &(&1 == :ok)},
      {TemporalBridge, :reconstruct_state_at, fn _ -> [bridge!(), 10] end,
       &match?({:ok, %{}}, &1)},
      {TemporalBridge, :trace_execution_path, fn _ -> [bridge!(), %{correlation_id: 1}] end,
       &(query_result?(&1) or &1 == {:error, :no_correlation_id})},
      {TemporalBridge, :get_active_ast_nodes, fn _ -> [bridge!(), 0, 10] end, &query_result?/1},
      {TemporalBridge, :register_as_handler, fn _ -> [bridge!()] end, &(&1 == :ok)},
      # #17b: the bridge over a trace.
      {TemporalBridge, :feed_trace, fn _ -> [bridge!()] end,
       &(match?({:ok, n} when is_integer(n), &1) or &1 == {:error, :no_trace})},
      {TemporalBridge, :feed_trace,
       fn _ -> [bridge!(), [store: elem(DataAccess.new(max_events: 16), 1), limit: 5]] end,
       &(match?({:ok, n} when is_integer(n), &1) or &1 == {:error, :no_trace})},
      {TemporalBridge, :process_state_at, fn _ -> [bridge!(), me, 10] end,
       &match?({:error, a} when is_atom(a), &1)},
      {TemporalBridge, :unregister_handler, fn _ -> [] end, &(&1 == :ok)},
      {TemporalBridge, :get_registered_bridge, fn _ -> [] end,
       &(match?({:ok, _}, &1) or &1 == {:error, :not_registered})},
      {Engine, :analyze_query, fn _ -> [[pid: me]] end, &match?(%Engine{}, &1)},
      {Engine, :analyze_query, fn _ -> [es!(), [pid: me]] end, &match?(%Engine{}, &1)},
      {Engine, :estimate_query_cost, fn _ -> [es!(), [pid: me]] end, &is_integer/1},
      {Engine, :execute_query, fn _ -> [es!(), [limit: 1]] end, &engine_result?/1},
      {Engine, :execute_query_with_metrics, fn _ -> [es!(), [limit: 1]] end, &engine_result?/1},
      {Engine, :get_optimization_suggestions, fn _ -> [nil, []] end, &is_list/1},
      # bad_store!/1 (public, @doc false) always raises.
      {DataAccess, :bad_store!, fn _ -> [new_store!()] end, &never?/1},
      # TraceFile (paths under the sweep's own directory)
      {TraceFile, :save, fn _ -> [new_store!(), tmp_path()] end, &save_result?/1},
      {TraceFile, :save, fn _ -> [new_store!(), tmp_path(), [compression: :lz4]] end,
       &save_result?/1},
      {TraceFile, :load, fn _ -> [saved_file!()] end, &load_result?/1},
      {TraceFile, :load, fn _ -> [saved_file!(), [max_new_atoms: 0]] end, &load_result?/1},
      {TraceFile, :info, fn _ -> [saved_file!()] end, &info_result?/1},
      {TraceFile, :info, fn _ -> [saved_file!(), []] end, &info_result?/1},
      {TraceFile, :atom_budget, fn _ -> [] end, &match?({c, b} when c <= b, &1)},
      {TraceFile, :process_names, fn _ -> [new_store!()] end, &is_list/1},
      {TraceFile, :resolve_source, fn _ -> [new_store!()] end, &resolve_result?/1},
      # Export (paths under the sweep's own directory)
      {Export, :formats, fn _ -> [] end,
       &(&1 == [:chrome_trace, :speedscope, :folded, :flamegraph])},
      {Export, :chrome_trace, fn _ -> [new_store!(), tmp_path()] end, &export_result?/1},
      {Export, :chrome_trace, fn _ -> [new_store!(), tmp_path(), [preview_bytes: 40]] end,
       &export_result?/1},
      {Export, :speedscope, fn _ -> [new_store!(), tmp_path()] end, &export_result?/1},
      {Export, :speedscope, fn _ -> [new_store!(), tmp_path(), [title: "t"]] end,
       &export_result?/1},
      {Export, :folded, fn _ -> [new_store!(), tmp_path()] end, &export_result?/1},
      {Export, :folded, fn _ -> [new_store!(), tmp_path(), [weight: :calls]] end,
       &export_result?/1},
      {Export, :flamegraph, fn _ -> [new_store!(), tmp_path()] end, &export_result?/1},
      {Export, :flamegraph, fn _ -> [new_store!(), tmp_path(), [max_depth: 4]] end,
       &export_result?/1},
      {Export, :export, fn _ -> [new_store!(), tmp_path(), :folded] end, &export_result?/1},
      {Export, :export, fn _ -> [saved_file!(), tmp_path(), :chrome_trace, []] end,
       &export_result?/1},
      # EventCorrelator (one shared correlator per test process; stop/1 gets
      # a fresh one)
      {EventCorrelator, :start_link, fn _ -> [] end, &corr_started?/1},
      {EventCorrelator, :start_link, fn _ -> [[max_correlations: 8]] end, &corr_started?/1},
      {EventCorrelator, :child_spec, fn _ -> [[]] end, &is_map/1},
      {EventCorrelator, :correlate_event, fn _ -> [corr!(), :event] end, &correlated?/1},
      {EventCorrelator, :correlate_batch, fn _ -> [corr!(), [1, 2]] end,
       &(is_list(&1) and Enum.all?(&1, fn c -> correlated?(c) end))},
      {EventCorrelator, :get_correlation_metadata, fn _ -> [corr!(), 1] end,
       &(&1 == nil or is_map(&1))},
      {EventCorrelator, :get_correlation_chain, fn _ -> [corr!(), 1] end, &is_list/1},
      {EventCorrelator, :cleanup_expired_correlations, fn _ -> [corr!()] end,
       &match?({:ok, n} when is_integer(n), &1)},
      {EventCorrelator, :get_metrics, fn _ -> [corr!()] end, &is_map/1},
      {EventCorrelator, :health_check, fn _ -> [corr!()] end, &is_map/1},
      {EventCorrelator, :get_state, fn _ -> [corr!()] end, &is_map/1},
      {EventCorrelator, :stop, fn _ -> [new_corr!()] end, &(&1 == :ok)},
      # Utils
      {Utils, :monotonic_timestamp, fn _ -> [] end, &is_integer/1},
      {Utils, :wall_timestamp, fn _ -> [] end, &is_integer/1},
      {Utils, :format_timestamp, fn _ -> [0] end, &is_binary/1},
      {Utils, :measure, fn _ -> [fn -> :ok end] end, &match?({:ok, ns} when is_integer(ns), &1)},
      {Utils, :generate_id, fn _ -> [] end, &(is_integer(&1) and &1 > 0)},
      {Utils, :id_to_timestamp, fn _ -> [Utils.generate_id()] end, &is_integer/1},
      {Utils, :generate_correlation_id, fn _ -> [] end, &(is_binary(&1) and byte_size(&1) == 36)},
      {Utils, :safe_inspect, fn _ -> [:term] end, &is_binary/1},
      {Utils, :safe_inspect, fn _ -> [:term, [limit: 5]] end, &is_binary/1},
      {Utils, :truncate_if_large, fn _ -> [:term] end, &any?/1},
      {Utils, :truncate_if_large, fn _ -> [:term, 100] end, &any?/1},
      {Utils, :truncate_data, fn _ -> [:term] end, &any?/1},
      {Utils, :truncate_data, fn _ -> [:term, 100] end, &any?/1},
      {Utils, :term_size, fn _ -> [:term] end, &(is_integer(&1) and &1 >= 0)},
      {Utils, :measure_memory, fn _ -> [fn -> :ok end] end,
       &match?({:ok, {b, a, d}} when is_integer(b) and is_integer(a) and is_integer(d), &1)},
      {Utils, :process_stats, fn _ -> [] end, &is_map/1},
      {Utils, :process_stats, fn _ -> [me] end, &is_map/1},
      {Utils, :system_stats, fn _ -> [] end, &is_map/1},
      {Utils, :format_bytes, fn _ -> [10] end, &is_binary/1},
      {Utils, :format_duration, fn _ -> [10] end, &is_binary/1},
      {Utils, :valid_positive_integer?, fn _ -> [1] end, &is_boolean/1},
      {Utils, :valid_percentage?, fn _ -> [0.5] end, &is_boolean/1},
      {Utils, :valid_pid?, fn _ -> [me] end, &is_boolean/1},
      # Config (the application's server, and a private one)
      {Config, :start_link, fn _ -> [] end, &started_or_error?/1},
      {Config, :start_link, fn _ -> [[name: nil, pipeline: false, env: false]] end,
       &started_or_error?/1},
      {Config, :child_spec, fn _ -> [[]] end, &is_map/1},
      {Config, :get, fn _ -> [] end, &match?(%Config{}, &1)},
      {Config, :get, fn _ -> [[:ai, :provider]] end, &any?/1},
      {Config, :get, fn _ -> [cfg!(), [:ai, :provider]] end, &any?/1},
      {Config, :update, fn _ -> [[:interface, :query_timeout], 5000] end,
       &(&1 == :ok or match?({:error, _}, &1))},
      {Config, :update, fn _ -> [cfg!(), [:interface, :query_timeout], 5000] end,
       &(&1 == :ok or match?({:error, _}, &1))},
      {Config, :validate, fn _ -> [%Config{}] end,
       &(match?({:ok, _}, &1) or match?({:error, m} when is_binary(m), &1))},
      {Config, :pipeline_options, fn _ -> [%Config{}] end, &Keyword.keyword?/1},
      {Config, :snapshot, fn _ -> [] end, &match?({%Config{}, g} when is_integer(g), &1)},
      {Config, :snapshot, fn _ -> [cfg!()] end, &match?({%Config{}, g} when is_integer(g), &1)},
      {Config, :sync_pipeline, fn _ -> [:es_sweep_no_pipeline, 0] end,
       &(&1 == :ok or match?({:error, _}, &1))},
      {Config, :sync_pipeline, fn _ -> [cfg!(), :es_sweep_no_pipeline, 0] end,
       &(&1 == :ok or match?({:error, _}, &1))},
      # BackpressureManager (the default name runs nothing here)
      {BackpressureManager, :start_link, fn _ -> [] end, &started_or_error?/1},
      {BackpressureManager, :start_link,
       fn _ -> [[name: nil, pipeline: :es_sweep_no_pipeline]] end, &started_or_error?/1},
      {BackpressureManager, :child_spec, fn _ -> [[]] end, &is_map/1},
      {BackpressureManager, :validate_opts!, fn _ -> [[]] end, &is_map/1},
      {BackpressureManager, :check_pressure, fn _ -> [] end, &level_result?/1},
      {BackpressureManager, :check_pressure, fn _ -> [bpm!()] end, &level_result?/1},
      {BackpressureManager, :check_now, fn _ -> [] end, &level_result?/1},
      {BackpressureManager, :check_now, fn _ -> [bpm!()] end, &level_result?/1},
      {BackpressureManager, :get_scaling_recommendation, fn _ -> [] end,
       &(&1 == :maintain or match?({_, n} when is_integer(n) or n == :not_running, &1))},
      {BackpressureManager, :get_scaling_recommendation, fn _ -> [bpm!()] end,
       &(&1 == :maintain or match?({_, n} when is_integer(n) or n == :not_running, &1))},
      {BackpressureManager, :enable_load_shedding, fn _ -> [] end,
       &(&1 in [:ok, {:error, :not_running}])},
      {BackpressureManager, :enable_load_shedding, fn _ -> [bpm!()] end,
       &(&1 in [:ok, {:error, :not_running}])},
      {BackpressureManager, :disable_load_shedding, fn _ -> [] end,
       &(&1 in [:ok, {:error, :not_running}])},
      {BackpressureManager, :disable_load_shedding, fn _ -> [bpm!()] end,
       &(&1 in [:ok, {:error, :not_running}])},
      {BackpressureManager, :get_state, fn _ -> [] end,
       &(is_map(&1) or &1 == {:error, :not_running})},
      {BackpressureManager, :get_state, fn _ -> [bpm!()] end,
       &(is_map(&1) or &1 == {:error, :not_running})}
    ]
  end

  # Generated or not meant to be called with arbitrary input.
  @exempt [
    {RingBuffer, :__struct__, 0},
    {RingBuffer, :__struct__, 1},
    {Events, :__struct__, 0},
    {Events, :__struct__, 1},
    {DataAccess, :__struct__, 0},
    {DataAccess, :__struct__, 1},
    # Internal constructor for pipeline handles (@doc false).
    {DataAccess, :from_pipeline, 3},
    # GenServer callbacks.
    {EventCorrelator, :init, 1},
    {EventCorrelator, :handle_call, 3},
    {EventCorrelator, :handle_cast, 2},
    {EventCorrelator, :handle_info, 2},
    {EventCorrelator, :terminate, 2},
    {EventCorrelator, :code_change, 3},
    {Config, :__struct__, 0},
    {Config, :__struct__, 1},
    {Config, :init, 1},
    {Config, :handle_call, 3},
    {Config, :handle_cast, 2},
    {Config, :handle_info, 2},
    {Config, :terminate, 2},
    {Config, :code_change, 3},
    {BackpressureManager, :init, 1},
    {BackpressureManager, :handle_call, 3},
    {BackpressureManager, :handle_cast, 2},
    {BackpressureManager, :handle_info, 2},
    {BackpressureManager, :terminate, 2},
    {BackpressureManager, :code_change, 3},
    # The scaling policy on a validated config (@doc false).
    {BackpressureManager, :recommend, 3},
    {EventStore, :__struct__, 0},
    {EventStore, :__struct__, 1},
    {EventStore, :init, 1},
    {EventStore, :handle_call, 3},
    {EventStore, :handle_cast, 2},
    {EventStore, :handle_info, 2},
    {EventStore, :terminate, 2},
    {EventStore, :code_change, 3},
    {TemporalStorage, :__struct__, 0},
    {TemporalStorage, :__struct__, 1},
    {TemporalStorage, :child_spec, 1},
    {TemporalStorage, :init, 1},
    {TemporalStorage, :handle_call, 3},
    {TemporalStorage, :handle_cast, 2},
    {TemporalStorage, :handle_info, 2},
    {TemporalStorage, :terminate, 2},
    {TemporalStorage, :code_change, 3},
    {TemporalBridge, :__struct__, 0},
    {TemporalBridge, :__struct__, 1},
    {TemporalBridge, :child_spec, 1},
    {TemporalBridge, :init, 1},
    {TemporalBridge, :handle_call, 3},
    {TemporalBridge, :handle_cast, 2},
    {TemporalBridge, :handle_info, 2},
    {TemporalBridge, :terminate, 2},
    {TemporalBridge, :code_change, 3},
    {Engine, :__struct__, 0},
    {Engine, :__struct__, 1}
  ]

  # ---------------------------------------------------------------------------
  # Engine
  # ---------------------------------------------------------------------------

  defp classify(fun) do
    {:returned, fun.()}
  rescue
    e in ArgumentError -> {:argument_error, e}
    e -> {:other_exception, e, __STACKTRACE__}
  catch
    kind, reason -> {:caught, kind, reason}
  end

  # Every call of `spec` with one argument replaced by one bad value.
  defp sweep({mod, fun, args_fun, ok?}) do
    arity = length(args_fun.(nil))

    if arity == 0 do
      check_call({mod, fun, []}, ok?)
    else
      for pos <- 0..(arity - 1), bad <- bad_values(), reduce: [] do
        acc ->
          args = List.replace_at(args_fun.(new_ring!(size: 16)), pos, bad)
          check_call({mod, fun, args}, ok?) ++ acc
      end
    end
  end

  defp check_call({mod, fun, args} = call, ok?) do
    case classify(fn -> apply(mod, fun, args) end) do
      {:argument_error, _} ->
        []

      {:returned, result} ->
        if ok?.(result), do: [], else: [{call, {:unexpected_result, result}}]

      other ->
        [{call, other}]
    end
  end

  defp format_violations(violations) do
    violations
    |> Enum.take(25)
    |> Enum.map_join("\n", fn {{m, f, args}, what} ->
      "  #{inspect(m)}.#{f}(#{Enum.map_join(args, ", ", &inspect(&1, limit: 4, printable_limit: 30))})" <>
        " -> #{inspect(what, limit: 8, printable_limit: 80)}"
    end)
  end

  defp assert_fresh_ring_works do
    buf = new_ring!(size: 8)
    assert RingBuffer.write(buf, {:alive, self()}) == :ok
    assert RingBuffer.read(buf, 0) == {:ok, {:alive, self()}, 1}
    assert Ingestor.ingest_function_call(buf, M, :f, [1], self(), nil) == :ok
    assert {:ok, %Events.FunctionExecution{arity: 1}, 2} = RingBuffer.read(buf, 1)
    :ok = RingBuffer.destroy(buf)
  end

  # ---------------------------------------------------------------------------
  # Tests
  # ---------------------------------------------------------------------------

  describe "coverage" do
    test "the sweep covers every public function of the swept modules" do
      covered =
        for {mod, fun, args_fun, _} <- specs(), into: MapSet.new() do
          {mod, fun, length(args_fun.(nil))}
        end

      exported =
        for mod <- @swept,
            {fun, arity} <- mod.__info__(:functions),
            into: MapSet.new(),
            do: {mod, fun, arity}

      missing = exported |> MapSet.difference(covered) |> MapSet.difference(MapSet.new(@exempt))

      assert MapSet.size(missing) == 0,
             "public functions not covered by the bad-input sweep (add them to specs/0): " <>
               inspect(MapSet.to_list(missing))

      stale = MapSet.difference(covered, exported)

      assert MapSet.size(stale) == 0,
             "specs/0 lists functions that no longer exist: #{inspect(stale)}"
    end
  end

  describe "wrong-type sweep" do
    for mod <- @swept do
      test "#{inspect(mod)}: every argument x every bad value -> documented result or ArgumentError" do
        exported = unquote(mod).__info__(:functions)

        violations =
          File.cd!(sweep_dir(), fn ->
            specs()
            |> Enum.filter(fn {m, f, args_fun, _} ->
              m == unquote(mod) and {f, length(args_fun.(nil))} in exported
            end)
            |> Enum.flat_map(&sweep/1)
          end)

        assert violations == [],
               "#{length(violations)} call(s) broke the contract:\n" <>
                 format_violations(violations)

        assert_fresh_ring_works()
      end
    end

    test "RingBuffer.new/1: every option x every bad value" do
      violations =
        for key <- [:size, :overflow_strategy, :name, :max_event_bytes],
            bad <- bad_values(),
            reduce: [] do
          acc -> check_call({RingBuffer, :new, [[{key, bad}]]}, &new_result?/1) ++ acc
        end

      assert violations == [], format_violations(violations)
      assert_fresh_ring_works()
    end

    test "raw NIFs with garbage arguments never crash the VM" do
      ring_ref = new_ring!(size: 16).ref
      store_ref = new_store!().ref
      snap_ref = Native.ana_snapshot(store_ref)
      callbacks = [{M, :handle_call, 3, 4}, {M, :init, 1, 2}]

      tracer_ref =
        Native.tracer_new(
          ring_ref,
          self(),
          false,
          true,
          64,
          64,
          1000,
          1000,
          60_000,
          callbacks,
          nil
        )

      corr_ref = Native.corr_new(1_000_000, 16)
      me = self()
      saved = saved_file!()

      {:ok, pipe_ref, _, _} =
        Native.pipe_new(
          nil,
          2,
          64,
          :drop_oldest,
          4096,
          1,
          10,
          1000,
          4,
          1000,
          100,
          16,
          0,
          1000,
          true
        )

      {:ok, sub_ref, sub_id} = Native.sub_new(pipe_ref, me, %{}, 10)
      {:ok, lease_ref} = Native.pipe_worker_lease(pipe_ref, 0)
      {:ok, cursor_ref, false} = Native.rb_writer_claim(ring_ref, "sweep")

      calls = [
        {:next_event_id, []},
        {:debug_shared_struct_keys, [true]},
        {:debug_thread_cpu_ns, []},
        {:debug_process_cpu_ns, []},
        {:debug_ing_function_call_wrapped, [ring_ref, M, :f, [1], me, 1]},
        {:utils_monotonic_ns, []},
        {:utils_wall_ns, []},
        {:utils_generate_id, []},
        {:utils_id_timestamp, [Native.utils_generate_id()]},
        {:rb_live_count, []},
        {:shard_of_pid, [me, 4]},
        {:rb_new, [8, :drop_oldest, 8192]},
        {:rb_write, [ring_ref, :e]},
        {:rb_write_batch, [ring_ref, [1, 2]]},
        {:rb_read, [ring_ref, 0]},
        {:rb_read_batch, [ring_ref, 0, 10]},
        {:rb_stats, [ring_ref]},
        {:rb_clear, [ring_ref]},
        {:ing_function_call, [ring_ref, M, :f, [1], me, nil]},
        {:ing_function_return, [ring_ref, :r, 1, nil]},
        {:ing_process_spawn, [ring_ref, me, me]},
        {:ing_message_send, [ring_ref, me, me, :m]},
        {:ing_state_change, [ring_ref, me, 1, 2]},
        {:ing_performance_metric, [ring_ref, :m, 1, %{}]},
        {:ing_error, [ring_ref, :e, :m, []]},
        {:ing_message_receive, [ring_ref, me, :m]},
        {:ing_process_exit, [ring_ref, me, :normal]},
        {:ing_function_exception, [ring_ref, :error, :r, 1, nil]},
        {:ing_state_snapshot, [ring_ref, me, %{n: 1}, :why, nil]},
        {:store_new, [8]},
        {:store_put, [store_ref, 2, 2, me, M, :f, 1, {0, 5}, :e]},
        {:store_put_batch, [store_ref, [{3, 3, me, M, :f, {1, 6, 0}, :e}]]},
        {:store_try_put_batch, [store_ref, [{4, 4, me, M, :f, {1, 6, 0}, :e}]]},
        {:store_get, [store_ref, 1]},
        {:store_by_pid, [store_ref, me, 10, false]},
        {:store_by_function, [store_ref, M, :f, 10, false]},
        {:store_by_correlation, [store_ref, 1, 10, false]},
        {:store_by_event_type, [store_ref, 6, 10, false]},
        {:store_by_ast_node, [store_ref, 5, 10, true]},
        {:store_index_sizes, [store_ref]},
        {:store_by_time_range, [store_ref, 0, 10, 10, false]},
        {:store_quick, [store_ref, :time, 0, 10, 10, false]},
        {:store_evict, [store_ref, 0, 0]},
        {:store_stats, [store_ref]},
        {:store_get_correlated, [store_ref, 1]},
        {:store_causal_chain, [store_ref, 1]},
        {:store_call_contents, [store_ref, 1, 10]},
        {:store_children, [store_ref, 1, 10]},
        {:pipe_new,
         [nil, 1, 64, :drop_oldest, 4096, 1, 10, 1000, 4, 1000, 100, 16, 0, 1000, true]},
        {:pipe_new,
         [ring_ref, 1, 64, :drop_oldest, 4096, 1, 10, 1000, 4, 1000, 100, 16, 0, 1000, true]},
        {:pipe_flush, [pipe_ref, 100]},
        {:pipe_scale, [pipe_ref, 2]},
        {:pipe_configure, [pipe_ref, :batch_size, 10]},
        {:pipe_metrics, [pipe_ref]},
        {:pipe_dead_letters, [pipe_ref, 10]},
        {:pipe_inject_failures, [pipe_ref, 0]},
        {:pipe_inject_delay, [pipe_ref, 0]},
        {:pipe_process_ring, [pipe_ref, ring_ref, 10]},
        {:pipe_sweep, [pipe_ref]},
        {:pipe_reset_latency, [pipe_ref]},
        {:pipe_alive, [pipe_ref]},
        {:pipe_correlation_dump, [pipe_ref, 10]},
        {:pipe_worker_lease, [pipe_ref, 1]},
        {:pipe_workers, [pipe_ref]},
        {:pipe_worker_forget, [pipe_ref, 1]},
        {:pipe_worker_release, [lease_ref]},
        {:rb_writer_claim, [ring_ref, "sweep2"]},
        {:rb_writer_set_position, [ring_ref, cursor_ref, 0]},
        {:pipe_writer_step, [pipe_ref, ring_ref, cursor_ref, 10]},
        {:rb_writer_info, [ring_ref, cursor_ref]},
        {:pipe_shutdown, [pipe_ref, 1000]},
        {:corr_new, [1_000_000, 16]},
        {:corr_batch, [corr_ref, [1, :e]]},
        {:corr_batch, [corr_ref, Enum.to_list(1..1_500)]},
        {:corr_batch_dirty, [corr_ref, [1, :e]]},
        {:corr_metadata, [corr_ref, 1]},
        {:corr_chain, [corr_ref, 1]},
        {:corr_sweep, [corr_ref]},
        {:corr_metrics, [corr_ref]},
        {:tracer_new, [ring_ref, me, true, true, 64, 64, 10, 10, 1000, [], nil]},
        {:tracer_new,
         [ring_ref, me, false, true, 64, 128, 10, 10, 1000, callbacks, [{M, :_, :_}]]},
        {:tracer_discard, [me]},
        {:enabled, [:call, tracer_ref, me]},
        {:enabled, [:trace_status, tracer_ref, me]},
        {:trace, [:call, tracer_ref, me, {M, :f, [1]}, %{}]},
        {:trace, [:return_from, tracer_ref, me, {M, :f, 1}, %{extra: :r}]},
        {:trace, [:exception_from, tracer_ref, me, {M, :f, 1}, %{extra: {:error, :x}}]},
        {:trace, [:send, tracer_ref, me, :m, %{extra: :code_server}]},
        {:trace, [:receive, tracer_ref, me, :m, %{}]},
        {:trace, [:spawn, tracer_ref, me, me, %{extra: {M, :f, []}}]},
        {:trace, [:link, tracer_ref, me, me, %{}]},
        {:trace, [:call, tracer_ref, me, {M, :handle_call, [:req, {me, make_ref()}, %{}]}, %{}]},
        {:trace, [:return_from, tracer_ref, me, {M, :handle_call, 3}, %{extra: {:reply, 1, 2}}]},
        {:trace, [:return_from, tracer_ref, me, {M, :init, 1}, %{extra: :bad_shape}]},
        {:tracer_snapshotting, [tracer_ref, true]},
        {:trace, [:receive, tracer_ref, me, {:system, {me, make_ref()}, :x}, %{}]},
        {:tracer_snapshotting, [tracer_ref, false]},
        {:tracer_snapshot, [tracer_ref, %{n: 1}, M, false]},
        {:tracer_stats, [tracer_ref]},
        {:tracer_state_drops, [tracer_ref]},
        {:tracer_stop, [tracer_ref, :stopped]},
        {:ana_get, [store_ref, 1]},
        {:ana_traceback, [store_ref, 1]},
        {:ana_range, [store_ref, 1, 10]},
        {:ana_step, [store_ref, 1, :process, true]},
        {:ana_step, [store_ref, 1, :global, false]},
        {:ana_call_stats, [store_ref, :function, [M]]},
        {:ana_top_trees, [store_ref, 10, 2, 2]},
        {:ana_messages, [store_ref, nil, 0, 10]},
        {:ana_select, [store_ref, 0, me, M, :f, 4, 0, 10, 5]},
        {:ana_snapshot, [store_ref]},
        {:ana_select, [snap_ref, 0, me, M, :f, 4, 0, 10, 5]},
        {:ana_messages, [snap_ref, nil, 0, 10]},
        {:ana_snapshot_release, [snap_ref]},
        {:ana_select_time, [store_ref, 0, -1, me, M, :f, 4, 10, 5]},
        {:ana_select_time_quick, [store_ref, 0, -1, me, M, :f, 4, 10, 5]},
        {:ana_quick, [store_ref, :range, 1, 10]},
        {:ana_quick, [store_ref, :traceback, 1, 0]},
        {:qry_query, [store_ref, %{pid: me, from: 0, linked_to: 3}, false, 10, nil, :entry]},
        {:qry_query_quick,
         [store_ref, %{pid: me, from: 0, linked_to: 3}, false, 10, nil, :entry]},
        {:qry_related, [store_ref, 1, 3, 100]},
        {:pipe_latency_buckets, [pipe_ref]},
        {:sub_new, [pipe_ref, me, %{types: 4, pid: me}, 10]},
        {:sub_stats, [sub_ref]},
        {:sub_list, [pipe_ref]},
        {:sub_backlog, [sub_ref, 1, 0]},
        {:sub_flush, [pipe_ref, 10]},
        {:sub_set_watcher, [pipe_ref, me]},
        {:sub_cancel_id, [pipe_ref, sub_id + 1_000_000]},
        {:sub_cancel, [sub_ref]},
        {:tf_save,
         [
           store_ref,
           tmp_path(),
           {"n@h", 0, 0, "w", "25", %{m: 1}},
           [{me, "me"}],
           :zstd,
           1,
           16,
           false
         ]},
        {:tf_info, [saved, 10]},
        {:tf_load, [[saved], 0, false, 10]},
        {:tf_names, [store_ref]},
        {:tf_store_pids, [store_ref]},
        {:tf_limits, []},
        {:ana_state_at, [store_ref, me, 10]},
        {:ana_state_at_fast, [store_ref, me, 10]},
        {:ana_state_history, [store_ref, me, 0, 10, 10]},
        {:ana_state_processes, [store_ref]},
        {:ana_add_state_gaps, [store_ref, [{me, 1, 2}, {:all, 3, 4}]]},
        {:ana_why, [store_ref, 1]},
        {:ana_result, [store_ref, 1]},
        {:export_file,
         [
           store_ref,
           tmp_path(),
           :chrome_trace,
           {:own_time, 160, 512, true, "t", "n@h"},
           [{me, "me"}]
         ]},
        {:store_destroy, [store_ref]},
        {:rb_destroy, [ring_ref]}
      ]

      exported = Native.__info__(:functions) -- [load_nif: 0]
      assert Enum.sort(Enum.uniq(for {f, a} <- calls, do: {f, length(a)})) == Enum.sort(exported)

      violations =
        for {fun, args} <- calls,
            pos <- Enum.to_list(0..(length(args) - 1)//1),
            bad <- bad_values(),
            # rb_new with a valid-looking huge size would really allocate.
            not (fun == :rb_new and pos == 0),
            # Any binary is a valid path: tf_save's are swept in TraceFile's.
            not (fun in [:tf_save, :export_file] and pos == 1),
            reduce: [] do
          acc ->
            args = List.replace_at(args, pos, bad)

            case classify(fn -> apply(Native, fun, args) end) do
              {:returned, _} -> acc
              {:argument_error, _} -> acc
              other -> [{{Native, fun, args}, other} | acc]
            end
        end

      # The NIFs do not validate beyond their types; reading back whatever
      # was stored (e.g. a non-atom module) must work.
      {events, _} =
        RingBuffer.read_batch(
          %RingBuffer{ref: ring_ref, size: 16, overflow_strategy: :drop_oldest},
          0,
          100
        )

      assert is_list(events)

      assert violations == [], format_violations(violations)
      assert_fresh_ring_works()
    end
  end

  describe "QueryCoordinator" do
    alias ElixirScope.Capture.PipelineManager
    alias ElixirScope.Storage.QueryCoordinator

    setup do
      pm = start_supervised!({PipelineManager, name: nil, shards: 1, async_writer_pool_size: 1})
      %{pm: pm}
    end

    test "bad filters raise ArgumentError naming the key", %{pm: pm} do
      bad = [
        [pid: :not_a_pid],
        [module: "Mod"],
        [function: 1],
        [arity: -1],
        [arity: 1000],
        [types: [:call, :bogus]],
        [types: []],
        [types: :call],
        [correlation_id: -5],
        [correlation_id: :c],
        [node: "n@h"],
        [args: {:x}],
        [args: [:not_a_clause]],
        [message: [{:_, :not_a_list, []}]],
        [bogus: 1],
        :not_a_keyword,
        [{"pid", self()}]
      ]

      for f <- bad do
        e = assert_raise ArgumentError, fn -> QueryCoordinator.subscribe(pm, f) end
        assert e.message =~ ~r/filter|unknown|keyword/, "#{inspect(f)}: #{e.message}"
      end

      # Match specifications the native compiler refuses come back as errors.
      for spec <- [
            [{:_, [{:no_such_guard, :"$1"}], [true]}],
            [{:"$1", [{:>, :"$2", 1}], [true]}],
            [{:"$99", [], [true]}],
            [{%{:"$1" => 1}, [], [true]}]
          ] do
        assert {:error, {:bad_filter, msg}} = QueryCoordinator.subscribe(pm, message: spec)
        assert msg =~ "message"
      end

      assert QueryCoordinator.subscriptions(pm) == []
    end

    test "a non-pid or remote subscriber and bad options raise", %{pm: pm} do
      for bad <- [:me, "pid", 1, make_ref(), {self()}] do
        assert_raise ArgumentError, ~r/subscriber/, fn ->
          QueryCoordinator.subscribe(pm, [], subscriber: bad)
        end
      end

      assert_raise ArgumentError, ~r/max_queue/, fn ->
        QueryCoordinator.subscribe(pm, [], max_queue: 0)
      end

      assert_raise ArgumentError, ~r/unknown subscribe option/, fn ->
        QueryCoordinator.subscribe(pm, [], bogus: 1)
      end

      assert_raise ArgumentError, fn -> QueryCoordinator.unsubscribe(make_ref()) end
      assert_raise ArgumentError, fn -> QueryCoordinator.stats(:nope) end
    end

    test "query/2 and correlation_search/3: bad specs raise, unknown pipelines are errors",
         %{pm: pm} do
      store = PipelineManager.data_access(pm)

      for spec <- [
            [pid: 1],
            [from: :yesterday],
            [to: 1.5],
            [linked_to: "x"],
            [limit: -1],
            [order: :up],
            [as: :json],
            [cursor: -3],
            [cursor: "next"],
            [bogus: 1],
            :not_a_list,
            [args: [:bad]]
          ] do
        assert_raise ArgumentError, fn -> QueryCoordinator.query(store, spec) end
      end

      assert QueryCoordinator.query(:no_such_pipeline, []) == {:error, :unknown_pipeline}
      assert QueryCoordinator.query("store", []) == {:error, :unknown_pipeline}
      assert_raise ArgumentError, fn -> QueryCoordinator.correlation_search(store, -1) end
      assert_raise ArgumentError, fn -> QueryCoordinator.correlation_search(store, :id) end

      assert_raise ArgumentError, fn ->
        QueryCoordinator.correlation_search(store, 1, depth: 0)
      end

      assert_raise ArgumentError, fn ->
        QueryCoordinator.correlation_search(store, 1, bogus: 1)
      end

      assert QueryCoordinator.correlation_search(:no_such_pipeline, 1) ==
               {:error, :unknown_pipeline}

      {:ok, destroyed} = DataAccess.new(max_events: 4)
      :ok = DataAccess.destroy(destroyed)
      assert_raise ArgumentError, fn -> QueryCoordinator.query(destroyed, []) end
      assert_raise ArgumentError, fn -> QueryCoordinator.correlation_search(destroyed, 1) end
    end

    test "an unknown pipeline is {:error, :unknown_pipeline}" do
      dead = spawn(fn -> :ok end)
      ref = Process.monitor(dead)
      assert_receive {:DOWN, ^ref, _, _, _}

      for p <- [:no_such_pipeline, dead, self(), "x", nil, {:via, :nope, 1}] do
        assert QueryCoordinator.subscribe(p, []) == {:error, :unknown_pipeline}
        assert QueryCoordinator.subscriptions(p) == {:error, :unknown_pipeline}
        assert QueryCoordinator.flush(p, 10) == {:error, :unknown_pipeline}
      end
    end
  end

  describe "AsyncWriter and AsyncWriterPool" do
    alias ElixirScope.Capture.{AsyncWriter, AsyncWriterPool}

    # Starts that succeed are stopped at once; the result is classified.
    defp start_result({:ok, pid}) when is_pid(pid), do: tap(true, fn _ -> GenServer.stop(pid) end)
    defp start_result({:error, _}), do: true
    defp start_result(_), do: false

    test "bad options, positions and sizes: ArgumentError or {:error, _}, never a crash" do
      Process.flag(:trap_exit, true)
      buf = new_ring!(size: 64)

      writer_opts =
        for key <- [:batch_size, :poll_interval_ms, :max_backlog, :pipeline],
            bad <- bad_values() do
          {AsyncWriter, :start_link, [[{:ring_buffer, buf}, {key, bad}]]}
        end

      pool_opts =
        for key <- [:pool_size, :batch_size, :max_events, :shards], bad <- bad_values() do
          {AsyncWriterPool, :start_link, [[{key, bad}]]}
        end

      starts =
        writer_opts ++
          pool_opts ++
          for bad <- bad_values() do
            {AsyncWriter, :start_link, [bad]}
          end ++
          for(bad <- bad_values(), do: {AsyncWriterPool, :start_link, [bad]}) ++
          for(bad <- bad_values(), do: {AsyncWriterPool, :start_link, [[ring_buffer: bad]]})

      violations =
        Enum.flat_map(starts, fn call ->
          check_call(call, &(start_result(&1) or match?({:error, _}, &1)))
        end)

      # A writer with any ring_buffer value starts (and counts read errors).
      for bad <- bad_values() do
        assert {:ok, w} = AsyncWriter.start_link(ring_buffer: bad, poll_interval_ms: 1)
        assert is_integer(AsyncWriter.get_state(w).error_count)
        :ok = AsyncWriter.stop(w)
      end

      {:ok, w} = AsyncWriter.start_link(ring_buffer: buf, poll_interval_ms: 60_000)
      {:ok, pool} = AsyncWriterPool.start_link(pool_size: 2, shards: 2, ring_size: 64)

      calls =
        for bad <- bad_values() do
          [
            {AsyncWriter, :set_position, [w, bad]},
            {AsyncWriter, :enrich_event, [bad]},
            {AsyncWriterPool, :scale_pool, [pool, bad]},
            {AsyncWriterPool, :flush, [pool, bad]}
          ]
        end

      violations =
        violations ++
          Enum.flat_map(List.flatten(calls), fn call ->
            check_call(call, fn r -> r == :ok or match?({:error, _}, r) or is_map(r) end)
          end)

      assert violations == [], format_violations(violations)
      assert Process.alive?(w) and Process.alive?(pool)
      assert length(AsyncWriterPool.get_state(pool).workers) in 1..64
      :ok = AsyncWriter.stop(w)
      :ok = AsyncWriterPool.stop(pool)
      assert_fresh_ring_works()
    end
  end

  describe "specific wrong inputs" do
    test "runtime-tracing structs with any value in any field are written and read back equal" do
      me = self()

      structs = [
        %Events.MessageSent{from_pid: me, to_pid: me, message: :m},
        %Events.MessageReceived{pid: me, message: :m},
        %Events.CallbackReply{server_pid: me, pid: me, call_id: 1, reply: :ok},
        # issue-17a: the original's fields of these (pid, correlation, times)
        %Events.FunctionEntry{module: M, function: :f, arity: 0, pid: me, call_id: 1},
        %Events.FunctionExit{module: M, function: :f, pid: me, call_id: 1, exit_reason: :normal},
        %Events.ProcessExit{exited_pid: me, pid: me, exit_reason: :normal, reason: :normal},
        %Events.StateChange{server_pid: me, pid: me, old_state: 1, new_state: 2},
        %Events.StateSnapshot{server_pid: me, pid: me, state: 1, session_id: 1}
      ]

      buf = new_ring!(size: 64)

      {:ok, pm} = ElixirScope.Capture.PipelineManager.start_link(name: nil, shards: 1)
      pbuf = ElixirScope.Capture.PipelineManager.ring_buffer(pm)

      written =
        for s <- structs, key <- Map.keys(s) -- [:__struct__], bad <- bad_values() do
          e = Map.put(s, key, bad)
          assert RingBuffer.write(buf, e) == :ok
          assert {[^e], _} = RingBuffer.read_batch(buf, RingBuffer.stats(buf).read_position, 1)
          assert RingBuffer.write(pbuf, e) == :ok
          e
        end

      :ok = ElixirScope.Capture.PipelineManager.flush(pm)
      store = ElixirScope.Capture.PipelineManager.data_access(pm)
      {:ok, stored} = DataAccess.query_by_time_range(store, -(1 <<< 62), 1 <<< 62, limit: 100_000)
      assert stored == written
      :ok = ElixirScope.Capture.PipelineManager.shutdown(pm)
      assert_fresh_ring_works()
    end

    test "a fake %RingBuffer{} whose ref is not a ring raises ArgumentError everywhere" do
      fake = fake_ring()

      for f <- [
            fn -> RingBuffer.write(fake, 1) end,
            fn -> RingBuffer.write_batch(fake, [1]) end,
            fn -> RingBuffer.read(fake, 0) end,
            fn -> RingBuffer.read_batch(fake, 0, 1) end,
            fn -> RingBuffer.stats(fake) end,
            fn -> RingBuffer.clear(fake) end,
            fn -> RingBuffer.destroy(fake) end,
            fn -> Ingestor.ingest_function_call(fake, M, :f, [], nil, nil) end,
            fn -> Ingestor.ingest_generic_event(fake, :t, %{}, nil, nil, 0, 0) end,
            fn -> Ingestor.create_fast_ingestor(fake).(:x) end
          ] do
        assert_raise ArgumentError, f
      end

      # Only the struct is looked at.
      assert RingBuffer.size(fake) == 8
    end

    test "a struct of another type or a plain map is not a buffer" do
      for other <- [%URI{}, %{ref: make_ref(), size: 8}, %Events{}] do
        assert_raise ArgumentError, ~r/RingBuffer/, fn -> RingBuffer.write(other, 1) end
        assert_raise ArgumentError, ~r/RingBuffer/, fn -> RingBuffer.stats(other) end
        assert_raise ArgumentError, ~r/RingBuffer/, fn -> RingBuffer.size(other) end

        assert_raise ArgumentError, ~r/RingBuffer/, fn ->
          Ingestor.ingest_error(other, :e, :m, [])
        end
      end
    end

    test "positions and counts that are negative, floats or beyond 64 bits" do
      buf = new_ring!(size: 8)
      :ok = RingBuffer.write(buf, 1)

      for bad <- [-1, 1.0, :zero, nil, "0"] do
        assert_raise ArgumentError, fn -> RingBuffer.read(buf, bad) end
        assert_raise ArgumentError, fn -> RingBuffer.read_batch(buf, bad, 1) end
        assert_raise ArgumentError, fn -> RingBuffer.read_batch(buf, 0, bad) end
      end

      assert_raise ArgumentError, fn -> RingBuffer.read(buf, 1 <<< 64) end
      assert_raise ArgumentError, fn -> RingBuffer.read_batch(buf, 1 <<< 70, 1) end
      assert RingBuffer.read(buf, (1 <<< 64) - 1) == :empty
      # A huge count is just "everything"; position 0 is consumed after the first.
      assert RingBuffer.read_batch(buf, 0, (1 <<< 64) - 1) == {[1], 1}
      assert RingBuffer.read_batch(buf, 0, 1 <<< 70) == {[], 1}
      assert RingBuffer.write(buf, 2) == :ok
      assert RingBuffer.read_batch(buf, 1, 1 <<< 70) == {[2], 2}
    end
  end

  describe "huge terms" do
    test "a 50 MB binary is written quickly and truncated" do
      buf = new_ring!(size: 8)
      big = :binary.copy(<<7>>, 50_000_000)

      {us, :ok} = :timer.tc(fn -> RingBuffer.write(buf, big) end)
      assert us < 1_000_000, "writing a 50 MB binary took #{us} us"

      {us, :ok} = :timer.tc(fn -> RingBuffer.write(buf, %{blob: big, id: 1}) end)
      assert us < 1_000_000

      {us, {:ok, 2}} = :timer.tc(fn -> RingBuffer.write_batch(buf, [big, {big}]) end)
      assert us < 1_000_000

      assert {[a, b, c, d], 4} = RingBuffer.read_batch(buf, 0, 10)
      assert {:truncated, n, :binary} = a
      assert n >= 50_000_000
      assert %{blob: {:truncated, _, :binary}, id: 1} = b
      assert {:truncated, _, :binary} = c
      assert {:truncated, _, :tuple} = d
      assert RingBuffer.stats(buf).truncated_events == 4
    end

    test "a 1M-element list argument to ingest_function_call is truncated" do
      buf = new_ring!(size: 8)
      args = Enum.to_list(1..1_000_000)

      {us, :ok} = :timer.tc(fn -> Ingestor.ingest_function_call(buf, M, :f, args, self(), :c) end)

      assert us < 1_000_000, "ingesting a 1M-element list took #{us} us"

      assert {:ok, %Events.FunctionExecution{} = ev, 1} = RingBuffer.read(buf, 0)
      # arity is counted up to 65,535 cells (bounded work per call)
      assert ev.arity == 65_535
      assert {:truncated, n, :list} = ev.args
      assert n > 0
      assert ev.correlation_id == :c
      assert :erlang.external_size(ev) < 4 * 8192
    end

    test "10_000 distinct large maps stay within the ring's bounds" do
      size = 1024
      max = 8192
      buf = new_ring!(size: size, max_event_bytes: max)

      for i <- 1..10_000 do
        map =
          if rem(i, 2) == 0 do
            # struct-like (<= 32 keys): truncated field by field
            %{id: i, blob: :binary.copy(<<i::32>>, 5_000), tags: Enum.to_list(1..50)}
          else
            # > 32 keys: truncated as a whole
            Map.new(1..40, fn k -> {k, :binary.copy(<<i::32, k::32>>, 100)} end)
          end

        assert RingBuffer.write(buf, map) == :ok
      end

      stats = RingBuffer.stats(buf)
      assert stats.total_writes == 10_000
      assert stats.available_events == size
      assert stats.utilization == 1.0
      assert stats.dropped.overflow == 10_000 - size
      assert stats.truncated_events == 10_000
      assert_accounting(stats, 10_000)

      {events, 10_000, missed} = drain(buf, 0)
      assert length(events) == size
      assert missed == 10_000 - size

      for ev <- events do
        assert :erlang.external_size(ev) < 2 * max

        case ev do
          %{id: id, blob: {:truncated, n, :binary}, tags: tags} ->
            assert rem(id, 2) == 0 and n >= 20_000 and tags == Enum.to_list(1..50)

          {:truncated, n, :map} ->
            assert n > max
        end
      end

      assert_accounting(RingBuffer.stats(buf), 10_000)
    end
  end
end

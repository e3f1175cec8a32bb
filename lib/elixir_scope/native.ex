defmodule ElixirScope.Native do
  @moduledoc false
  # Every NIF of the `elixir_scope_nif` crate, with a stub that raises until
  # the library is loaded. Names are prefixed by component: `rb_*` ring
  # buffer, `ing_*` ingestor,
  # `store_*` event store (DataAccess), `pipe_*` native pipeline, `corr_*`
  # correlator (EventCorrelator), `tracer_*` plus `enabled/3` and `trace/5`
  # (this module is the erl_tracer module of `ElixirScope.trace/2`), `ana_*`
  # trace analysis (ElixirScope.Analysis), `utils_*` clocks and time ids
  # (ElixirScope.Utils), `sub_*` live subscriptions and `qry_*` queries
  # (QueryCoordinator), `tf_*` trace files (ElixirScope.TraceFile). No logic
  # lives here.

  @on_load :load_nif
  @compile {:autoload, true}

  @doc false
  def load_nif do
    path = :filename.join(:code.priv_dir(:elixir_scope), ~c"native/libelixir_scope_nif")

    case :erlang.load_nif(path, 0) do
      :ok ->
        :ok

      {:error, {:reload, _}} ->
        :ok

      {:error, reason} ->
        require Logger
        Logger.error("ElixirScope: could not load the NIF at #{path}: #{inspect(reason)}")
        :abort
    end
  end

  defp nif_error, do: :erlang.nif_error(:nif_not_loaded)

  # Ids
  def next_event_id, do: nif_error()

  # Result structs (#15c): bench switch between shared-keys structs and
  # `enif_make_map_from_arrays`
  def debug_shared_struct_keys(_on), do: nif_error()
  # ... and the Ingestor's call NIF behind rustler's own wrapper
  def debug_ing_function_call_wrapped(_ref, _m, _f, _args, _pid, _corr), do: nif_error()
  # ... and the calling scheduler thread's CPU clock (benches)
  def debug_thread_cpu_ns, do: nif_error()
  def debug_process_cpu_ns, do: nif_error()

  # Utils (ElixirScope.Utils): native clocks and time ids
  def utils_monotonic_ns, do: nif_error()
  def utils_wall_ns, do: nif_error()
  def utils_generate_id, do: nif_error()
  def utils_id_timestamp(_id), do: nif_error()

  # Ring buffer
  def rb_new(_size, _strategy, _max_event_bytes), do: nif_error()
  def rb_write(_ref, _event), do: nif_error()
  def rb_write_batch(_ref, _events), do: nif_error()
  def rb_read(_ref, _position), do: nif_error()
  def rb_read_batch(_ref, _position, _count), do: nif_error()
  def rb_stats(_ref), do: nif_error()
  def rb_clear(_ref), do: nif_error()
  def rb_destroy(_ref), do: nif_error()
  def rb_live_count, do: nif_error()
  def shard_of_pid(_pid, _shards), do: nif_error()

  # Ingestor
  def ing_function_call(_ref, _module, _function, _args, _caller_pid, _correlation_id),
    do: nif_error()

  def ing_function_return(_ref, _return_value, _duration_ns, _correlation_id), do: nif_error()
  def ing_process_spawn(_ref, _parent_pid, _child_pid), do: nif_error()
  def ing_message_send(_ref, _from_pid, _to_pid, _message), do: nif_error()
  def ing_state_change(_ref, _server_pid, _old_state, _new_state), do: nif_error()
  def ing_state_snapshot(_ref, _server_pid, _state, _reason, _sequence_number), do: nif_error()
  def ing_performance_metric(_ref, _name, _value, _metadata), do: nif_error()
  def ing_error(_ref, _error_type, _message, _stacktrace), do: nif_error()
  def ing_message_receive(_ref, _receiver_pid, _message), do: nif_error()
  def ing_process_exit(_ref, _pid, _reason), do: nif_error()

  def ing_function_exception(_ref, _kind, _reason, _duration_ns, _correlation_id),
    do: nif_error()

  # Event store (DataAccess)
  def store_new(_max_events), do: nif_error()

  def store_put(_ref, _id, _timestamp, _pid, _module, _function, _correlation, _keys, _event),
    do: nif_error()

  def store_put_batch(_ref, _entries), do: nif_error()
  def store_try_put_batch(_ref, _entries), do: nif_error()
  def store_quick(_ref, _op, _a, _b, _limit, _desc), do: nif_error()
  def store_get(_ref, _id), do: nif_error()
  def store_by_pid(_ref, _pid, _limit, _desc), do: nif_error()
  def store_by_function(_ref, _module, _function, _limit, _desc), do: nif_error()
  def store_by_correlation(_ref, _correlation, _limit, _desc), do: nif_error()
  def store_by_event_type(_ref, _key, _limit, _desc), do: nif_error()
  def store_by_ast_node(_ref, _key, _limit, _desc), do: nif_error()
  def store_index_sizes(_ref), do: nif_error()
  def store_by_time_range(_ref, _t0, _t1, _limit, _desc), do: nif_error()
  def store_evict(_ref, _cutoff, _now_ms), do: nif_error()
  def store_stats(_ref), do: nif_error()
  def store_destroy(_ref), do: nif_error()
  def store_get_correlated(_ref, _id), do: nif_error()
  def store_causal_chain(_ref, _id), do: nif_error()
  def store_call_contents(_ref, _id, _limit), do: nif_error()
  def store_children(_ref, _id, _limit), do: nif_error()

  # Pipeline (PipelineManager, AsyncWriterPool, AsyncWriter)
  def pipe_new(
        _ring_or_nil,
        _shards,
        _shard_capacity,
        _strategy,
        _max_event_bytes,
        _workers,
        _batch_size,
        _flush_interval_us,
        _max_dead_letters,
        _ttl_ms,
        _max_correlations,
        _max_events,
        _max_age_ms,
        _sweep_interval_ms,
        _correlation_enabled
      ),
      do: nif_error()

  def pipe_flush(_ref, _timeout_ms), do: nif_error()
  def pipe_scale(_ref, _workers), do: nif_error()
  def pipe_configure(_ref, _name, _value), do: nif_error()
  def pipe_metrics(_ref), do: nif_error()
  def pipe_dead_letters(_ref, _limit), do: nif_error()
  def pipe_inject_failures(_ref, _n), do: nif_error()
  def pipe_inject_delay(_ref, _us), do: nif_error()
  def pipe_process_ring(_ref, _ring, _max), do: nif_error()
  def pipe_sweep(_ref), do: nif_error()
  def pipe_reset_latency(_ref), do: nif_error()
  def pipe_latency_buckets(_ref), do: nif_error()
  def pipe_shutdown(_ref, _timeout_ms), do: nif_error()
  def pipe_alive(_ref), do: nif_error()
  def pipe_correlation_dump(_ref, _limit), do: nif_error()

  # Writer processes (AsyncWriterPool workers' leases, AsyncWriter cursors)
  def pipe_worker_lease(_ref, _index), do: nif_error()
  def pipe_worker_release(_lease), do: nif_error()
  def pipe_worker_forget(_ref, _index), do: nif_error()
  def pipe_workers(_ref), do: nif_error()
  def rb_writer_claim(_ring, _key), do: nif_error()
  def pipe_writer_step(_ref, _ring, _cursor, _max), do: nif_error()
  def rb_writer_set_position(_ring, _cursor, _position), do: nif_error()
  def rb_writer_info(_ring, _cursor), do: nif_error()

  # Live subscriptions (QueryCoordinator)
  def sub_new(_pipe, _pid, _filter, _max_queue), do: nif_error()
  def sub_cancel(_sub), do: nif_error()
  def sub_cancel_id(_pipe, _id), do: nif_error()
  def sub_backlog(_sub, _sent, _len), do: nif_error()
  def sub_stats(_sub), do: nif_error()
  def sub_list(_pipe), do: nif_error()
  def sub_set_watcher(_pipe, _pid), do: nif_error()
  def sub_flush(_pipe, _timeout_ms), do: nif_error()

  # Queries (QueryCoordinator)
  def qry_query(_store, _filter, _desc, _limit, _cursor, _as), do: nif_error()
  def qry_query_quick(_store, _filter, _desc, _limit, _cursor, _as), do: nif_error()
  def qry_related(_store, _id, _depth, _limit), do: nif_error()

  # Correlator (EventCorrelator)
  def corr_new(_ttl_ns, _max_correlations), do: nif_error()
  def corr_batch(_ref, _events), do: nif_error()
  def corr_batch_dirty(_ref, _events), do: nif_error()
  def corr_metadata(_ref, _id), do: nif_error()
  def corr_chain(_ref, _id), do: nif_error()
  def corr_sweep(_ref), do: nif_error()
  def corr_metrics(_ref), do: nif_error()

  # Tracer (ElixirScope.Tracer): this module is the erl_tracer callback
  # module; `enabled/3` and `trace/5` are called by the VM.
  def tracer_new(
        _ring,
        _owner,
        _arity_only,
        _record,
        _max_payload_bytes,
        _max_state_bytes,
        _max_events,
        _max_rate,
        _duration_ms,
        _callbacks,
        _only
      ),
      do: nif_error()

  def tracer_discard(_owner), do: nif_error()
  def tracer_stop(_tracer, _why), do: nif_error()
  def tracer_stats(_tracer), do: nif_error()
  def tracer_snapshotting(_tracer, _on), do: nif_error()
  def tracer_snapshot(_tracer, _state, _module, _statem), do: nif_error()
  def tracer_state_drops(_tracer), do: nif_error()
  def enabled(_tag, _tracer_state, _tracee), do: nif_error()
  def trace(_tag, _tracer_state, _tracee, _trace_term, _opts), do: nif_error()

  # Trace files (ElixirScope.TraceFile)
  def tf_save(_store, _path, _header, _names, _compression, _level, _block_events, _sync),
    do: nif_error()

  def tf_info(_path, _max_new_atoms), do: nif_error()
  def tf_load(_paths, _max_events, _strict, _max_new_atoms), do: nif_error()
  def tf_names(_store), do: nif_error()
  def tf_store_pids(_store), do: nif_error()
  def tf_limits, do: nif_error()

  # Exports (ElixirScope.Export)
  def export_file(_store, _path, _format, _opts, _names), do: nif_error()

  # Trace analysis (ElixirScope.Analysis)
  def ana_get(_store, _id), do: nif_error()
  def ana_traceback(_store, _id), do: nif_error()
  def ana_range(_store, _id, _limit), do: nif_error()

  # `ana_range/3` (`:range`; `:range_of` resolves a return or exception id to its call first)
  # or `ana_traceback/2` (`:traceback`) on the caller's scheduler, or `:busy`.
  def ana_quick(_store, _op, _id, _limit), do: nif_error()
  def ana_step(_store, _id, _scope, _forward), do: nif_error()
  def ana_call_stats(_store, _by, _modules), do: nif_error()
  def ana_top_trees(_store, _max, _min_count, _min_size), do: nif_error()
  def ana_messages(_store, _pid, _cursor, _limit), do: nif_error()
  # `store` a store or a snapshot (`ana_snapshot/1`, read without the store lock).
  # At most `limit` hits; past the limit the cursor continues after the last hit.
  def ana_select(_store, _cursor, _pid, _module, _function, _kinds, _t0, _t1, _limit),
    do: nif_error()

  def ana_snapshot(_store), do: nif_error()
  def ana_snapshot_release(_snapshot), do: nif_error()

  # At most `limit` hits (and at most one chunk's).
  def ana_select_time(
        _store,
        _after_ts,
        _after_seq,
        _pid,
        _module,
        _function,
        _kinds,
        _t1,
        _limit
      ),
      do: nif_error()

  # `ana_select_time/9` on the caller's scheduler for small chunks, or `:busy`.
  def ana_select_time_quick(
        _store,
        _after_ts,
        _after_seq,
        _pid,
        _module,
        _function,
        _kinds,
        _t1,
        _limit
      ),
      do: nif_error()

  def ana_state_at(_store, _pid, _ts), do: nif_error()
  def ana_state_at_fast(_store, _pid, _ts), do: nif_error()
  def ana_state_history(_store, _pid, _t0, _t1, _limit), do: nif_error()
  def ana_state_processes(_store), do: nif_error()
  def ana_add_state_gaps(_store, _gaps), do: nif_error()
  def ana_why(_store, _id), do: nif_error()
  def ana_result(_store, _call_id), do: nif_error()
end

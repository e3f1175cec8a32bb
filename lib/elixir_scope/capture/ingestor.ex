defmodule ElixirScope.Capture.Ingestor do
  @moduledoc """
  The hot path from instrumented code into a `RingBuffer`.

  Each `ingest_*` function hands its fields straight to the native side,
  which builds the event in the ring slot without building or walking an
  Elixir struct; reading the ring gives back the `ElixirScope.Events`
  struct the original ElixirScope produced (`FunctionExecution`,
  `ProcessEvent`, `MessageEvent`, `StateChange`, `PerformanceMetric`,
  `ErrorEvent`). Every event gets a unique `id` and the VM's monotonic and
  wall-clock timestamps (ns).

  Large arguments, return values, messages, reasons and states are
  truncated to the ring's `:max_event_bytes`, visibly: the whole field
  becomes `{:truncated, at_least_bytes, kind}` (`kind` is `:binary`,
  `:list`, `:map`, `:tuple`, `:term` or `:depth`), as the original's
  `Utils.truncate_data/2` made it `{:truncated, size, type_hint}`. A state
  (`ingest_state_change/4`) and a metric's metadata, when they are small
  maps, are cut value by value instead, so a state record keeps what fits.

  Each function returns the ring's write result: `:ok`,
  `{:error, :buffer_full}` or `{:error, :destroyed}`. Arguments of the
  wrong type raise `ArgumentError`.

      iex> {:ok, buf} = ElixirScope.Capture.RingBuffer.new(size: 16)
      iex> ElixirScope.Capture.Ingestor.ingest_function_call(buf, String, :upcase, ["a"], self(), 7)
      :ok
      iex> {[event], 1} = ElixirScope.Capture.RingBuffer.read_batch(buf, 0, 10)
      iex> {event.module, event.function, event.arity, event.args, event.event_type}
      {String, :upcase, 1, ["a"], :call}
  """

  alias ElixirScope.Capture.RingBuffer
  alias ElixirScope.Events
  alias ElixirScope.Native
  alias ElixirScope.Utils

  @type ingest_result :: :ok | {:error, :buffer_full | :destroyed}

  @max_i64 0x7FFF_FFFF_FFFF_FFFF
  @max_iterations 10_000_000
  @buffer_key {__MODULE__, :buffer}

  @doc "Records a function call (`%FunctionExecution{event_type: :call}`)."
  @spec ingest_function_call(RingBuffer.t(), module(), atom(), list(), pid() | nil, term()) ::
          ingest_result()
  def ingest_function_call(
        %RingBuffer{ref: ref},
        module,
        function,
        args,
        caller_pid,
        correlation_id
      )
      when is_atom(module) and is_atom(function) and is_list(args) and
             (is_pid(caller_pid) or is_nil(caller_pid)) do
    Native.ing_function_call(ref, module, function, args, caller_pid, correlation_id)
  end

  def ingest_function_call(buffer, module, function, args, caller_pid, _correlation_id) do
    check_buffer!(buffer)
    check!(is_atom(module), "module must be an atom", module)
    check!(is_atom(function), "function must be an atom", function)
    check!(is_list(args), "args must be a list", args)
    check!(false, "caller_pid must be a pid or nil", caller_pid)
  end

  @doc """
  Records a function return (`%FunctionExecution{event_type: :return}`);
  `duration_ns` is a non-negative integer.
  """
  @spec ingest_function_return(RingBuffer.t(), term(), non_neg_integer(), term()) ::
          ingest_result()
  def ingest_function_return(%RingBuffer{ref: ref}, return_value, duration_ns, correlation_id)
      when is_integer(duration_ns) and duration_ns >= 0 and duration_ns <= @max_i64 do
    Native.ing_function_return(ref, return_value, duration_ns, correlation_id)
  end

  def ingest_function_return(buffer, _return_value, duration_ns, _correlation_id) do
    check_buffer!(buffer)
    check!(false, "duration_ns must be a non-negative 64-bit integer", duration_ns)
  end

  @doc "Records a spawn (`%ProcessEvent{event_type: :spawn, pid: child, parent_pid: parent}`)."
  @spec ingest_process_spawn(RingBuffer.t(), pid(), pid()) :: ingest_result()
  def ingest_process_spawn(%RingBuffer{ref: ref}, parent_pid, child_pid)
      when is_pid(parent_pid) and is_pid(child_pid) do
    Native.ing_process_spawn(ref, parent_pid, child_pid)
  end

  def ingest_process_spawn(buffer, parent_pid, child_pid) do
    check_buffer!(buffer)
    check!(is_pid(parent_pid), "parent_pid must be a pid", parent_pid)
    check!(false, "child_pid must be a pid", child_pid)
  end

  @doc """
  Records a message send (`%MessageEvent{event_type: :send}`). `to` may be a
  pid, a port, a registered name or `{name, node}`.
  """
  @spec ingest_message_send(RingBuffer.t(), pid(), pid() | atom() | tuple(), term()) ::
          ingest_result()
  def ingest_message_send(%RingBuffer{ref: ref}, from_pid, to, message)
      when is_pid(from_pid) and (is_pid(to) or is_atom(to) or is_port(to) or is_tuple(to)) do
    Native.ing_message_send(ref, from_pid, to, message)
  end

  def ingest_message_send(buffer, from_pid, to, _message) do
    check_buffer!(buffer)
    check!(is_pid(from_pid), "from_pid must be a pid", from_pid)
    check!(false, "to_pid must be a pid, port, registered name or {name, node}", to)
  end

  @doc """
  Records a message taken from `receiver_pid`'s mailbox
  (`%MessageEvent{event_type: :receive, to_pid: receiver_pid}`). An
  ElixirScope addition: the pipeline links it to the oldest unmatched send
  of equal content to the same receiver.
  """
  @spec ingest_message_receive(RingBuffer.t(), pid(), term()) :: ingest_result()
  def ingest_message_receive(%RingBuffer{ref: ref}, receiver_pid, message)
      when is_pid(receiver_pid) do
    Native.ing_message_receive(ref, receiver_pid, message)
  end

  def ingest_message_receive(buffer, receiver_pid, _message) do
    check_buffer!(buffer)
    check!(false, "receiver_pid must be a pid", receiver_pid)
  end

  @doc """
  Records a process exit (`%ProcessEvent{event_type: :exit, pid: pid,
  reason: reason}`). An ElixirScope addition: the pipeline counts the
  process's open calls as orphaned.
  """
  @spec ingest_process_exit(RingBuffer.t(), pid(), term()) :: ingest_result()
  def ingest_process_exit(%RingBuffer{ref: ref}, pid, reason) when is_pid(pid) do
    Native.ing_process_exit(ref, pid, reason)
  end

  def ingest_process_exit(buffer, pid, _reason) do
    check_buffer!(buffer)
    check!(false, "pid must be a pid", pid)
  end

  @doc """
  Records a function left by an exception (`%FunctionExecution{event_type:
  :exception, return_value: {kind, reason}}`); `kind` is `:error`, `:exit`
  or `:throw`. An ElixirScope addition: it completes its call like a return
  (matched by `correlation_id`, in the calling process).
  """
  @spec ingest_function_exception(
          RingBuffer.t(),
          :error | :exit | :throw,
          term(),
          non_neg_integer(),
          term()
        ) :: ingest_result()
  def ingest_function_exception(%RingBuffer{ref: ref}, kind, reason, duration_ns, correlation_id)
      when kind in [:error, :exit, :throw] and is_integer(duration_ns) and duration_ns >= 0 and
             duration_ns <= @max_i64 do
    Native.ing_function_exception(ref, kind, reason, duration_ns, correlation_id)
  end

  def ingest_function_exception(buffer, kind, _reason, duration_ns, _correlation_id) do
    check_buffer!(buffer)
    check!(kind in [:error, :exit, :throw], "kind must be :error, :exit or :throw", kind)
    check!(false, "duration_ns must be a non-negative 64-bit integer", duration_ns)
  end

  @doc """
  Records a state change (`%StateChange{}`; `state_diff` is `:no_change`
  or `:changed`). In a pipeline it is a *state record* of `server_pid`:
  `ElixirScope.Analysis.state_at/3` and `state_history/2` show
  `new_state` from then on. It reads back with `callback: :unknown`, the
  record's `id`, `timestamp` and `wall_time`, and `pid`,
  `correlation_id`, `trigger_message`, `trigger_call_id` nil (as the
  original's). A `%StateChange{}` written with `RingBuffer.write/2` is
  stored the same way and reads back as written.
  """
  @spec ingest_state_change(RingBuffer.t(), pid(), term(), term()) :: ingest_result()
  def ingest_state_change(%RingBuffer{ref: ref}, server_pid, old_state, new_state)
      when is_pid(server_pid) do
    Native.ing_state_change(ref, server_pid, old_state, new_state)
  end

  def ingest_state_change(buffer, server_pid, _old_state, _new_state) do
    check_buffer!(buffer)
    check!(false, "server_pid must be a pid", server_pid)
  end

  @doc """
  Records the state of `server_pid` now (`%StateSnapshot{}`, with
  `snapshot_reason: reason`). In a pipeline it is a *state record* (see
  `ingest_state_change/4`). For a gen_statem pass `{state_name, data}`,
  as `:sys.get_state/1` returns it. A `%StateSnapshot{}` written with
  `RingBuffer.write/2` is stored the same way.
  """
  @spec ingest_state_snapshot(RingBuffer.t(), pid(), term(), term()) :: ingest_result()
  def ingest_state_snapshot(buffer, server_pid, state, reason \\ nil)

  def ingest_state_snapshot(%RingBuffer{ref: ref}, server_pid, state, reason)
      when is_pid(server_pid) do
    Native.ing_state_snapshot(ref, server_pid, state, reason, nil)
  end

  def ingest_state_snapshot(buffer, server_pid, _state, _reason) do
    check_buffer!(buffer)
    check!(false, "server_pid must be a pid", server_pid)
  end

  @doc "Records a performance metric (`%PerformanceMetric{}`)."
  @spec ingest_performance_metric(RingBuffer.t(), atom() | String.t(), number(), map()) ::
          ingest_result()
  def ingest_performance_metric(buffer, metric_name, value, metadata \\ %{})

  def ingest_performance_metric(%RingBuffer{ref: ref}, metric_name, value, metadata)
      when (is_atom(metric_name) or is_binary(metric_name)) and is_number(value) and
             is_map(metadata) do
    Native.ing_performance_metric(ref, metric_name, value, metadata)
  end

  def ingest_performance_metric(buffer, metric_name, value, metadata) do
    check_buffer!(buffer)

    check!(
      is_atom(metric_name) or is_binary(metric_name),
      "metric name must be an atom or a string",
      metric_name
    )

    check!(is_number(value), "metric value must be a number", value)
    check!(false, "metadata must be a map", metadata)
  end

  @doc "Records an error (`%ErrorEvent{}`); `stacktrace` is a list."
  @spec ingest_error(RingBuffer.t(), term(), term(), list()) :: ingest_result()
  def ingest_error(%RingBuffer{ref: ref}, error_type, message, stacktrace)
      when is_list(stacktrace) do
    Native.ing_error(ref, error_type, message, stacktrace)
  end

  def ingest_error(buffer, _error_type, _message, stacktrace) do
    check_buffer!(buffer)
    check!(false, "stacktrace must be a list", stacktrace)
  end

  @doc """
  Records an event from a runtime component, with the given pid,
  correlation id and timestamps, as the original did: `event_type`
  `:function_entry`, `:function_exit`, `:state_change`, `:state_snapshot`,
  `:process_exit`, `:message_received` and `:message_sent` write the
  `Events` struct of that name built from `event_data` (the original's
  keys and defaults: `:module`, `:function`, `:arity` (0), `:args` ([]),
  `:return_value`, `:duration_ns` (0), `:call_id` (a fresh
  `Utils.generate_id/0`), `:exit_reason` (`:normal`), `:callback`
  (`:unknown`), `:old_state`, `:new_state`, `:state_diff`,
  `:trigger_message`, `:trigger_call_id`, `:state`, `:session_id`,
  `:checkpoint_type` (`:manual`), `:sequence_number` (0), `:reason`,
  `:lifetime_ns` (0), `:message_count`, `:final_state`, `:message`,
  `:to_pid`), with `pid` as the acting process (`server_pid`,
  `exited_pid`, `from_pid` too). Written with a local `pid`, these are
  the structs a ring stores as their kind (see `RingBuffer.write/2`).
  Any other `event_type` is written as an `%ElixirScope.Events{}` whose
  `event_type` is `event_type` and whose `data` is `event_data` (the
  original wrote a `FunctionEntry` of module `:unknown` for those).
  """
  @spec ingest_generic_event(
          RingBuffer.t(),
          atom(),
          map(),
          pid() | nil,
          term(),
          integer(),
          integer()
        ) :: ingest_result()
  def ingest_generic_event(
        %RingBuffer{ref: ref},
        event_type,
        event_data,
        pid,
        correlation_id,
        timestamp,
        wall_time
      )
      when is_atom(event_type) and is_map(event_data) and (is_pid(pid) or is_nil(pid)) and
             is_integer(timestamp) and is_integer(wall_time) do
    event = generic_event(event_type, event_data, pid, correlation_id, timestamp, wall_time)
    Native.rb_write(ref, event)
  end

  def ingest_generic_event(
        buffer,
        event_type,
        event_data,
        pid,
        _correlation_id,
        timestamp,
        wall_time
      ) do
    check_buffer!(buffer)
    check!(is_atom(event_type), "event_type must be an atom", event_type)
    check!(is_map(event_data), "event_data must be a map", event_data)
    check!(is_pid(pid) or is_nil(pid), "pid must be a pid or nil", pid)
    check!(is_integer(timestamp), "timestamp must be an integer", timestamp)
    check!(false, "wall_time must be an integer", wall_time)
  end

  defp generic_event(:function_entry, d, pid, corr, ts, wall) do
    %Events.FunctionEntry{
      timestamp: ts,
      wall_time: wall,
      module: Map.get(d, :module),
      function: Map.get(d, :function),
      arity: Map.get(d, :arity, 0),
      args: Map.get(d, :args, []),
      call_id: Utils.generate_id(),
      pid: pid,
      correlation_id: corr
    }
  end

  defp generic_event(:function_exit, d, pid, corr, ts, wall) do
    %Events.FunctionExit{
      timestamp: ts,
      wall_time: wall,
      module: Map.get(d, :module),
      function: Map.get(d, :function),
      arity: Map.get(d, :arity, 0),
      result: Map.get(d, :return_value),
      duration_ns: Map.get(d, :duration_ns, 0),
      call_id: Map.get_lazy(d, :call_id, &Utils.generate_id/0),
      exit_reason: Map.get(d, :exit_reason, :normal),
      pid: pid,
      correlation_id: corr
    }
  end

  defp generic_event(:state_change, d, pid, corr, ts, wall) do
    %Events.StateChange{
      server_pid: pid,
      callback: Map.get(d, :callback, :unknown),
      old_state: Map.get(d, :old_state),
      new_state: Map.get(d, :new_state),
      state_diff: Map.get(d, :state_diff),
      trigger_message: Map.get(d, :trigger_message),
      trigger_call_id: Map.get(d, :trigger_call_id),
      pid: pid,
      correlation_id: corr,
      timestamp: ts,
      wall_time: wall
    }
  end

  defp generic_event(:state_snapshot, d, pid, corr, ts, wall) do
    %Events.StateSnapshot{
      server_pid: pid,
      state: Map.get(d, :state),
      session_id: Map.get(d, :session_id),
      checkpoint_type: Map.get(d, :checkpoint_type, :manual),
      sequence_number: Map.get(d, :sequence_number, 0),
      pid: pid,
      correlation_id: corr,
      timestamp: ts,
      wall_time: wall
    }
  end

  defp generic_event(:process_exit, d, pid, corr, ts, wall) do
    %Events.ProcessExit{
      exited_pid: pid,
      exit_reason: Map.get(d, :reason),
      lifetime_ns: Map.get(d, :lifetime_ns, 0),
      message_count: Map.get(d, :message_count),
      final_state: Map.get(d, :final_state),
      pid: pid,
      reason: Map.get(d, :reason),
      correlation_id: corr,
      timestamp: ts,
      wall_time: wall
    }
  end

  defp generic_event(:message_received, d, pid, corr, ts, wall) do
    %Events.MessageReceived{
      pid: pid,
      message: Map.get(d, :message),
      correlation_id: corr,
      timestamp: ts,
      wall_time: wall
    }
  end

  defp generic_event(:message_sent, d, pid, corr, ts, wall) do
    %Events.MessageSent{
      from_pid: pid,
      to_pid: Map.get(d, :to_pid),
      message: Map.get(d, :message),
      correlation_id: corr,
      timestamp: ts,
      wall_time: wall
    }
  end

  defp generic_event(event_type, data, pid, corr, ts, wall) do
    %Events{
      event_id: Native.next_event_id(),
      timestamp: ts,
      wall_time: wall,
      node: node(),
      pid: pid,
      correlation_id: corr,
      event_type: event_type,
      data: data
    }
  end

  @doc """
  Writes a list of events (any terms, typically `ElixirScope.Events`
  structs). Returns `{:ok, n}`, or
  `{:error, {:partial_success, n, [buffer_full: rejected]}}` when the ring
  rejected some (`:drop_newest`/`:block`), or `{:error, :destroyed}`.
  """
  @spec ingest_batch(RingBuffer.t(), [term()]) ::
          {:ok, non_neg_integer()}
          | {:error, {:partial_success, non_neg_integer(), list()}}
          | {:error, :destroyed}
  def ingest_batch(buffer, events), do: RingBuffer.write_batch(buffer, events)

  @doc "Returns a one-argument function that writes an event to `buffer`."
  @spec create_fast_ingestor(RingBuffer.t()) :: (term() -> ingest_result())
  def create_fast_ingestor(%RingBuffer{ref: ref}), do: fn event -> Native.rb_write(ref, event) end
  def create_fast_ingestor(other), do: RingBuffer.bad_buffer!(other)

  @doc """
  Measures `RingBuffer.write/2` of `sample_event` into `buffer`,
  `iterations` times (default 1,000), each write timed on its own with
  the VM's monotonic clock (so every figure includes one clock read, about
  20-40 ns on x86-64).

  Returns `%{avg_time_ns, min_time_ns, max_time_ns, total_time_ns,
  operations}` (`avg_time_ns` a float). The events are really written: the
  buffer holds them afterwards (or, when full, counts them as its overflow
  strategy says; a rejected write is timed like any other).

  Raises `ArgumentError` for a buffer that is not a `%RingBuffer{}` or an
  `iterations` that is not an integer in 1..10,000,000 (bounded, so one
  call ends in seconds).
  """
  @spec benchmark_ingestion(RingBuffer.t(), term(), pos_integer()) :: %{
          avg_time_ns: float(),
          min_time_ns: non_neg_integer(),
          max_time_ns: non_neg_integer(),
          total_time_ns: non_neg_integer(),
          operations: pos_integer()
        }
  def benchmark_ingestion(buffer, sample_event, iterations \\ 1000)

  def benchmark_ingestion(%RingBuffer{ref: ref}, sample_event, iterations)
      when is_integer(iterations) and iterations > 0 and iterations <= @max_iterations do
    {total, min, max} = time_writes(ref, sample_event, iterations, 0, nil, 0)

    %{
      avg_time_ns: total / iterations,
      min_time_ns: min,
      max_time_ns: max,
      total_time_ns: total,
      operations: iterations
    }
  end

  def benchmark_ingestion(buffer, _sample_event, iterations) do
    check_buffer!(buffer)
    check!(false, "iterations must be an integer in 1..#{@max_iterations}", iterations)
  end

  defp time_writes(_ref, _event, 0, total, min, max), do: {total, min, max}

  defp time_writes(ref, event, n, total, min, max) do
    t0 = :erlang.monotonic_time(:nanosecond)
    _ = Native.rb_write(ref, event)
    d = :erlang.monotonic_time(:nanosecond) - t0

    time_writes(
      ref,
      event,
      n - 1,
      total + d,
      if(min == nil or d < min, do: d, else: min),
      max(d, max)
    )
  end

  @performance_target_ns 1000

  @doc """
  Checks that writing an event takes at most 1 µs on average: runs
  `benchmark_ingestion/3` with 1,000 writes of a sample
  `%FunctionExecution{event_type: :call}` into `buffer` (they are really
  written) and returns `:ok`, or
  `{:error, {:performance_target_missed, avg_time_ns, 1000}}`.

  Raises `ArgumentError` for a buffer that is not a `%RingBuffer{}`.
  """
  @spec validate_performance(RingBuffer.t()) :: :ok | {:error, term()}
  def validate_performance(%RingBuffer{} = buffer) do
    sample = %Events.FunctionExecution{
      id: Events.generate_id(),
      timestamp: System.monotonic_time(:nanosecond),
      wall_time: System.system_time(:nanosecond),
      module: TestModule,
      function: :test_function,
      arity: 0,
      event_type: :call
    }

    %{avg_time_ns: avg} = benchmark_ingestion(buffer, sample, 1000)

    if avg <= @performance_target_ns,
      do: :ok,
      else: {:error, {:performance_target_missed, avg, @performance_target_ns}}
  end

  def validate_performance(other), do: RingBuffer.bad_buffer!(other)

  @doc "The buffer registered with `set_buffer/1`."
  @spec get_buffer() :: {:ok, RingBuffer.t()} | {:error, :not_initialized}
  def get_buffer do
    case :persistent_term.get(@buffer_key, nil) do
      nil -> {:error, :not_initialized}
      buffer -> {:ok, buffer}
    end
  end

  @doc "Registers the node-wide buffer used by runtime components."
  @spec set_buffer(RingBuffer.t()) :: :ok
  def set_buffer(%RingBuffer{} = buffer), do: :persistent_term.put(@buffer_key, buffer)
  def set_buffer(other), do: RingBuffer.bad_buffer!(other)

  defp check_buffer!(%RingBuffer{}), do: :ok
  defp check_buffer!(other), do: RingBuffer.bad_buffer!(other)

  defp check!(true, _message, _value), do: :ok

  defp check!(false, message, value),
    do: raise(ArgumentError, "#{message}, got: #{inspect(value, limit: 5, printable_limit: 40)}")
end

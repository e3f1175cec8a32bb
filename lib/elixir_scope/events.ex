defmodule ElixirScope.Events do
  @moduledoc """
  Core event structures for ElixirScope Native.

  A drop-in for the original pure-Elixir `ElixirScope.Events` API: every event
  is an `%ElixirScope.Events{}` envelope (id, timestamps, node, pid,
  correlation data) whose `data` field holds one of the nested event structs
  defined here (`FunctionEntry`, `MessageSend`, `StateChange`, and the
  original's runtime-tracing and system structs `MessageSent`,
  `MessageReceived`, `CallbackReply`, `VariableAssignment`,
  `GarbageCollection`, `CrashDump`, `VMEvent`, `SchedulerEvent`,
  `NodeEvent`, `TableEvent`, `TraceControl`). The native
  capture engine builds some of these structs directly, so their field sets
  are part of the contract with the NIF.

  Event ids come from `ElixirScope.Native.next_event_id/0`, a process-wide
  64-bit atomic counter shared with the native side, so ids are unique across
  processes and across events created in Elixir or in Rust.

  Events are serialized with the external term format. `deserialize/1` is
  safe to call on untrusted input: it never creates atoms and rejects
  malformed binaries and terms containing functions.

  ## Examples

      iex> event = ElixirScope.Events.new_event(:custom, %{answer: 42}, event_id: 1, timestamp: 0, wall_time: 0)
      iex> {event.event_type, event.data, event.node == node(), event.pid == self()}
      {:custom, %{answer: 42}, true, true}

      iex> event = ElixirScope.Events.new_event(:custom, %{answer: 42}, event_id: 1)
      iex> event |> ElixirScope.Events.serialize() |> ElixirScope.Events.deserialize() == event
      true

  """

  # A compressed external term (tag 80) states its inflated size up front;
  # refuse to inflate more than this from an untrusted binary.
  @max_inflated_bytes 64 * 1024 * 1024

  @new_event_opts [:event_id, :timestamp, :wall_time, :node, :pid, :correlation_id, :parent_id]

  defstruct [
    # Unique identifier for this event (see generate_id/0)
    :event_id,
    # High-resolution monotonic timestamp, nanoseconds
    :timestamp,
    # Wall-clock time, nanoseconds since the Unix epoch
    :wall_time,
    # Node where the event occurred
    :node,
    # Process where the event occurred
    :pid,
    # Optional correlation id linking related events
    :correlation_id,
    # Optional parent event id for hierarchical relationships
    :parent_id,
    # Type of event (:function_entry, :function_exit, ...)
    :event_type,
    # Event-specific data (usually one of the nested structs)
    :data
  ]

  @typedoc "A unique event identifier (see `generate_id/0`)."
  @type event_id :: pos_integer()

  @typedoc "Base event envelope; `data` holds the event-specific payload."
  @type t :: %__MODULE__{
          event_id: event_id() | term(),
          timestamp: integer(),
          wall_time: integer(),
          node: node(),
          pid: pid() | nil,
          correlation_id: term(),
          parent_id: term(),
          event_type: atom(),
          data: term()
        }

  #############################################################################
  # Nested event structs
  #############################################################################

  defmodule FunctionExecution do
    @moduledoc "A function execution event (a call or a return), as built by the native engine."

    defstruct [
      :id,
      :timestamp,
      :wall_time,
      :module,
      :function,
      :arity,
      :args,
      :return_value,
      :duration_ns,
      :caller_pid,
      :correlation_id,
      :event_type
    ]

    @type t :: %__MODULE__{
            id: term(),
            timestamp: integer() | nil,
            wall_time: integer() | nil,
            module: module() | nil,
            function: atom() | nil,
            arity: non_neg_integer() | nil,
            args: term(),
            return_value: term(),
            duration_ns: non_neg_integer() | nil,
            caller_pid: pid() | nil,
            correlation_id: term(),
            event_type: :call | :return | :exception | nil
          }
  end

  defmodule ProcessEvent do
    @moduledoc """
    A process lifecycle event (spawn, exit, link or unlink). `reason` is the
    exit reason of an `:exit` event and `linked_pid` the other process of a
    `:link` / `:unlink` event (ElixirScope additions).
    """

    defstruct [:id, :timestamp, :wall_time, :pid, :parent_pid, :event_type, :reason, :linked_pid]

    @type t :: %__MODULE__{
            id: term(),
            timestamp: integer() | nil,
            wall_time: integer() | nil,
            pid: pid() | nil,
            parent_pid: pid() | nil,
            event_type: :spawn | :exit | :link | :unlink | nil,
            reason: term(),
            linked_pid: pid() | port() | nil
          }
  end

  defmodule MessageEvent do
    @moduledoc "A message passing event (a send or a receive)."

    defstruct [:id, :timestamp, :wall_time, :from_pid, :to_pid, :message, :event_type]

    @type t :: %__MODULE__{
            id: term(),
            timestamp: integer() | nil,
            wall_time: integer() | nil,
            from_pid: pid() | nil,
            to_pid: pid() | atom() | nil,
            message: term(),
            event_type: :send | :receive | nil
          }
  end

  defmodule StateChange do
    @moduledoc """
    A GenServer state change, with the callback and message that caused
    it. `pid` (an alias of `server_pid`) and `correlation_id` are the
    original's runtime-tracing fields; `id`, `timestamp` and `wall_time`
    are ours. Written to a ring with a local `server_pid` (else `pid`) it
    is a state record of that process (see
    `ElixirScope.Analysis.state_at/3`), as
    `Ingestor.ingest_state_change/4`'s, and reads back as this struct.
    """

    defstruct [
      :id,
      :timestamp,
      :wall_time,
      :server_pid,
      :callback,
      :old_state,
      :new_state,
      :state_diff,
      :trigger_message,
      :trigger_call_id,
      :pid,
      :correlation_id
    ]

    @type t :: %__MODULE__{
            id: term(),
            timestamp: integer() | nil,
            wall_time: integer() | nil,
            server_pid: pid() | nil,
            callback: atom() | nil,
            old_state: term(),
            new_state: term(),
            state_diff: :no_change | :changed | term(),
            trigger_message: term(),
            trigger_call_id: term(),
            pid: pid() | nil,
            correlation_id: term()
          }
  end

  defmodule PerformanceMetric do
    @moduledoc "A performance measurement (memory, reductions, GC, scheduler...)."

    defstruct [
      :id,
      :timestamp,
      :wall_time,
      :metric_name,
      :value,
      :metadata,
      :metric_type,
      :unit,
      :source_context
    ]

    @type t :: %__MODULE__{
            id: term(),
            timestamp: integer() | nil,
            wall_time: integer() | nil,
            metric_name: atom() | String.t() | nil,
            value: number() | term(),
            metadata: term(),
            metric_type: atom() | nil,
            unit: atom() | String.t() | nil,
            source_context: term()
          }
  end

  defmodule ErrorEvent do
    @moduledoc "An error (exception, error, exit or throw) and its context."

    defstruct [
      :id,
      :timestamp,
      :wall_time,
      :error_type,
      :error_class,
      :error_message,
      :stacktrace,
      :context,
      :recovery_action
    ]

    @type t :: %__MODULE__{
            id: term(),
            timestamp: integer() | nil,
            wall_time: integer() | nil,
            error_type: :exception | :error | :exit | :throw | atom() | nil,
            error_class: module() | atom() | nil,
            error_message: term(),
            stacktrace: term(),
            context: term(),
            recovery_action: term()
          }
  end

  defmodule FunctionEntry do
    @moduledoc """
    Fired when entering a function; `call_id` matches the later
    `FunctionExit`. `pid`, `correlation_id`, `timestamp` and `wall_time`
    are the original's runtime-tracing fields.

    Written to a ring with a local `pid`, it is a call of that process
    (keyed by `call_id`, else `correlation_id`): a pipeline pairs it with
    the `FunctionExit` (or Ingestor return) of the same key, indexes it by
    process and function, and it reads back as this struct.
    """

    defstruct [
      :module,
      :function,
      :arity,
      :args,
      :call_id,
      :caller_module,
      :caller_function,
      :caller_line,
      :pid,
      :correlation_id,
      :timestamp,
      :wall_time
    ]

    @type t :: %__MODULE__{
            module: module() | nil,
            function: atom() | nil,
            arity: non_neg_integer() | nil,
            args: term(),
            call_id: term(),
            caller_module: module() | nil,
            caller_function: atom() | nil,
            caller_line: non_neg_integer() | nil,
            pid: pid() | nil,
            correlation_id: term(),
            timestamp: integer() | nil,
            wall_time: integer() | nil
          }
  end

  defmodule FunctionExit do
    @moduledoc """
    Fired when exiting a function; `call_id` matches the `FunctionEntry`.

    Written to a ring with a local `pid`, it is a return of that process
    (an exception when `exit_reason` is neither nil nor `:normal`) that
    completes the open call of the same key (`call_id`, else
    `correlation_id`; with neither, the innermost open call). It reads
    back as this struct.
    """

    defstruct [
      :module,
      :function,
      :arity,
      :call_id,
      :result,
      :duration_ns,
      :exit_reason,
      :pid,
      :correlation_id,
      :timestamp,
      :wall_time
    ]

    @type t :: %__MODULE__{
            module: module() | nil,
            function: atom() | nil,
            arity: non_neg_integer() | nil,
            call_id: term(),
            result: term(),
            duration_ns: non_neg_integer() | nil,
            exit_reason: :normal | :exception | :error | :exit | :throw | term(),
            pid: pid() | nil,
            correlation_id: term(),
            timestamp: integer() | nil,
            wall_time: integer() | nil
          }
  end

  defmodule ProcessSpawn do
    @moduledoc "Fired when a process is spawned."

    defstruct [
      :spawned_pid,
      :parent_pid,
      :spawn_module,
      :spawn_function,
      :spawn_args,
      :spawn_opts,
      :registered_name
    ]

    @type t :: %__MODULE__{
            spawned_pid: pid() | nil,
            parent_pid: pid() | nil,
            spawn_module: module() | nil,
            spawn_function: atom() | nil,
            spawn_args: term(),
            spawn_opts: term(),
            registered_name: atom() | nil
          }
  end

  defmodule ProcessExit do
    @moduledoc """
    Fired when a process exits. `pid` and `reason` are the original's
    runtime-tracing aliases of `exited_pid` and `exit_reason`.

    Written to a ring with a local `exited_pid` (else `pid`), it is an exit
    of that process (its reason: `exit_reason`, else `reason`), and reads
    back as this struct.
    """

    defstruct [
      :exited_pid,
      :exit_reason,
      :lifetime_ns,
      :message_count,
      :final_state,
      :pid,
      :reason,
      :correlation_id,
      :timestamp,
      :wall_time
    ]

    @type t :: %__MODULE__{
            exited_pid: pid() | nil,
            exit_reason: term(),
            lifetime_ns: non_neg_integer() | nil,
            message_count: non_neg_integer() | nil,
            final_state: term(),
            pid: pid() | nil,
            reason: term(),
            correlation_id: term(),
            timestamp: integer() | nil,
            wall_time: integer() | nil
          }
  end

  defmodule MessageSend do
    @moduledoc "Fired when a message is sent; `message_id` matches the `MessageReceive`."

    defstruct [:sender_pid, :receiver_pid, :message, :message_id, :send_type, :call_ref]

    @type t :: %__MODULE__{
            sender_pid: pid() | nil,
            receiver_pid: pid() | atom() | term(),
            message: term(),
            message_id: term(),
            send_type: :send | :cast | :call | :info | atom() | nil,
            call_ref: reference() | term()
          }
  end

  defmodule MessageReceive do
    @moduledoc "Fired when a message is received; `message_id` matches the `MessageSend`."

    defstruct [
      :receiver_pid,
      :sender_pid,
      :message,
      :message_id,
      :receive_type,
      :queue_time_ns,
      :pattern_matched
    ]

    @type t :: %__MODULE__{
            receiver_pid: pid() | nil,
            sender_pid: pid() | nil,
            message: term(),
            message_id: term(),
            receive_type: :receive | :handle_call | :handle_cast | :handle_info | atom() | nil,
            queue_time_ns: non_neg_integer() | nil,
            pattern_matched: term()
          }
  end

  defmodule StateSnapshot do
    @moduledoc """
    A point-in-time snapshot of a GenServer's state, with the original's
    time-travel fields (`snapshot_id`, `checkpoint_type`, `memory_usage`,
    `message_queue_len`, `session_id`, ...; `pid` is an alias of
    `server_pid`) and ours, `snapshot_reason`.

    Written to a ring with a local `server_pid` (else `pid`), it is a state
    record of that process (see `ElixirScope.Analysis.state_at/3`) and
    reads back as this struct. One recorded by
    `Ingestor.ingest_state_snapshot/4` or the tracer reads back with `pid`
    = `server_pid` and the record's `timestamp` and `wall_time`.
    """

    defstruct [
      :server_pid,
      :snapshot_id,
      :state,
      :checkpoint_type,
      :sequence_number,
      :memory_usage,
      :message_queue_len,
      :pid,
      :session_id,
      :correlation_id,
      :timestamp,
      :wall_time,
      :snapshot_reason
    ]

    @type t :: %__MODULE__{
            server_pid: pid() | nil,
            snapshot_id: term(),
            state: term(),
            checkpoint_type: :periodic | :manual | :before_call | :after_call | term(),
            sequence_number: non_neg_integer() | nil,
            memory_usage: non_neg_integer() | nil,
            message_queue_len: non_neg_integer() | nil,
            pid: pid() | nil,
            session_id: term(),
            correlation_id: term(),
            timestamp: integer() | nil,
            wall_time: integer() | nil,
            snapshot_reason: term()
          }
  end

  # The runtime-tracing structs of the original ElixirScope. Their field sets
  # are part of the contract with the NIF: `RingBuffer.write/2` recognises a
  # `MessageSent`, `MessageReceived` or `CallbackReply` by its exact key set
  # and stores it as a send, receive or return that reads back as the same
  # struct (see the README, "Runtime-tracing structs").

  defmodule MessageSent do
    @moduledoc """
    A message sent, as the original's runtime tracing records it (the
    `MessageSend` fields under the names `from_pid`/`to_pid`).

    Written to a ring (`RingBuffer.write/2`) by a local `from_pid`, it is a
    send: a pipeline links a later `MessageReceived` (or receive) of an
    equal message in `to_pid` to it. It reads back as this struct.
    """

    defstruct [:from_pid, :to_pid, :message, :correlation_id, :timestamp, :wall_time]

    @type t :: %__MODULE__{
            from_pid: pid() | nil,
            to_pid: pid() | atom() | term(),
            message: term(),
            correlation_id: term(),
            timestamp: integer() | nil,
            wall_time: integer() | nil
          }
  end

  defmodule MessageReceived do
    @moduledoc """
    A message received by `pid`, as the original's runtime tracing records
    it (the `MessageReceive` counterpart).

    Written to a ring by a local `pid`, it is a receive: a pipeline links it
    to the oldest unmatched send of an equal message to `pid`. It reads back
    as this struct.
    """

    defstruct [:pid, :message, :correlation_id, :timestamp, :wall_time]

    @type t :: %__MODULE__{
            pid: pid() | nil,
            message: term(),
            correlation_id: term(),
            timestamp: integer() | nil,
            wall_time: integer() | nil
          }
  end

  defmodule CallbackReply do
    @moduledoc """
    A GenServer callback's reply (`{:reply, reply, new_state, ...}`).

    `call_id` is the call it answers. Written to a ring with a local
    `server_pid` (or `pid`), it completes that call like a return: in a
    pipeline, the innermost open call of the server carrying `call_id` as
    its correlation id (the innermost open call when `call_id` is nil). It
    reads back as this struct.
    """

    defstruct [
      :server_pid,
      :callback,
      :call_id,
      :reply,
      :new_state,
      :timeout,
      :hibernate,
      :continue_data,
      :pid,
      :correlation_id,
      :timestamp,
      :wall_time
    ]

    @type t :: %__MODULE__{
            server_pid: pid() | nil,
            callback: atom() | nil,
            call_id: term(),
            reply: term(),
            new_state: term(),
            timeout: timeout() | nil,
            hibernate: boolean() | nil,
            continue_data: term(),
            pid: pid() | nil,
            correlation_id: term(),
            timestamp: integer() | nil,
            wall_time: integer() | nil
          }
  end

  defmodule VariableAssignment do
    @moduledoc "A traced variable's assignment (`:bind`, `:rebind`, `:pattern_match`)."

    defstruct [
      :variable_name,
      :old_value,
      :new_value,
      :assignment_type,
      :scope_context,
      :line_number
    ]

    @type t :: %__MODULE__{
            variable_name: atom() | String.t() | nil,
            old_value: term(),
            new_value: term(),
            assignment_type: :bind | :rebind | :pattern_match | atom() | nil,
            scope_context: term(),
            line_number: non_neg_integer() | nil
          }
  end

  defmodule GarbageCollection do
    @moduledoc "A garbage collection of a process (sizes in words)."

    defstruct [
      :heap_size_before,
      :heap_size_after,
      :old_heap_size,
      :stack_size,
      :recent_size,
      :mbuf_size,
      :gc_type,
      :gc_reason,
      :duration_ns
    ]

    @type t :: %__MODULE__{
            heap_size_before: non_neg_integer() | nil,
            heap_size_after: non_neg_integer() | nil,
            old_heap_size: non_neg_integer() | nil,
            stack_size: non_neg_integer() | nil,
            recent_size: non_neg_integer() | nil,
            mbuf_size: non_neg_integer() | nil,
            gc_type: :minor | :major | :full | atom() | nil,
            gc_reason: term(),
            duration_ns: non_neg_integer() | nil
          }
  end

  defmodule CrashDump do
    @moduledoc "A process crash, with its supervision context."

    defstruct [
      :crashed_pid,
      :supervisor_pid,
      :restart_strategy,
      :restart_count,
      :crash_reason,
      :process_state,
      :linked_pids,
      :monitors
    ]

    @type t :: %__MODULE__{
            crashed_pid: pid() | nil,
            supervisor_pid: pid() | nil,
            restart_strategy: atom() | nil,
            restart_count: non_neg_integer() | nil,
            crash_reason: term(),
            process_state: term(),
            linked_pids: [pid()] | nil,
            monitors: term()
          }
  end

  defmodule VMEvent do
    @moduledoc "A VM-level event."

    defstruct [:event_type, :event_data, :scheduler_id, :system_time, :node_name]

    @type t :: %__MODULE__{
            event_type: atom() | nil,
            event_data: term(),
            scheduler_id: non_neg_integer() | nil,
            system_time: integer() | nil,
            node_name: node() | nil
          }
  end

  defmodule SchedulerEvent do
    @moduledoc "A scheduler event (`:in`, `:out`, `:exited`, `:started`)."

    defstruct [
      :scheduler_id,
      :event_type,
      :process_count,
      :port_count,
      :run_queue_length,
      :utilization
    ]

    @type t :: %__MODULE__{
            scheduler_id: non_neg_integer() | nil,
            event_type: :in | :out | :exited | :started | atom() | nil,
            process_count: non_neg_integer() | nil,
            port_count: non_neg_integer() | nil,
            run_queue_length: non_neg_integer() | nil,
            utilization: number() | nil
          }
  end

  defmodule NodeEvent do
    @moduledoc "A distributed node event (`:nodeup`, `:nodedown`, `:net_tick_timeout`)."

    defstruct [:event_type, :node_name, :node_type, :connection_id, :extra_info]

    @type t :: %__MODULE__{
            event_type: :nodeup | :nodedown | :net_tick_timeout | atom() | nil,
            node_name: node() | nil,
            node_type: :visible | :hidden | atom() | nil,
            connection_id: term(),
            extra_info: term()
          }
  end

  defmodule TableEvent do
    @moduledoc "An ETS or DETS table operation."

    defstruct [
      :table_name,
      :table_type,
      :operation,
      :key,
      :value,
      :operation_count,
      :execution_time_ns
    ]

    @type t :: %__MODULE__{
            table_name: atom() | term(),
            table_type: :ets | :dets | nil,
            operation: atom() | nil,
            key: term(),
            value: term(),
            operation_count: non_neg_integer() | nil,
            execution_time_ns: non_neg_integer() | nil
          }
  end

  defmodule TraceControl do
    @moduledoc "A trace control operation (`:start`, `:stop`, `:pause`, `:resume`)."

    defstruct [:operation, :trace_type, :target, :trace_flags, :reason]

    @type t :: %__MODULE__{
            operation: :start | :stop | :pause | :resume | atom() | nil,
            trace_type: atom() | term(),
            target: term(),
            trace_flags: term(),
            reason: term()
          }
  end

  #############################################################################
  # Event creation
  #############################################################################

  @doc """
  Returns a new unique event id.

  Ids come from the native process-wide 64-bit atomic counter
  (`ElixirScope.Native.next_event_id/0`), so they are positive, unique under
  concurrency, and shared with events created by the native engine.
  """
  @spec generate_id() :: event_id()
  def generate_id, do: ElixirScope.Native.next_event_id()

  @doc """
  Creates a new event envelope around `data`.

  ## Options

    * `:event_id` - defaults to `generate_id/0`
    * `:timestamp` - defaults to `System.monotonic_time(:nanosecond)`
    * `:wall_time` - defaults to `System.system_time(:nanosecond)`
    * `:node` - defaults to `node()`
    * `:pid` - defaults to `self()`
    * `:correlation_id` - defaults to `nil`
    * `:parent_id` - defaults to `nil`

  Raises `ArgumentError` if `event_type` is not an atom or if `opts` contains
  an unknown key.
  """
  @spec new_event(atom(), term(), keyword()) :: t()
  def new_event(event_type, data, opts \\ [])

  def new_event(event_type, data, opts) when is_atom(event_type) do
    opts = validate_opts!(opts, @new_event_opts)

    %__MODULE__{
      event_id: Keyword.get_lazy(opts, :event_id, &generate_id/0),
      timestamp: Keyword.get_lazy(opts, :timestamp, fn -> System.monotonic_time(:nanosecond) end),
      wall_time: Keyword.get_lazy(opts, :wall_time, fn -> System.system_time(:nanosecond) end),
      node: Keyword.get_lazy(opts, :node, &node/0),
      pid: Keyword.get_lazy(opts, :pid, &self/0),
      correlation_id: Keyword.get(opts, :correlation_id),
      parent_id: Keyword.get(opts, :parent_id),
      event_type: event_type,
      data: data
    }
  end

  def new_event(event_type, _data, _opts) do
    raise ArgumentError, "expected event_type to be an atom, got: #{inspect(event_type)}"
  end

  @doc """
  Creates a `:function_entry` event whose data is a `FunctionEntry`.

  `call_id` is a fresh `generate_id/0`. Besides the `new_event/3` options,
  accepts `:caller_module`, `:caller_function` and `:caller_line`.
  """
  @spec function_entry(module(), atom(), non_neg_integer(), term(), keyword()) :: t()
  def function_entry(module, function, arity, args, opts \\ []) do
    {data_opts, event_opts} = split_opts!(opts, [:caller_module, :caller_function, :caller_line])

    data = %FunctionEntry{
      module: module,
      function: function,
      arity: arity,
      args: args,
      call_id: generate_id(),
      caller_module: Keyword.get(data_opts, :caller_module),
      caller_function: Keyword.get(data_opts, :caller_function),
      caller_line: Keyword.get(data_opts, :caller_line)
    }

    new_event(:function_entry, data, event_opts)
  end

  @doc """
  Creates a `:function_exit` event whose data is a `FunctionExit`.

  `call_id` should be the one from the matching `function_entry/5`. Accepts
  the `new_event/3` options.
  """
  @spec function_exit(
          module(),
          atom(),
          non_neg_integer(),
          term(),
          term(),
          non_neg_integer(),
          atom(),
          keyword()
        ) :: t()
  def function_exit(
        module,
        function,
        arity,
        call_id,
        result,
        duration_ns,
        exit_reason,
        opts \\ []
      ) do
    {_data_opts, event_opts} = split_opts!(opts, [])

    data = %FunctionExit{
      module: module,
      function: function,
      arity: arity,
      call_id: call_id,
      result: result,
      duration_ns: duration_ns,
      exit_reason: exit_reason
    }

    new_event(:function_exit, data, event_opts)
  end

  @doc """
  Creates a `:message_send` event whose data is a `MessageSend`.

  `message_id` is a fresh `generate_id/0`. Besides the `new_event/3` options,
  accepts `:call_ref`.
  """
  @spec message_send(pid() | nil, term(), term(), atom(), keyword()) :: t()
  def message_send(sender_pid, receiver_pid, message, send_type, opts \\ []) do
    {data_opts, event_opts} = split_opts!(opts, [:call_ref])

    data = %MessageSend{
      sender_pid: sender_pid,
      receiver_pid: receiver_pid,
      message: message,
      message_id: generate_id(),
      send_type: send_type,
      call_ref: Keyword.get(data_opts, :call_ref)
    }

    new_event(:message_send, data, event_opts)
  end

  @doc """
  Creates a `:state_change` event whose data is a `StateChange`.

  `state_diff` is `:no_change` when `old_state == new_state` and `:changed`
  otherwise. Besides the `new_event/3` options, accepts `:trigger_message`
  and `:trigger_call_id`. The `StateChange` `id`, `timestamp` and `wall_time`
  fields are left `nil`: the envelope carries them.
  """
  @spec state_change(pid() | nil, atom(), term(), term(), keyword()) :: t()
  def state_change(server_pid, callback, old_state, new_state, opts \\ []) do
    {data_opts, event_opts} = split_opts!(opts, [:trigger_message, :trigger_call_id])

    data = %StateChange{
      server_pid: server_pid,
      callback: callback,
      old_state: old_state,
      new_state: new_state,
      state_diff: if(old_state == new_state, do: :no_change, else: :changed),
      trigger_message: Keyword.get(data_opts, :trigger_message),
      trigger_call_id: Keyword.get(data_opts, :trigger_call_id)
    }

    new_event(:state_change, data, event_opts)
  end

  @doc """
  Creates a `:process_spawn` event whose data is a `ProcessSpawn`.

  Besides the `new_event/3` options, accepts `:spawn_opts` and
  `:registered_name`.
  """
  @spec process_spawn(pid() | nil, pid() | nil, module(), atom(), term(), keyword()) :: t()
  def process_spawn(spawned_pid, parent_pid, spawn_module, spawn_function, spawn_args, opts \\ []) do
    {data_opts, event_opts} = split_opts!(opts, [:spawn_opts, :registered_name])

    data = %ProcessSpawn{
      spawned_pid: spawned_pid,
      parent_pid: parent_pid,
      spawn_module: spawn_module,
      spawn_function: spawn_function,
      spawn_args: spawn_args,
      spawn_opts: Keyword.get(data_opts, :spawn_opts),
      registered_name: Keyword.get(data_opts, :registered_name)
    }

    new_event(:process_spawn, data, event_opts)
  end

  #############################################################################
  # Serialization
  #############################################################################

  @doc """
  Serializes an event (or any term) to a binary in the external term format.
  """
  @spec serialize(t() | term()) :: binary()
  def serialize(event), do: :erlang.term_to_binary(event)

  @doc """
  Deserializes a binary produced by `serialize/1`.

  Safe on untrusted input: decoding uses `:erlang.binary_to_term/2` with
  `[:safe]`, so no atom (and no external function reference) is ever
  created. Raises `ArgumentError` if `binary` is not a binary, is not a
  complete, valid encoding of exactly one term (trailing bytes are rejected),
  would create atoms, or decodes to a term containing a function anywhere
  inside it.
  """
  @spec deserialize(binary()) :: t() | term()
  def deserialize(<<131, 80, size::32, _::binary>>) when size > @max_inflated_bytes do
    raise ArgumentError,
          "invalid or unsafe serialized event: compressed payload inflates to #{size} bytes, " <>
            "over the #{@max_inflated_bytes}-byte limit"
  end

  def deserialize(binary) when is_binary(binary) do
    {term, used} =
      try do
        :erlang.binary_to_term(binary, [:safe, :used])
      rescue
        ArgumentError ->
          raise ArgumentError,
                "invalid or unsafe serialized event: the binary is not a valid external " <>
                  "term encoding or refers to atoms that do not exist"
      end

    if used != byte_size(binary) do
      raise ArgumentError,
            "invalid or unsafe serialized event: #{byte_size(binary) - used} trailing " <>
              "byte(s) after the encoded term"
    end

    if contains_function?([term]) do
      raise ArgumentError, "invalid or unsafe serialized event: the term contains a function"
    end

    term
  end

  def deserialize(other) do
    raise ArgumentError, "expected binary to be a binary, got: #{inspect(other)}"
  end

  @doc """
  Returns the size in bytes of `serialize(event)`.
  """
  @spec serialized_size(t() | term()) :: non_neg_integer()
  def serialized_size(event), do: byte_size(serialize(event))

  @doc false
  def max_inflated_bytes, do: @max_inflated_bytes

  #############################################################################
  # Helpers
  #############################################################################

  # Validates opts against the new_event/3 keys plus the constructor's own
  # data keys, and splits them into {data_opts, event_opts}.
  defp split_opts!(opts, data_keys) do
    opts
    |> validate_opts!(data_keys ++ @new_event_opts)
    |> Keyword.split(data_keys)
  end

  defp validate_opts!(opts, allowed) when is_list(opts) do
    Keyword.validate!(opts, allowed)
  end

  defp validate_opts!(opts, _allowed) do
    raise ArgumentError, "expected opts to be a keyword list, got: #{inspect(opts)}"
  end

  # Iterative walk over a stack of pending terms; handles improper lists and
  # arbitrarily deep terms without deep recursion.
  defp contains_function?([]), do: false
  defp contains_function?([term | _rest]) when is_function(term), do: true

  defp contains_function?([[head | tail] | rest]),
    do: contains_function?([head, tail | rest])

  defp contains_function?([term | rest]) when is_tuple(term),
    do: contains_function?(Tuple.to_list(term) ++ rest)

  defp contains_function?([term | rest]) when is_map(term),
    do: contains_function?(:maps.fold(fn k, v, acc -> [k, v | acc] end, rest, term))

  defp contains_function?([_term | rest]), do: contains_function?(rest)
end

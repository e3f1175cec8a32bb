defmodule ElixirScope.Telemetry do
  @moduledoc """
  ElixirScope's event bus for its own metrics.

  `execute/3` delivers an event to the handlers attached here (`attach/4`)
  and to the processes subscribed here (`subscribe/2`); when the
  [`:telemetry`](https://hex.pm/packages/telemetry) library is loaded it
  also calls `:telemetry.execute/3`, so `:telemetry` handlers see the same
  events. `:telemetry` is optional: nothing here depends on it at compile
  time, and the built-in API always works.

  ## Events

  Every event's metadata carries `pipeline:` (the pipeline's registered
  name, or its pid) where the event concerns a pipeline. Latencies are in
  nanoseconds.

  | Event | Measurements | Metadata |
  | --- | --- | --- |
  | `[:elixir_scope, :layer2, :throughput]` | `events_per_second`, `batches_per_second` | `pipeline` |
  | `[:elixir_scope, :layer2, :latency]` | `p50`, `p95`, `p99` (ns) | `pipeline` |
  | `[:elixir_scope, :layer2, :health]` | `buffer_utilization`, `correlation_success_rate`, `worker_utilization` | `pipeline`, `level` (pressure) |
  | `[:elixir_scope, :layer2, :pressure]` | `level` (0..3) | `pipeline`, `from`, `to` (pressure levels, atoms) |
  | `[:elixir_scope, :layer2, :shedding]` | `keep_one_in` | `pipeline`, `enabled` (boolean), `level` (atom), `drop_low_priority` (boolean) |
  | `[:elixir_scope, :layer2, :circuit]` | none (`%{}`) | `pipeline`, `from`, `to` (`:closed`, `:open` or `:half_open`) |
  | `[:elixir_scope, :layer2, :scaling]` | `workers` | `pipeline`, `from`, `to` (worker counts) |
  | `[:elixir_scope, :tracer, :stopped]` | `traced`, `dropped`, `shed` | `pipeline`, `reason` (`:stopped`, `:max_events`, `:max_rate`, `:duration`, `:pipeline_down`) |

  `events/0` lists these names.

  ## Handlers and subscribers

  A handler (`attach/4`) is a 4-arity function called in the process that
  calls `execute/3`, like a `:telemetry` handler; one that raises, throws
  or exits is detached and logged once with `Logger.warning/1`, and
  `execute/3` still returns `:ok`. Keep handlers short.

  A subscriber (`subscribe/2`) is a process that receives
  `{:elixir_scope_telemetry, event, measurements, metadata}` messages. Its
  subscription ends with `unsubscribe/0` or when it exits. Delivery is
  bounded: the subscriber's message queue length is checked every 64th
  event sent its way, and on every event while it is at or over
  `:max_queue` (default 10_000); meanwhile its events are dropped and
  counted (`:dropped` in `list_handlers/0`). The queue can so exceed the
  limit by up to 63 messages, plus about one per process emitting at the
  same time.

  Handlers and subscriptions are kept in a public ETS table owned by
  `ElixirScope.Telemetry.Registry`, which the `:elixir_scope` application
  starts. `execute/3` is a no-op before the registry runs; `attach/4` and
  `subscribe/2` raise `ArgumentError`. Attaching, detaching and executing
  do not go through a process; subscribing does (the registry monitors the
  subscriber). Handlers and subscriptions are lost if the registry
  restarts.

  With no handler or subscriber for an event, `execute/3` costs one
  `:persistent_term` read and one ETS lookup.
  """

  require Logger

  alias ElixirScope.Args

  @table __MODULE__
  @telemetry_key {__MODULE__, :telemetry?}
  @message :elixir_scope_telemetry

  # A subscriber's queue is checked when its delivery count is a multiple of
  # @check_every (a power of two), and on every delivery while over the limit.
  @check_every 64
  @check_mask @check_every - 1
  @default_max_queue 10_000

  # Subscriber atomics slots.
  @seen 1
  @dropped 2
  @over 3
  @max_queue 4

  @events [
    [:elixir_scope, :layer2, :throughput],
    [:elixir_scope, :layer2, :latency],
    [:elixir_scope, :layer2, :health],
    [:elixir_scope, :layer2, :pressure],
    [:elixir_scope, :layer2, :shedding],
    [:elixir_scope, :layer2, :circuit],
    [:elixir_scope, :layer2, :scaling],
    [:elixir_scope, :tracer, :stopped]
  ]

  @typedoc "An event name: a non-empty list of atoms."
  @type event_name :: [atom(), ...]

  @typedoc "Any term naming a handler."
  @type handler_id :: term()

  @typedoc "A handler function: `fun.(event, measurements, metadata, config)`."
  @type handler_function :: (event_name(), map(), map(), term() -> any())

  # Table rows, all 5-tuples in one :bag.
  #   Event rows, one per (event name, handler/subscriber); execute/3 reads these:
  #     {event_name, ref, {:handler, id}, fun, config}
  #     {event_name, ref, {:subscriber, pid}, pid, atomics}
  #   Owner rows, one per handler/subscriber (ref identifies this attachment):
  #     {{:handler, id}, ref, event_names, fun, config}
  #     {{:subscriber, pid}, ref, event_names, pid, atomics}

  @doc "The names of the events ElixirScope emits (see the table above)."
  @spec events() :: [event_name()]
  def events, do: @events

  @doc """
  Emits `event_name` with `measurements` and `metadata`: calls the attached
  handlers, messages the subscribers, and calls `:telemetry.execute/3` if
  `:telemetry` is loaded. Always returns `:ok`, also before the registry
  runs. `ArgumentError` if `event_name` is not a non-empty list of atoms or
  `measurements` or `metadata` is not a map.
  """
  @spec execute(event_name(), map(), map()) :: :ok
  def execute(event_name, measurements, metadata)
      when is_list(event_name) and is_map(measurements) and is_map(metadata) do
    unless event_name?(event_name), do: raise_event_name!(event_name)

    case lookup(event_name) do
      [] -> :ok
      rows -> deliver(rows, event_name, measurements, metadata)
    end

    if telemetry?(), do: forward(event_name, measurements, metadata)
    :ok
  end

  def execute(event_name, measurements, metadata) do
    cond do
      not is_list(event_name) -> raise_event_name!(event_name)
      not is_map(measurements) -> raise_map!("measurements", measurements)
      true -> raise_map!("metadata", metadata)
    end
  end

  @doc """
  Attaches `fun` under `handler_id` to each of `event_names`, like
  `:telemetry.attach_many/4`: `fun.(event, measurements, metadata, config)`
  runs in the emitting process. `{:error, :already_exists}` if
  `handler_id` is attached. `ArgumentError` if `event_names` is not a
  non-empty list of event names, `fun` is not a 4-arity function, or the
  registry is not running.
  """
  @spec attach(handler_id(), [event_name()], handler_function(), term()) ::
          :ok | {:error, :already_exists}
  def attach(handler_id, event_names, fun, config \\ nil) do
    event_names = event_names!(event_names)

    unless is_function(fun, 4) do
      raise ArgumentError,
            "handler must be a function of arity 4, got: #{inspect(fun, limit: 5)}"
    end

    ensure_table!()
    key = {:handler, handler_id}
    ref = make_ref()

    # Claim the id, add the event rows, then make sure the claim still holds:
    # a concurrent detach/1 may have removed it before the rows went in.
    if :ets.insert_new(@table, {key, ref, event_names, fun, config}) do
      :ets.insert(@table, for(e <- event_names, do: {e, ref, key, fun, config}))

      unless owner?(key, ref), do: delete_rows(event_names, ref)
      :ok
    else
      {:error, :already_exists}
    end
  end

  @doc """
  Detaches the handler `handler_id`. `{:error, :not_found}` if no handler
  has that id.
  """
  @spec detach(handler_id()) :: :ok | {:error, :not_found}
  def detach(handler_id) do
    case take({:handler, handler_id}) do
      [{_, ref, event_names, _, _}] -> delete_rows(event_names, ref)
      [] -> {:error, :not_found}
    end
  end

  @doc """
  Subscribes the calling process to `event_names`: it receives
  `{:elixir_scope_telemetry, event, measurements, metadata}` for each
  event, until it calls `unsubscribe/0` or exits. Subscribing again adds
  event names to the process's subscription.

  Options: `:max_queue` (positive integer, default 10_000), the message
  queue length at which the process's events are dropped and counted
  instead of sent; the latest call's value applies.

  `ArgumentError` for malformed arguments or if the registry is not
  running.
  """
  @spec subscribe([event_name()], keyword()) :: :ok
  def subscribe(event_names, opts \\ []) do
    event_names = event_names!(event_names)
    opts = Args.keyword_opts!(opts, [max_queue: @default_max_queue], "subscribe/2")
    max_queue = opts[:max_queue]

    unless is_integer(max_queue) and max_queue > 0 do
      raise ArgumentError,
            ":max_queue must be a positive integer, got: #{inspect(max_queue, limit: 5)}"
    end

    registry_call!({:subscribe, self(), event_names, max_queue})
  end

  @doc "Ends the calling process's subscription, if any."
  @spec unsubscribe() :: :ok
  def unsubscribe do
    case Process.whereis(ElixirScope.Telemetry.Registry) do
      nil -> :ok
      pid -> GenServer.call(pid, {:unsubscribe, self()})
    end
  end

  @doc """
  The attached handlers and subscribers, in no particular order:

    * `%{type: :handler, id: id, event_names: names, function: fun, config: config}`
    * `%{type: :subscriber, id: pid, pid: pid, event_names: names,
      max_queue: n, delivered: n, dropped: n}`: `dropped` counts the events
      not sent because the queue was at `max_queue` or the process was dead.
  """
  @spec list_handlers() :: [map()]
  def list_handlers do
    owners =
      try do
        :ets.select(@table, [
          {{{:handler, :_}, :_, :_, :_, :_}, [], [:"$_"]},
          {{{:subscriber, :_}, :_, :_, :_, :_}, [], [:"$_"]}
        ])
      catch
        :error, :badarg -> []
      end

    for row <- owners, do: describe(row)
  end

  @doc """
  Re-checks whether `:telemetry` is loaded (`:telemetry.execute/3`
  exported) and caches the answer for `execute/3`. The check is made once,
  at the first `execute/3` or when the registry starts; call this after
  loading or unloading `:telemetry`. Returns the new answer.
  """
  @spec refresh() :: boolean()
  def refresh do
    present? = Code.ensure_loaded?(:telemetry) and function_exported?(:telemetry, :execute, 3)
    :persistent_term.put(@telemetry_key, present?)
    present?
  end

  # ---- execute ----------------------------------------------------------------

  defp lookup(event_name) do
    :ets.lookup(@table, event_name)
  catch
    :error, :badarg -> []
  end

  defp deliver([], _event, _measurements, _metadata), do: :ok

  defp deliver([{_, _, {:subscriber, _}, pid, counters} | rest], event, measurements, metadata) do
    if admit?(pid, counters) do
      send(pid, {@message, event, measurements, metadata})
    else
      :atomics.add(counters, @dropped, 1)
    end

    deliver(rest, event, measurements, metadata)
  end

  defp deliver([{_, ref, {:handler, id}, fun, config} | rest], event, measurements, metadata) do
    try do
      fun.(event, measurements, metadata, config)
    catch
      kind, reason -> handler_failed(id, ref, event, kind, reason, __STACKTRACE__)
    end

    deliver(rest, event, measurements, metadata)
  end

  defp admit?(pid, counters) do
    seen = :atomics.add_get(counters, @seen, 1)

    if Bitwise.band(seen, @check_mask) == 0 or :atomics.get(counters, @over) == 1 do
      case Process.info(pid, :message_queue_len) do
        {:message_queue_len, len} ->
          over? = len >= :atomics.get(counters, @max_queue)
          :atomics.put(counters, @over, if(over?, do: 1, else: 0))
          not over?

        nil ->
          false
      end
    else
      true
    end
  end

  # Only the process whose select_delete removes the owner row (with this
  # ref: the id may have been re-attached since) detaches and logs.
  defp handler_failed(id, ref, event, kind, reason, stacktrace) do
    key = {:handler, id}
    spec = [{{key, ref, :_, :_, :_}, [], [:"$_"]}]

    with [{_, _, event_names, _, _}] <- safe(fn -> :ets.select(@table, spec) end, []),
         1 <-
           safe(fn -> :ets.select_delete(@table, [{{key, ref, :_, :_, :_}, [], [true]}]) end, 0) do
      delete_rows(event_names, ref)

      Logger.warning(
        "ElixirScope.Telemetry: handler #{inspect(id)} failed on event #{inspect(event)} " <>
          "and was detached:\n" <> Exception.format(kind, reason, stacktrace)
      )
    end

    :ok
  end

  defp forward(event_name, measurements, metadata) do
    apply(:telemetry, :execute, [event_name, measurements, metadata])
  catch
    # :telemetry was unloaded since the last refresh/0.
    :error, :undef -> refresh()
  end

  defp telemetry? do
    case :persistent_term.get(@telemetry_key, nil) do
      nil -> refresh()
      present? -> present?
    end
  end

  # ---- table --------------------------------------------------------------------

  @doc false
  # Called by the registry (the table's owner) in its init.
  def new_table do
    :ets.new(@table, [:bag, :public, :named_table, read_concurrency: true])
  end

  @doc false
  # Registry side of subscribe/2 (runs in the registry, one call at a time).
  def put_subscriber(pid, event_names, max_queue) do
    key = {:subscriber, pid}

    case :ets.lookup(@table, key) do
      [{^key, ref, old_names, ^pid, counters} = old] ->
        :atomics.put(counters, @max_queue, max_queue)

        case event_names -- old_names do
          [] ->
            :ok

          new_names ->
            :ets.insert(@table, for(e <- new_names, do: {e, ref, key, pid, counters}))
            :ets.delete_object(@table, old)
            :ets.insert(@table, {key, ref, old_names ++ new_names, pid, counters})
        end

      [] ->
        ref = make_ref()
        counters = :atomics.new(4, signed: true)
        :atomics.put(counters, @max_queue, max_queue)
        :ets.insert(@table, {key, ref, event_names, pid, counters})
        :ets.insert(@table, for(e <- event_names, do: {e, ref, key, pid, counters}))
    end

    :ok
  end

  @doc false
  # Registry side of unsubscribe/0 and of a subscriber's exit.
  def delete_subscriber(pid) do
    case take({:subscriber, pid}) do
      [{_, ref, event_names, _, _}] -> delete_rows(event_names, ref)
      [] -> :ok
    end
  end

  defp take(key) do
    :ets.take(@table, key)
  catch
    :error, :badarg -> []
  end

  defp owner?(key, ref) do
    :ets.select_count(@table, [{{key, ref, :_, :_, :_}, [], [true]}]) == 1
  end

  defp delete_rows(event_names, ref) do
    for e <- event_names, do: :ets.match_delete(@table, {e, ref, :_, :_, :_})
    :ok
  catch
    :error, :badarg -> :ok
  end

  defp safe(fun, default) do
    fun.()
  catch
    :error, :badarg -> default
  end

  defp describe({{:handler, id}, _ref, event_names, fun, config}) do
    %{type: :handler, id: id, event_names: event_names, function: fun, config: config}
  end

  defp describe({{:subscriber, pid}, _ref, event_names, pid, counters}) do
    dropped = :atomics.get(counters, @dropped)

    %{
      type: :subscriber,
      id: pid,
      pid: pid,
      event_names: event_names,
      max_queue: :atomics.get(counters, @max_queue),
      delivered: :atomics.get(counters, @seen) - dropped,
      dropped: dropped
    }
  end

  defp ensure_table! do
    if :ets.whereis(@table) == :undefined, do: raise_not_running!()
  end

  defp registry_call!(msg) do
    case Process.whereis(ElixirScope.Telemetry.Registry) do
      nil -> raise_not_running!()
      pid -> GenServer.call(pid, msg)
    end
  end

  defp raise_not_running! do
    raise ArgumentError,
          "ElixirScope.Telemetry.Registry is not running: start the :elixir_scope " <>
            "application (Application.ensure_all_started(:elixir_scope))"
  end

  # ---- validation -----------------------------------------------------------------

  defp event_name?([a]) when is_atom(a), do: true
  defp event_name?([a | rest]) when is_atom(a), do: event_name?(rest)
  defp event_name?(_), do: false

  defp event_names!(names) when is_list(names) and names != [] do
    Args.proper_list!(names, "event names")
    Enum.each(names, fn n -> unless event_name?(n), do: raise_event_name!(n) end)
    Enum.uniq(names)
  end

  defp event_names!(names) do
    raise ArgumentError,
          "event names must be a non-empty list of event names, got: #{inspect(names, limit: 5)}"
  end

  defp raise_event_name!(name) do
    raise ArgumentError,
          "an event name must be a non-empty list of atoms, got: #{inspect(name, limit: 5)}"
  end

  defp raise_map!(what, term) do
    raise ArgumentError, "#{what} must be a map, got: #{inspect(term, limit: 5)}"
  end
end

defmodule ElixirScope.Telemetry.Registry do
  @moduledoc """
  Owns the `ElixirScope.Telemetry` handler table and monitors subscribers,
  ending a subscription when its process exits. Started by the
  `:elixir_scope` application; `execute/3` and `attach/4` do not call it.
  """
  use GenServer

  @doc false
  def start_link(_opts \\ []), do: GenServer.start_link(__MODULE__, :ok, name: __MODULE__)

  @doc false
  def child_spec(arg), do: %{id: __MODULE__, start: {__MODULE__, :start_link, [arg]}}

  @impl true
  def init(:ok) do
    ElixirScope.Telemetry.new_table()
    ElixirScope.Telemetry.refresh()
    {:ok, %{}}
  end

  @impl true
  def handle_call({:subscribe, pid, event_names, max_queue}, _from, monitors) do
    :ok = ElixirScope.Telemetry.put_subscriber(pid, event_names, max_queue)
    monitors = Map.put_new_lazy(monitors, pid, fn -> Process.monitor(pid) end)
    {:reply, :ok, monitors}
  end

  def handle_call({:unsubscribe, pid}, _from, monitors) do
    {mref, monitors} = Map.pop(monitors, pid)
    if mref, do: Process.demonitor(mref, [:flush])
    ElixirScope.Telemetry.delete_subscriber(pid)
    {:reply, :ok, monitors}
  end

  @impl true
  def handle_info({:DOWN, _mref, :process, pid, _reason}, monitors) do
    ElixirScope.Telemetry.delete_subscriber(pid)
    {:noreply, Map.delete(monitors, pid)}
  end

  def handle_info(_msg, monitors), do: {:noreply, monitors}
end

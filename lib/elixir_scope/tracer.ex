defmodule ElixirScope.Tracer do
  @moduledoc """
  Traces a running application into a native pipeline. Use it through
  `ElixirScope.trace/2`, `ElixirScope.stop_trace/0`,
  `ElixirScope.trace_status/0`, `ElixirScope.flush_trace/1` and
  `ElixirScope.trace_store/0`.

  The tracer is an erl_tracer NIF (`ElixirScope.Native` is the tracer
  module): the VM calls it on the traced process's own scheduler thread and
  it writes the event straight into the pipeline's ring shard of that
  process. There are no trace messages and no tracer process, so nothing
  queues up in a mailbox however busy the traced code is; a full ring drops
  the event and counts it (`:dropped`), it never blocks the traced process.

  This process (started by the `:elixir_scope` application) only sets the
  VM's trace flags and patterns, starts the pipeline a trace writes into,
  and switches the VM's tracing off when a limit trips: limits are checked
  in the NIF on every event (`:max_events` exactly, `:duration` on every
  event and by a timer, `:max_rate` every 2^k ≤ min(1024, max_rate / 16)
  events), which stops recording at once and notifies this process. One
  trace runs at a time; its pipeline and store are kept after it stops, for
  analysis (`ElixirScope.Analysis`), until the next trace starts.
  """
  use GenServer

  alias ElixirScope.Args
  alias ElixirScope.Capture.PipelineManager
  alias ElixirScope.Native

  @events [:calls, :returns, :messages, :send, :receive, :procs]

  @defaults [
    pids: :all,
    events: [:calls, :returns, :messages, :procs],
    payload: :full,
    max_payload_bytes: 512,
    max_events: 1_000_000,
    max_rate: 500_000,
    duration: 60_000,
    max_stored: nil,
    ring_size: 131_072,
    pipeline: nil,
    # Benchmark baseline only: trace, but record nothing.
    dry_run: false
  ]

  @doc false
  def defaults, do: @defaults

  @doc false
  def start_link(_opts \\ []), do: GenServer.start_link(__MODULE__, :ok, name: __MODULE__)

  @doc false
  def child_spec(arg) do
    %{id: __MODULE__, start: {__MODULE__, :start_link, [arg]}, shutdown: 10_000}
  end

  # ---- client ---------------------------------------------------------------

  @doc false
  def trace(targets, opts) do
    opts = Args.keyword_opts!(opts, @defaults, "ElixirScope.trace/2")
    config = validate!(opts)

    with {:ok, patterns} <- resolve_targets(targets, config),
         {:ok, pids} <- resolve_pids(opts[:pids]) do
      call({:trace, patterns, pids, config})
    end
  end

  @doc false
  def stop_trace, do: call(:stop_trace)

  @doc false
  def status, do: call(:status)

  @doc false
  # The last trace's store, kept in :persistent_term (written once per
  # trace) so analysis calls do not go through this process.
  def store, do: :persistent_term.get({__MODULE__, :store}, nil)

  @doc false
  def pipeline do
    case call(:session) do
      nil -> nil
      s -> s.pm
    end
  end

  @doc false
  def flush(timeout_ms) when is_integer(timeout_ms) and timeout_ms >= 0 do
    case call(:session) do
      nil ->
        {:error, :no_trace}

      s ->
        if Process.alive?(s.pm),
          do: PipelineManager.flush(s.pm, timeout_ms),
          else: {:error, :pipeline_down}
    end
  end

  def flush(timeout_ms),
    do:
      raise(
        ArgumentError,
        "timeout must be a non-negative integer (ms), got: #{inspect(timeout_ms)}"
      )

  defp call(msg) do
    case Process.whereis(__MODULE__) do
      nil ->
        raise ArgumentError,
              "ElixirScope.Tracer is not running: start the :elixir_scope application " <>
                "(Application.ensure_all_started(:elixir_scope))"

      pid ->
        GenServer.call(pid, msg, 30_000)
    end
  end

  # ---- validation (in the caller) ---------------------------------------------

  defp validate!(opts) do
    events = opts[:events]

    unless is_list(events) and events != [] and Enum.all?(events, &(&1 in @events)) do
      raise ArgumentError,
            "events must be a non-empty list of #{inspect(@events)}, got: #{inspect(events)}"
    end

    payload = opts[:payload]

    unless payload in [:full, :arity],
      do: raise(ArgumentError, "payload must be :full or :arity, got: #{inspect(payload)}")

    for k <- [:max_payload_bytes, :max_events, :max_rate, :duration, :ring_size] do
      v = opts[k]

      unless is_integer(v) and v > 0,
        do: raise(ArgumentError, "#{k} must be a positive integer, got: #{inspect(v)}")
    end

    mpb = opts[:max_payload_bytes]

    unless mpb in 64..1_048_576,
      do: raise(ArgumentError, "max_payload_bytes must be in 64..1048576, got: #{mpb}")

    rs = opts[:ring_size]

    unless Bitwise.band(rs, rs - 1) == 0 and rs >= 64,
      do: raise(ArgumentError, "ring_size must be a power of two >= 64, got: #{rs}")

    ms = opts[:max_stored]

    unless is_nil(ms) or (is_integer(ms) and ms > 0),
      do:
        raise(ArgumentError, "max_stored must be a positive integer or nil, got: #{inspect(ms)}")

    calls? = :calls in events or :returns in events

    %{
      calls: calls?,
      returns: :returns in events,
      send: :messages in events or :send in events,
      receive: :messages in events or :receive in events,
      procs: :procs in events,
      arity_only: payload == :arity,
      max_payload_bytes: mpb,
      max_events: opts[:max_events],
      max_rate: opts[:max_rate],
      duration: opts[:duration],
      max_stored: ms || opts[:max_events],
      ring_size: rs,
      pipeline: opts[:pipeline],
      dry_run: opts[:dry_run] == true
    }
  end

  defp resolve_targets(targets, config) do
    list = if is_list(targets), do: targets, else: [targets]

    if list == [] and config.calls do
      raise ArgumentError, "nothing to trace: give modules, {m, f, a} or {:app, app}"
    end

    Enum.reduce_while(list, {:ok, []}, fn t, {:ok, acc} ->
      case target(t) do
        {:ok, pats} -> {:cont, {:ok, acc ++ pats}}
        {:error, _} = err -> {:halt, err}
      end
    end)
  end

  defp target({:app, app}) when is_atom(app) do
    _ = Application.load(app)

    case Application.spec(app, :modules) do
      nil -> {:error, {:unknown_application, app}}
      mods -> Enum.reduce_while(mods -- [Native], {:ok, []}, &add_module/2)
    end
  end

  # The tracer's own NIF module is never traced.
  defp target({Native, _, _}), do: {:error, {:cannot_trace, Native}}
  defp target(Native), do: {:error, {:cannot_trace, Native}}

  defp target({m, f, a} = mfa) when is_atom(m) and is_atom(f) and (a == :_ or is_integer(a)) do
    case Code.ensure_loaded(m) do
      {:module, ^m} -> {:ok, [mfa]}
      _ -> {:error, {:unknown_module, m}}
    end
  end

  defp target(m) when is_atom(m) and m not in [nil, true, false] do
    {_, result} = add_module(m, {:ok, []})
    result
  end

  defp target(other) do
    raise ArgumentError,
          "a trace target is a module, {module, function, arity} (function and arity may be :_) " <>
            "or {:app, app}, got: #{inspect(other)}"
  end

  defp add_module(m, {:ok, acc}) do
    case Code.ensure_loaded(m) do
      {:module, ^m} -> {:cont, {:ok, [{m, :_, :_} | acc]}}
      _ -> {:halt, {:error, {:unknown_module, m}}}
    end
  end

  defp resolve_pids(spec) when spec in [:all, :new], do: {:ok, spec}
  defp resolve_pids(pid) when is_pid(pid), do: resolve_pids([pid])

  defp resolve_pids(list) when is_list(list) and list != [] do
    Enum.reduce_while(list, {:ok, []}, fn
      pid, {:ok, acc} when is_pid(pid) ->
        cond do
          node(pid) != node() -> {:halt, {:error, {:remote_pid, pid}}}
          not Process.alive?(pid) -> {:halt, {:error, {:dead_pid, pid}}}
          true -> {:cont, {:ok, [pid | acc]}}
        end

      other, _ ->
        raise ArgumentError,
              "pids must be :all, :new, a pid or a list of pids, got: #{inspect(other)}"
    end)
  end

  defp resolve_pids(other) do
    raise ArgumentError,
          "pids must be :all, :new, a pid or a list of pids, got: #{inspect(other)}"
  end

  # ---- server ---------------------------------------------------------------

  @impl true
  def init(:ok) do
    Process.flag(:trap_exit, true)
    {:ok, %{session: nil}}
  end

  @impl true
  def handle_call({:trace, _patterns, _pids, _config}, _from, %{session: %{active: true}} = s),
    do: {:reply, {:error, :already_tracing}, s}

  def handle_call({:trace, patterns, pids, config}, _from, s) do
    s = drop_session(s)

    case start_session(patterns, pids, config) do
      {:ok, session} ->
        :persistent_term.put({__MODULE__, :store}, session.store)
        {:reply, {:ok, info(session)}, %{s | session: session}}

      {:error, _} = err ->
        {:reply, err, s}
    end
  end

  def handle_call(:stop_trace, _from, %{session: %{active: true} = session} = s) do
    session = finish(session, :stopped)
    {:reply, {:ok, summary(session)}, %{s | session: session}}
  end

  def handle_call(:stop_trace, _from, s), do: {:reply, {:error, :not_tracing}, s}

  def handle_call(:status, _from, %{session: nil} = s),
    do: {:reply, %{state: :idle}, s}

  def handle_call(:status, _from, %{session: session} = s),
    do: {:reply, summary(session), s}

  def handle_call(:session, _from, s), do: {:reply, s.session, s}

  @impl true
  def handle_info(
        {:elixir_scope_trace_stopped, tracer, _reason},
        %{session: %{active: true, tracer: tracer} = session} = s
      ) do
    {:noreply, %{s | session: finish(session, nil)}}
  end

  def handle_info({:duration, tracer}, %{session: %{active: true, tracer: tracer} = session} = s) do
    {:noreply, %{s | session: finish(session, :duration)}}
  end

  def handle_info({:EXIT, pm, reason}, %{session: %{pm: pm} = session} = s) do
    # The trace's pipeline went down: nothing more can be recorded.
    session = if session.active, do: finish(session, :stopped, false), else: session
    {:noreply, %{s | session: %{session | pm_down: reason}}}
  end

  def handle_info(_other, s), do: {:noreply, s}

  @impl true
  def terminate(_reason, %{session: %{active: true} = session}) do
    _ = finish(session, :stopped, false)
    :ok
  end

  def terminate(_reason, _s), do: :ok

  # ---- sessions ---------------------------------------------------------------

  defp start_session(patterns, pids, c) do
    with {:ok, pm, own?} <- pipeline_for(c) do
      ring = PipelineManager.ring_buffer(pm)
      store = PipelineManager.data_access(pm)

      if c.max_payload_bytes > ring.max_event_bytes do
        if own?, do: PipelineManager.shutdown(pm)

        raise ArgumentError,
              "max_payload_bytes (#{c.max_payload_bytes}) is above the pipeline's " <>
                "max_event_bytes (#{ring.max_event_bytes})"
      end

      tracer =
        Native.tracer_new(
          ring.ref,
          self(),
          c.arity_only,
          not c.dry_run,
          c.max_payload_bytes,
          c.max_events,
          c.max_rate,
          c.duration
        )

      session = %{
        active: true,
        tracer: tracer,
        pm: pm,
        own_pipeline: own?,
        ring: ring,
        store: store,
        patterns: patterns,
        pids: pids,
        config: c,
        flags: flags(c),
        started_at: System.monotonic_time(:millisecond),
        stopped_at: nil,
        reason: nil,
        timer: nil,
        pm_down: nil,
        functions: 0
      }

      case enable(session) do
        {:ok, functions} ->
          timer = Process.send_after(self(), {:duration, tracer}, c.duration)
          {:ok, %{session | timer: timer, functions: functions}}

        {:error, _} = err ->
          Native.tracer_stop(tracer, :stopped)
          disable(session)
          if own?, do: PipelineManager.shutdown(pm)
          err
      end
    end
  end

  defp pipeline_for(%{pipeline: nil} = c) do
    opts = [
      name: nil,
      shards: max(System.schedulers_online(), 1),
      ring_size: c.ring_size,
      async_writer_pool_size: 1,
      batch_size: 1000,
      flush_interval_us: 1000,
      max_events: c.max_stored,
      max_event_bytes: max(c.max_payload_bytes, 4096),
      overflow_strategy: :drop_newest
    ]

    case PipelineManager.start_link(opts) do
      {:ok, pm} -> {:ok, pm, true}
      {:error, _} = err -> err
    end
  end

  defp pipeline_for(%{pipeline: name}) do
    case GenServer.whereis(name) do
      nil -> {:error, {:no_pipeline, name}}
      pm -> {:ok, pm, false}
    end
  end

  defp flags(c) do
    Enum.concat([
      if(c.calls, do: [:call], else: []),
      if(c.calls and c.arity_only, do: [:arity], else: []),
      if(c.send, do: [:send], else: []),
      if(c.receive, do: [:receive], else: []),
      if(c.procs, do: [:procs], else: [])
    ])
  end

  defp enable(session) do
    c = session.config
    ms = if c.returns, do: [{:_, [], [{:exception_trace}]}], else: true

    functions =
      if c.calls,
        do: Enum.reduce(session.patterns, 0, &(:erlang.trace_pattern(&1, ms, [:local]) + &2)),
        else: 0

    tracer = {:tracer, Native, session.tracer}
    # Our own processes (this one, the pipeline's) are never traced; list
    # them before tracing starts, so listing them is not traced either.
    own = [self() | pipeline_processes(session.pm)]

    try do
      case session.pids do
        spec when spec in [:all, :new] ->
          _ = :erlang.trace(spec, true, [tracer | session.flags])
          Enum.each(own, &safe_untrace(&1, session.flags))

        list ->
          Enum.each(list, &:erlang.trace(&1, true, [tracer | session.flags]))
      end

      {:ok, functions}
    rescue
      ArgumentError -> {:error, :trace_failed}
    end
  end

  defp pipeline_processes(pm) do
    [pm | Enum.flat_map(Supervisor.which_children(pm), fn {_, p, _, _} -> List.wrap(p) end)]
    |> Enum.filter(&is_pid/1)
  catch
    :exit, _ -> []
  end

  defp safe_untrace(pid, flags) do
    :erlang.trace(pid, false, flags)
  rescue
    ArgumentError -> 0
  end

  defp disable(session) do
    if session.config.calls do
      Enum.each(session.patterns, &:erlang.trace_pattern(&1, false, [:local]))
    end

    case session.pids do
      spec when spec in [:all, :new] -> :erlang.trace(:all, false, session.flags)
      list -> Enum.each(list, &safe_untrace(&1, session.flags))
    end
  end

  # Stop recording (`why`: :stopped / :duration, or nil when the NIF
  # already tripped), switch the VM's tracing off, and (unless the pipeline
  # is gone) make everything recorded queryable.
  defp finish(session, why, flush? \\ true) do
    reason = Native.tracer_stop(session.tracer, why || :stopped)
    disable(session)
    if session.timer, do: Process.cancel_timer(session.timer)

    if flush? and Process.alive?(session.pm) do
      _ = PipelineManager.flush(session.pm, 5000)
    end

    st = Native.tracer_stats(session.tracer)

    ElixirScope.Telemetry.execute(
      [:elixir_scope, :tracer, :stopped],
      %{traced: st.written, dropped: st.dropped_full, shed: st.shed},
      %{reason: reason, pipeline: session.pm}
    )

    %{
      session
      | active: false,
        reason: reason,
        stopped_at: System.monotonic_time(:millisecond),
        timer: nil
    }
  end

  defp drop_session(%{session: %{own_pipeline: true, pm: pm}} = s) do
    :persistent_term.erase({__MODULE__, :store})
    if Process.alive?(pm), do: PipelineManager.shutdown(pm)
    flush_exit(pm)
    %{s | session: nil}
  end

  defp drop_session(s), do: %{s | session: nil}

  defp flush_exit(pm) do
    receive do
      {:EXIT, ^pm, _} -> :ok
    after
      0 -> :ok
    end
  end

  defp info(session) do
    %{
      pipeline: session.pm,
      store: session.store,
      functions: session.functions,
      flags: session.flags,
      pids: session.pids
    }
  end

  defp summary(session) do
    st = Native.tracer_stats(session.tracer)

    %{
      state: if(session.active, do: :tracing, else: :stopped),
      reason: session.reason,
      pipeline: session.pm,
      store: session.store,
      functions: session.functions,
      pids: session.pids,
      options: Map.drop(session.config, [:dry_run]),
      flags: session.flags,
      started_at: session.started_at,
      stopped_at: session.stopped_at,
      traced: st.written,
      dropped: st.dropped_full,
      shed: st.shed,
      over_limit: st.over_limit,
      after_stop: st.after_stop,
      truncated: st.truncated,
      offered: st.offered,
      pipeline_down: session.pm_down
    }
  end
end

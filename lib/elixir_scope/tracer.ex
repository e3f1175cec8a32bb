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
  alias ElixirScope.Tracer.{Callbacks, Stats}

  @events [:calls, :returns, :messages, :send, :receive, :procs]

  @defaults [
    pids: :all,
    events: [:calls, :returns, :messages, :procs],
    payload: :full,
    max_payload_bytes: 512,
    max_state_bytes: 65_536,
    state: :auto,
    max_events: 1_000_000,
    max_rate: 500_000,
    duration: 60_000,
    max_stored: nil,
    ring_size: 131_072,
    pipeline: nil,
    # Benchmark baseline only: trace, but record nothing.
    dry_run: false,
    # Internal (ElixirScope.Cluster): the coordinating process of a cluster
    # trace. It is told when a limit trips here, and the trace stops when it
    # goes down (its node died or a netsplit cut it off).
    owner: nil
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
    kw? = is_list(opts) and Keyword.keyword?(opts)

    case kw? && Keyword.get(opts, :mode, :events) do
      mode when mode in [false, :events] ->
        opts = if kw?, do: Keyword.delete(opts, :mode), else: opts

        cond do
          not kw? -> trace_local(targets, opts)
          Keyword.get(opts, :nodes) != nil -> ElixirScope.Cluster.trace(targets, opts)
          true -> trace_local(targets, Keyword.delete(opts, :nodes))
        end

      mode when mode in [:stats, :counts] ->
        trace_stats(targets, opts)

      other ->
        raise ArgumentError, "mode must be :events, :stats or :counts, got: #{inspect(other)}"
    end
  end

  # A stats session (see ElixirScope.Tracer.Stats): the VM's call counters,
  # no events.
  defp trace_stats(targets, opts) do
    config = Stats.validate!(opts, Keyword.keys(@defaults) ++ [:nodes])

    with {:ok, patterns} <- resolve_targets(targets, %{calls: true}),
         {:ok, pids} <- resolve_pids(Keyword.get(opts, :pids, :all)) do
      result = call({:stats_start, patterns, pids, config})
      if match?({:ok, _}, result), do: ElixirScope.Cluster.forget()
      result
    end
  end

  @doc false
  def trace_local(targets, opts) do
    explicit_msb? = is_list(opts) and Keyword.has_key?(opts, :max_state_bytes)
    opts = Args.keyword_opts!(opts, @defaults, "ElixirScope.trace/2")
    config = validate!(opts) |> Map.put(:explicit_msb, explicit_msb?)

    with {:ok, patterns} <- resolve_targets(targets, config),
         {:ok, pids} <- resolve_pids(opts[:pids]) do
      result = call({:trace, patterns, pids, with_callbacks(config, patterns)})
      # A trace started here (not as a node of a cluster trace) is the last
      # trace: analysis no longer fans out to the last cluster's nodes.
      if match?({:ok, _}, result) and config.owner == nil, do: ElixirScope.Cluster.forget()
      result
    end
  end

  @scoped_defaults [
    pids: [],
    events: [:calls, :returns, :messages, :procs],
    payload: :full,
    max_payload_bytes: 512,
    max_state_bytes: 65_536,
    state: :auto,
    max_events: 200_000,
    max_rate: 1_000_000,
    duration: 300_000,
    ring_size: 16_384
  ]

  @doc false
  # A scoped session (see the moduledoc) tracing `targets` in `root` and
  # the processes it spawns, plus `opts[:pids]`. `{:ok, session}` with
  # `:id` and `:store`, or `{:error, reason}`.
  def start_scoped(targets, root, opts) when is_pid(root) do
    opts = Args.keyword_opts!(opts, @scoped_defaults, "ElixirScope.ExUnit.trace_block/3")

    config =
      opts
      |> Keyword.merge(max_stored: nil, pipeline: nil, dry_run: false, pids: :all, owner: nil)
      |> validate!()
      |> Map.put(:explicit_msb, true)

    extra =
      case opts[:pids] do
        pids when is_list(pids) ->
          pids

        pid when is_pid(pid) ->
          [pid]

        other ->
          raise ArgumentError, "pids must be a pid or a list of pids, got: #{inspect(other)}"
      end

    with {:ok, patterns} <- resolve_targets(targets, config),
         {:ok, extra} <- resolve_extra(extra),
         {:ok, info} <-
           call({:scoped_start, patterns, root, extra, with_callbacks(config, patterns)}) do
      clear_stale(root)
      :erlang.trace(root, true, [{:tracer, Native, info.tracer} | info.flags])
      {:ok, Map.put(info, :root, root)}
    end
  end

  defp resolve_extra([]), do: {:ok, []}
  defp resolve_extra(list), do: resolve_pids(list)

  @doc false
  # Stops a scoped session (its id, or the map start_scoped/3 returned:
  # then a caller the session traces is untraced first), waits until its
  # events are stored, frees its pipeline (its store stays readable
  # through the handle) and returns `{:ok, summary}`.
  def stop_scoped(%{id: id, tracer: tracer}) do
    # Untraced first, so this call and its reply are not recorded.
    untrace_own(self(), tracer)
    call({:scoped_stop, id})
  end

  def stop_scoped(id), do: call({:scoped_stop, id})

  defp untrace_own(pid, tracer) do
    case :erlang.trace_info(pid, :tracer) do
      {:tracer, {Native, ^tracer}} -> safe_untrace(pid, [:all])
      _ -> 0
    end
  end

  @doc false
  def stop_trace, do: call(:stop_trace)

  @doc false
  def stop_owned(owner) when is_pid(owner), do: call({:stop_owned, owner})

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
      s -> s[:pm]
    end
  end

  @doc false
  def flush(timeout_ms) when is_integer(timeout_ms) and timeout_ms >= 0 do
    case call(:session) do
      nil ->
        {:error, :no_trace}

      # A stats session records no events: its counters are always current.
      %{stats: true} ->
        :ok

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

    for k <- [:max_payload_bytes, :max_state_bytes, :max_events, :max_rate, :duration, :ring_size] do
      v = opts[k]

      unless is_integer(v) and v > 0,
        do: raise(ArgumentError, "#{k} must be a positive integer, got: #{inspect(v)}")
    end

    mpb = opts[:max_payload_bytes]

    unless mpb in 64..1_048_576,
      do: raise(ArgumentError, "max_payload_bytes must be in 64..1048576, got: #{mpb}")

    msb = opts[:max_state_bytes]

    unless msb in 64..1_048_576,
      do: raise(ArgumentError, "max_state_bytes must be in 64..1048576, got: #{msb}")

    state = opts[:state]

    unless state in [:auto, :snapshot, :callbacks, true, false],
      do:
        raise(
          ArgumentError,
          "state must be :snapshot, :callbacks, false (or true for :snapshot), got: #{inspect(state)}"
        )

    rs = opts[:ring_size]

    unless Bitwise.band(rs, rs - 1) == 0 and rs >= 64,
      do: raise(ArgumentError, "ring_size must be a power of two >= 64, got: #{rs}")

    owner = opts[:owner]

    unless is_nil(owner) or is_pid(owner),
      do: raise(ArgumentError, "owner must be a pid or nil, got: #{inspect(owner)}")

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
      max_state_bytes: msb,
      state: state,
      max_events: opts[:max_events],
      max_rate: opts[:max_rate],
      duration: opts[:duration],
      max_stored: ms || opts[:max_events],
      ring_size: rs,
      pipeline: opts[:pipeline],
      dry_run: opts[:dry_run] == true,
      owner: owner
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

  # The OTP callbacks whose returns become state records (none with
  # `state: false`, or when no call is traced); `state: :auto` captures
  # them, with snapshots, when a target has any.
  defp with_callbacks(config, patterns) do
    callbacks =
      if config.state == false or not config.calls do
        []
      else
        patterns
        |> Enum.map(&elem(&1, 0))
        |> Enum.uniq()
        |> Enum.flat_map(&Callbacks.of_module(&1, patterns))
      end

    snapshot? = callbacks != [] and config.state in [:auto, :snapshot, true]
    Map.merge(config, %{callbacks: callbacks, snapshot: snapshot?})
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
    {:ok, %{session: nil, scoped: %{}, patterns: %{}}}
  end

  @impl true
  def handle_call({:trace, _patterns, _pids, _config}, _from, %{session: %{active: true}} = s),
    do: {:reply, {:error, :already_tracing}, s}

  def handle_call({:trace, _patterns, _pids, _config}, _from, %{scoped: scoped} = s)
      when map_size(scoped) > 0,
      do: {:reply, {:error, :already_tracing}, s}

  def handle_call({:trace, patterns, pids, config}, _from, s) do
    s = drop_session(s)

    case start_session(patterns, pids, config) do
      {:ok, session} ->
        :persistent_term.put({__MODULE__, :store}, session.store)
        :persistent_term.put({__MODULE__, :mode}, :events)
        {:reply, {:ok, info(session)}, %{s | session: session}}

      {:error, _} = err ->
        {:reply, err, s}
    end
  end

  def handle_call({:stats_start, _, _, _}, _from, %{session: %{active: true}} = s),
    do: {:reply, {:error, :already_tracing}, s}

  def handle_call({:stats_start, _, _, _}, _from, %{scoped: scoped} = s)
      when map_size(scoped) > 0,
      do: {:reply, {:error, :already_tracing}, s}

  def handle_call({:stats_start, patterns, pids, config}, _from, s) do
    s = drop_session(s)

    case start_stats(patterns, pids, config) do
      {:ok, session} ->
        :persistent_term.erase({__MODULE__, :store})
        :persistent_term.put({__MODULE__, :mode}, config.mode)
        {:reply, {:ok, stats_info(session)}, %{s | session: session}}

      {:error, _} = err ->
        {:reply, err, s}
    end
  end

  def handle_call(:stats_data, _from, %{session: %{stats: true} = session} = s),
    do: {:reply, %{mode: session.config.mode, data: stats_data(session)}, s}

  def handle_call(:stats_data, _from, s), do: {:reply, nil, s}

  def handle_call(:stop_trace, _from, %{session: %{stats: true, active: true} = session} = s) do
    session = finish_stats(session, :stopped)
    {:reply, {:ok, stats_summary(session)}, %{s | session: session}}
  end

  def handle_call(:stop_trace, _from, %{session: %{active: true} = session} = s) do
    session = finish(session, :stopped)
    if session.owner_monitor, do: Process.demonitor(session.owner_monitor, [:flush])
    {:reply, {:ok, summary(session)}, %{s | session: session}}
  end

  def handle_call(:stop_trace, _from, s), do: {:reply, {:error, :not_tracing}, s}

  # A cluster trace's coordinator gave up on this node's start (it did not
  # answer in time): stop the trace if it is that coordinator's.
  def handle_call(
        {:stop_owned, owner},
        from,
        %{session: %{active: true, config: %{owner: owner}}} = s
      ),
      do: handle_call(:stop_trace, from, s)

  def handle_call({:stop_owned, _owner}, _from, s), do: {:reply, {:error, :not_tracing}, s}

  def handle_call(:status, _from, %{session: nil} = s),
    do: {:reply, %{state: :idle}, s}

  def handle_call(:status, _from, %{session: %{stats: true} = session} = s),
    do: {:reply, stats_summary(session), s}

  def handle_call(:status, _from, %{session: session} = s),
    do: {:reply, summary(session), s}

  def handle_call(:session, _from, s), do: {:reply, s.session, s}

  def handle_call({:scoped_start, _, _, _, _}, _from, %{session: %{active: true}} = s),
    do: {:reply, {:error, :already_tracing}, s}

  def handle_call({:scoped_start, patterns, root, extra, config}, _from, s) do
    case start_scoped_session(patterns, root, extra, config, s) do
      {:ok, session, s} ->
        id = make_ref()
        mon = Process.monitor(root)
        session = Map.merge(session, %{id: id, monitor: mon})
        {:reply, {:ok, scoped_info(session)}, put_in(s.scoped[id], session)}

      {:error, reason, s} ->
        {:reply, {:error, reason}, s}

      {:error, _} = err ->
        {:reply, err, s}
    end
  end

  def handle_call({:scoped_stop, id}, _from, s) do
    case Map.pop(s.scoped, id) do
      {nil, _} ->
        {:reply, {:error, :not_tracing}, s}

      {session, scoped} ->
        {summary, s} = end_scoped(session, %{s | scoped: scoped})
        {:reply, {:ok, summary}, s}
    end
  end

  @impl true
  def handle_info(
        {:elixir_scope_trace_stopped, tracer, _reason},
        %{session: %{active: true, tracer: tracer} = session} = s
      ) do
    {:noreply, %{s | session: session |> finish(nil) |> tell_owner()}}
  end

  def handle_info({:stats_duration, id}, %{session: %{stats: true, active: true, id: id}} = s),
    do: {:noreply, %{s | session: finish_stats(s.session, :duration)}}

  def handle_info(
        {:stats_window, id, next},
        %{session: %{stats: true, active: true, id: id, window: {_, _}}} = s
      ),
      do: {:noreply, %{s | session: stats_window(s.session, next)}}

  def handle_info({:duration, tracer}, %{session: %{active: true, tracer: tracer} = session} = s) do
    {:noreply, %{s | session: session |> finish(:duration) |> tell_owner()}}
  end

  # The coordinator of this node's part of a cluster trace is gone (its
  # node went down, or a netsplit): stop tracing here.
  def handle_info(
        {:DOWN, mon, :process, _, _},
        %{session: %{active: true, owner_monitor: mon} = session} = s
      ) do
    session = %{finish(session, :stopped) | reason: :owner_down}
    {:noreply, %{s | session: session}}
  end

  def handle_info({:EXIT, pm, reason}, %{session: %{pm: pm} = session} = s) do
    # The trace's pipeline went down: nothing more can be recorded.
    session = if session.active, do: finish(session, :stopped, false), else: session
    {:noreply, %{s | session: %{session | pm_down: reason}}}
  end

  # The process that opened a scoped session is gone: end the session.
  def handle_info({:DOWN, mon, :process, _, _}, s) do
    case Enum.find(s.scoped, fn {_, sess} -> sess.monitor == mon end) do
      {id, session} ->
        {_, s} = end_scoped(session, %{s | scoped: Map.delete(s.scoped, id)})
        {:noreply, s}

      nil ->
        {:noreply, s}
    end
  end

  def handle_info(_other, s), do: {:noreply, s}

  @impl true
  def terminate(_reason, s) do
    case s.session do
      %{stats: true, active: true} = session -> _ = finish_stats(session, :stopped)
      %{active: true} = session -> _ = finish(session, :stopped, false)
      _ -> :ok
    end

    Enum.each(s.scoped, fn {_, session} -> end_scoped(session, %{s | scoped: %{}}) end)
    :ok
  end

  # ---- sessions ---------------------------------------------------------------

  defp start_session(patterns, pids, c) do
    with {:ok, pm, own?} <- pipeline_for(c) do
      ring = PipelineManager.ring_buffer(pm)
      store = PipelineManager.data_access(pm)

      mpb = c.max_payload_bytes
      msb = state_cap(c, ring)

      if mpb > ring.max_event_bytes or msb > ring.max_event_bytes do
        if own?, do: PipelineManager.shutdown(pm)

        raise ArgumentError,
              "max_payload_bytes (#{mpb}) and max_state_bytes (#{msb}) must not exceed " <>
                "the pipeline's max_event_bytes (#{ring.max_event_bytes})"
      end

      tracer = new_tracer(ring, c, msb, nil)
      session = new_session(tracer, pm, own?, ring, store, patterns, pids, c)

      case enable(session) do
        {:ok, functions} ->
          timer = Process.send_after(self(), {:duration, tracer}, c.duration)
          session = %{session | owner_monitor: c.owner && Process.monitor(c.owner)}
          snapshots = if c.snapshot, do: snapshot(session, pids), else: %{taken: 0, failed: 0}
          {:ok, %{session | timer: timer, functions: functions, snapshots: snapshots}}

        {:error, _} = err ->
          Native.tracer_stop(tracer, :stopped)
          disable(session)
          if own?, do: PipelineManager.shutdown(pm)
          err
      end
    end
  end

  # The state cap: as asked, or (a pipeline given, the cap not asked for)
  # the default up to what that pipeline's ring holds.
  defp state_cap(%{explicit_msb: true} = c, _ring), do: c.max_state_bytes
  defp state_cap(c, ring), do: min(c.max_state_bytes, ring.max_event_bytes)

  defp new_tracer(ring, c, msb, only) do
    Native.tracer_new(
      ring.ref,
      self(),
      c.arity_only,
      not c.dry_run,
      c.max_payload_bytes,
      msb,
      c.max_events,
      c.max_rate,
      c.duration,
      c.callbacks,
      only
    )
  end

  defp new_session(tracer, pm, own?, ring, store, patterns, pids, c) do
    %{
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
      functions: 0,
      snapshots: %{taken: 0, failed: 0},
      owner_monitor: nil
    }
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
      max_event_bytes: Enum.max([c.max_payload_bytes, c.max_state_bytes, 4096]),
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

  # `:arity` keeps argument lists out of the VM's trace messages; with
  # states captured the callbacks' arguments are needed (their trigger), so
  # the NIF counts the arity itself.
  defp flags(c) do
    Enum.concat([
      if(c.calls, do: [:call], else: []),
      if(c.calls and c.arity_only and c.callbacks == [], do: [:arity], else: []),
      if(c.send, do: [:send], else: []),
      if(c.receive, do: [:receive], else: []),
      if(c.procs, do: [:procs], else: [])
    ])
  end

  @match_spec [{:_, [], [{:exception_trace}]}]

  defp match_spec(c), do: if(c.returns, do: @match_spec, else: true)

  defp enable(session) do
    c = session.config

    functions =
      if c.calls,
        do:
          Enum.reduce(
            session.patterns,
            0,
            &(:erlang.trace_pattern(&1, match_spec(c), [:local]) + &2)
          ),
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

  # Every traced OTP process of a target module records its state now, from
  # inside itself (see the moduledoc). A `:sys` request sent by hand with a
  # plain `{pid, ref}` from, so the reply comes to this process's pid (which
  # the NIF recognizes and leaves out), not to an alias.
  @snapshot_timeout 1_000

  defp snapshot(session, pids) do
    modules = session.config.callbacks |> Enum.map(&elem(&1, 0)) |> Enum.uniq()

    candidates =
      case pids do
        :all -> :all
        :new -> []
        list -> list
      end

    procs = if candidates == [], do: [], else: Callbacks.processes(modules, candidates)
    # A process handling its first system message may load `:sys` (a
    # call to the code server, recorded): load it here first.
    _ = Code.ensure_loaded(:sys)
    tracer = session.tracer
    Native.tracer_snapshotting(tracer, true)

    try do
      Enum.reduce(procs, %{taken: 0, failed: 0}, fn {pid, m, b}, acc ->
        statem = b == :gen_statem

        fun = fn st ->
          _ = Native.tracer_snapshot(tracer, st, m, statem)
          st
        end

        ref = make_ref()
        send(pid, {:system, {self(), ref}, {:replace_state, fun}})

        receive do
          {^ref, _} -> %{acc | taken: acc.taken + 1}
        after
          @snapshot_timeout -> %{acc | failed: acc.failed + 1}
        end
      end)
    after
      Native.tracer_snapshotting(tracer, false)
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

    mark_state_gaps(session)
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

  # A limit tripped: the coordinator of a cluster trace hears it with the
  # node.
  defp tell_owner(%{config: %{owner: owner}} = session) when is_pid(owner) do
    send(owner, {:elixir_scope_node_stopped, node(), session.reason, summary(session)})
    session
  end

  defp tell_owner(session), do: session

  # State records a full ring dropped: the store answers "unknown"
  # (`:evicted`) for the times their states may have been in force, not
  # the state before them.
  # A store that is gone (its pipeline died and destroyed it) takes no gaps.
  defp mark_state_gaps(session) do
    case Native.tracer_state_drops(session.tracer) do
      [] -> :ok
      gaps -> Native.ana_add_state_gaps(session.store.ref, gaps)
    end
  rescue
    ArgumentError -> :ok
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

  # ---- stats sessions (ElixirScope.Tracer.Stats) -------------------------------

  @doc false
  # The counters of the current or last stats session (read now while it
  # runs), as ElixirScope.Tracer.Stats.call_stat/3 takes them; nil when
  # the last trace is not one.
  def stats_data, do: call(:stats_data)

  defp start_stats(patterns, pids, c) do
    tracer = if c.mode == :stats, do: Native.tracer_discard(self()), else: nil
    functions = Stats.functions(patterns)
    sampled = Stats.sampled?(c)

    matched =
      if sampled, do: Stats.sampled_on(patterns), else: Stats.patterns_on(patterns, c.mode)

    case Stats.procs_on(c.mode, pids, tracer, [self()]) do
      :ok ->
        id = make_ref()

        {:ok,
         %{
           stats: true,
           id: id,
           active: true,
           tracer: tracer,
           patterns: patterns,
           functions: functions,
           matched: matched,
           pids: pids,
           config: c,
           timer: Process.send_after(self(), {:stats_duration, id}, c.duration),
           # Sampled: call_time is on now, for the first window.
           sums: if(sampled, do: Stats.new_sums()),
           window: if(sampled, do: {:on, window_timer(id, :off, c)}),
           started_at: System.monotonic_time(:millisecond),
           stopped_at: nil,
           reason: nil,
           data: nil
         }}

      {:error, _} = err ->
        if sampled, do: Stats.sampled_off(patterns), else: Stats.patterns_off(patterns, c.mode)
        Stats.procs_off(c.mode, pids)
        if tracer, do: Native.tracer_stop(tracer, :stopped)
        err
    end
  end

  # Freeze the counters, keep what they counted, switch everything off.
  defp finish_stats(%{window: {_, timer}} = session, why) do
    # Sampled: freeze both counters, add the last window, switch off.
    c = session.config
    Process.cancel_timer(timer)
    Stats.time_off(session.patterns)
    Stats.pause(session.patterns, :counts)
    sums = Stats.add_window(session.sums, session.functions, c.max_rows)
    data = Stats.read_sampled(session.functions, sums)
    Stats.sampled_off(session.patterns)
    stats_stopped(%{session | sums: sums, window: nil}, why, data)
  end

  defp finish_stats(session, why) do
    c = session.config
    Stats.pause(session.patterns, c.mode)
    data = Stats.read(session.functions, c.mode, c.max_rows)
    Stats.patterns_off(session.patterns, c.mode)
    stats_stopped(session, why, data)
  end

  # The end both stats sessions share, once their patterns are off.
  defp stats_stopped(session, why, data) do
    Stats.procs_off(session.config.mode, session.pids)
    if session.tracer, do: Native.tracer_stop(session.tracer, :stopped)
    Process.cancel_timer(session.timer)

    %{
      session
      | active: false,
        reason: why,
        data: data,
        timer: nil,
        stopped_at: System.monotonic_time(:millisecond)
    }
  end

  defp stats_data(%{active: true, window: {_, _}} = session) do
    # Live: the sums, with what the last window counted so far.
    c = session.config
    sums = Stats.add_window(session.sums, session.functions, c.max_rows)
    Stats.read_sampled(session.functions, sums)
  end

  defp stats_data(%{active: true} = session) do
    c = session.config
    Stats.read(session.functions, c.mode, c.max_rows)
  end

  defp stats_data(session), do: session.data

  # A sampled session's next window switch.
  defp window_timer(id, next, c) do
    {on, off} = Stats.windows(c.sample)
    Process.send_after(self(), {:stats_window, id, next}, if(next == :off, do: on, else: off))
  end

  # A window's end pauses call_time; the calls it started still add their
  # time when they return (the VM keeps their return hooks), so the
  # counters are read at the next window's start, just before the restart
  # zeroes them: each call started in a window counts with its whole own
  # time (if it returned within the pause, 1/sample - 1 ms).
  defp stats_window(session, :off) do
    Stats.time_off(session.patterns)
    %{session | window: {:off, window_timer(session.id, :on, session.config)}}
  end

  defp stats_window(session, :on) do
    c = session.config
    sums = Stats.add_window(session.sums, session.functions, c.max_rows)
    Stats.time_on(session.patterns)
    %{session | sums: sums, window: {:on, window_timer(session.id, :off, c)}}
  end

  defp stats_info(session) do
    %{
      mode: session.config.mode,
      functions: session.matched,
      pids: session.pids,
      flags: if(session.config.mode == :stats, do: [:call], else: [])
    }
  end

  defp stats_summary(session) do
    data = stats_data(session)

    %{
      state: if(session.active, do: :tracing, else: :stopped),
      mode: session.config.mode,
      reason: session.reason,
      functions: session.matched,
      pids: session.pids,
      options: session.config,
      started_at: session.started_at,
      stopped_at: session.stopped_at,
      calls: data.calls,
      rows: length(data.rows),
      rows_dropped: data.rows_dropped
    }
    |> Map.merge(Map.take(data, [:sampled_calls]))
  end

  # ---- scoped sessions ----------------------------------------------------------

  defp start_scoped_session(patterns, root, extra, c, s) do
    traced = [root | extra]

    with :ok <- check_free(traced),
         {:ok, pm, true} <- pipeline_for(%{c | max_stored: c.max_events}) do
      ring = PipelineManager.ring_buffer(pm)
      store = PipelineManager.data_access(pm)
      tracer = new_tracer(ring, c, c.max_state_bytes, patterns)
      session = new_session(tracer, pm, true, ring, store, patterns, traced, c)
      s = if c.calls, do: patterns_on(s, patterns, match_spec(c)), else: s
      flags = [:set_on_spawn | session.flags]

      try do
        # The root sets its own flags once this call returned (see
        # start_scoped/3), so the reply is not recorded.
        Enum.each(extra, fn pid ->
          clear_stale(pid)
          :erlang.trace(pid, true, [{:tracer, Native, tracer} | flags])
        end)

        snapshots = if c.snapshot, do: snapshot(session, extra), else: %{taken: 0, failed: 0}
        {:ok, %{session | flags: flags, snapshots: snapshots}, s}
      rescue
        ArgumentError ->
          Native.tracer_stop(tracer, :stopped)
          Enum.each(traced, &safe_untrace(&1, flags))
          s = if c.calls, do: patterns_off(s, patterns), else: s
          PipelineManager.shutdown(pm)
          flush_exit(pm)
          {:error, :trace_failed, s}
      end
    end
  end

  # A process has one tracer: refuse one that an active session traces.
  defp check_free(pids) do
    Enum.reduce_while(pids, :ok, fn pid, :ok ->
      case :erlang.trace_info(pid, :tracer) do
        {:tracer, {Native, t}} ->
          if Native.tracer_stats(t).active,
            do: {:halt, {:error, {:already_traced, pid}}},
            else: {:cont, :ok}

        {:tracer, []} ->
          {:cont, :ok}

        {:tracer, _other} ->
          {:halt, {:error, {:already_traced, pid}}}

        :undefined ->
          {:halt, {:error, {:dead_pid, pid}}}
      end
    end)
  end

  # A process still carrying a stopped session's tracer (the VM drops it
  # lazily) takes a new one only once its flags are cleared.
  defp clear_stale(pid) do
    case :erlang.trace_info(pid, :tracer) do
      {:tracer, {Native, _}} -> safe_untrace(pid, [:all])
      _ -> 0
    end
  end

  defp patterns_on(s, patterns, ms) do
    counts =
      Enum.reduce(patterns, s.patterns, fn p, acc ->
        n = Map.get(acc, p, 0)
        if n == 0, do: :erlang.trace_pattern(p, ms, [:local])
        Map.put(acc, p, n + 1)
      end)

    %{s | patterns: counts}
  end

  defp patterns_off(s, patterns) do
    counts =
      Enum.reduce(patterns, s.patterns, fn p, acc ->
        case Map.get(acc, p, 0) do
          n when n <= 1 ->
            :erlang.trace_pattern(p, false, [:local])
            Map.delete(acc, p)

          n ->
            Map.put(acc, p, n - 1)
        end
      end)

    %{s | patterns: counts}
  end

  defp end_scoped(session, s) do
    Process.demonitor(session.monitor, [:flush])
    reason = Native.tracer_stop(session.tracer, :stopped)

    Enum.each(session.pids, fn pid ->
      case :erlang.trace_info(pid, :tracer) do
        {:tracer, {Native, t}} when t == session.tracer -> safe_untrace(pid, [:all])
        _ -> 0
      end
    end)

    s = if session.config.calls, do: patterns_off(s, session.patterns), else: s

    if Process.alive?(session.pm) do
      _ = PipelineManager.flush(session.pm, 5000)
      PipelineManager.shutdown(session.pm)
    end

    mark_state_gaps(session)

    flush_exit(session.pm)

    summary =
      session
      |> Map.merge(%{
        active: false,
        reason: reason,
        stopped_at: System.monotonic_time(:millisecond)
      })
      |> summary()

    {summary, s}
  end

  defp scoped_info(session) do
    %{
      id: session.id,
      store: session.store,
      snapshots: session.snapshots,
      flags: session.flags,
      tracer: session.tracer
    }
  end

  defp info(session) do
    %{
      pipeline: session.pm,
      store: session.store,
      functions: session.functions,
      flags: session.flags,
      pids: session.pids,
      states: session.config.callbacks != [],
      snapshots: session.snapshots
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
      options: Map.drop(session.config, [:dry_run, :owner]),
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
      states: st.states,
      states_dropped: st.states_dropped,
      snapshots: session.snapshots,
      pipeline_down: session.pm_down
    }
  end
end

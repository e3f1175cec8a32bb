defmodule ElixirScope.Capture.BackpressureManager do
  @moduledoc """
  Watches a pipeline and keeps it up under overload: computes the pressure,
  scales the native worker pool, sheds load at ingest, and reports it all
  through `ElixirScope.Telemetry`.

      {:ok, _} = BackpressureManager.start_link(pipeline: pm, auto_scale: true,
                                                min_workers: 1, max_workers: 4)
      BackpressureManager.check_pressure()              #=> :normal | :elevated | :high | :critical
      BackpressureManager.get_scaling_recommendation()  #=> {:scale_up, n} | {:scale_down, n} | :maintain
      :ok = BackpressureManager.enable_load_shedding()

  `PipelineManager` starts one per pipeline when `:backpressure_enabled` is
  true (the default), observing only (no scaling, no shedding) unless its
  `:backpressure` option says otherwise; `PipelineManager.backpressure_manager/1`
  returns it. The one registered under this module's name is the default
  for the functions below.

  ## No manager running

  The `:elixir_scope` application starts a default pipeline, and so a
  manager under this module's name, only when configured to (`config
  :elixir_scope, pipeline: ...`). When no manager runs under the name given
  (or the default one), the functions below return `{:error,
  :not_running}` instead of exiting the caller; a term that names no
  server, or a process that is not a `BackpressureManager`, raises
  `ArgumentError`.

  ## Pressure

  Every `:check_interval_ms` it reads the pipeline's metrics and rates each
  signal against `{elevated, high, critical}` thresholds:

  | signal | measure | default thresholds |
  |---|---|---|
  | `:buffer` | ring utilization (1.0 when writes were refused as `buffer_full` since the last check) | `{0.5, 0.8, 0.95}` |
  | `:latency_ms` | estimated queueing delay: events in flight / events handled per ms | `{20, 50, 200}` |
  | `:memory` | (BEAM memory + the pipeline's native store memory) / `:memory_limit_bytes` | `{0.7, 0.8, 0.9}` |
  | `:error_rate` | failed batch attempts / attempts since the last check (1.0 while the circuit breaker is open) | `{0.01, 0.05, 0.2}` |

  The pressure is the highest level of any signal. It rises at once; it
  falls only when every signal is below the lower level's thresholds scaled
  by 0.8 (hysteresis), for `:cool_down_checks` (1) checks in a row. As
  refusals are counted per interval, the check after an overload ends may
  still see its last refusals, so a fall takes up to `cool_down_checks + 1`
  intervals: 2 by default.

  ## Actions

  * **Scaling** (`auto_scale: true`): each check applies
    `get_scaling_recommendation/1` within `:min_workers..:max_workers`:
    `:critical` adds up to 4 workers, `:high` up to 2, `:elevated` 1 (while
    below `:target_workers`), `:normal` removes one (above `:min_workers`).
  * **Load shedding** (after `enable_load_shedding/1`, or `load_shedding:
    true`): the ring (and every tracer writing into it) keeps one event in
    `n` and may drop low-priority kinds, by pressure level (`:shedding`,
    default `%{normal: {1, false}, elevated: {1, true}, high: {4, true},
    critical: {16, true}}`, `{keep_one_in, drop_low_priority}`). Exceptions,
    exits, errors, spawns and links are never shed. Shed events are counted
    by reason in the pipeline's metrics (`:shedding`) and accounting line.

  ## Telemetry

  `[:elixir_scope, :layer2, :pressure | :shedding | :scaling | :circuit]`
  when they change, and `[:elixir_scope, :layer2, :throughput | :latency |
  :health]` every `:telemetry_interval_ms` (see `ElixirScope.Telemetry`).
  """
  use GenServer

  alias ElixirScope.Args
  alias ElixirScope.Capture.PipelineManager
  alias ElixirScope.Telemetry

  @levels [:normal, :elevated, :high, :critical]
  @default_thresholds %{
    buffer: {0.5, 0.8, 0.95},
    latency_ms: {20, 50, 200},
    memory: {0.7, 0.8, 0.9},
    error_rate: {0.01, 0.05, 0.2}
  }
  @default_shedding %{
    normal: {1, false},
    elevated: {1, true},
    high: {4, true},
    critical: {16, true}
  }
  @history 50

  @defaults [
    name: __MODULE__,
    pipeline: PipelineManager,
    check_interval_ms: 100,
    telemetry_interval_ms: 1000,
    cool_down_checks: 1,
    auto_scale: false,
    min_workers: 1,
    max_workers: 8,
    target_workers: nil,
    load_shedding: false,
    thresholds: %{},
    shedding: %{},
    memory_limit_bytes: nil
  ]

  @type level :: :normal | :elevated | :high | :critical
  @type server :: GenServer.server()

  @doc """
  Starts a manager for `:pipeline` (a `PipelineManager` name or pid).
  Options (defaults): #{inspect(@defaults)}. `:thresholds` and `:shedding`
  maps override the defaults per key; `:memory_limit_bytes` defaults to
  the machine's memory (`/proc/meminfo`), else 8 GiB.
  """
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    config = validate_opts!(opts)

    case config.name do
      nil -> GenServer.start_link(__MODULE__, config)
      name -> GenServer.start_link(__MODULE__, config, name: name)
    end
  end

  @doc false
  # The validated config map, or ArgumentError.
  def validate_opts!(opts),
    do: opts |> Args.keyword_opts!(@defaults, "BackpressureManager") |> validate!()

  @doc "The current pressure level (`{:error, :not_running}`: see above)."
  @spec check_pressure(server()) :: level() | {:error, :not_running}
  def check_pressure(server \\ __MODULE__), do: call(server, :pressure)

  @doc "What the scaling policy recommends for the current pressure and pool size."
  @spec get_scaling_recommendation(server()) ::
          {:scale_up, pos_integer()}
          | {:scale_down, pos_integer()}
          | :maintain
          | {:error, :not_running}
  def get_scaling_recommendation(server \\ __MODULE__),
    do: call(server, :recommendation)

  @doc "Turns adaptive load shedding on (it follows the pressure from now on)."
  @spec enable_load_shedding(server()) :: :ok | {:error, :not_running}
  def enable_load_shedding(server \\ __MODULE__),
    do: call(server, {:shedding, true})

  @doc "Turns load shedding off; the ring keeps every event again."
  @spec disable_load_shedding(server()) :: :ok | {:error, :not_running}
  def disable_load_shedding(server \\ __MODULE__),
    do: call(server, {:shedding, false})

  @doc """
  The manager's view: `:level`, the last `:readings` and the level of each
  signal, `:workers`, `:shedding`, `:circuit`, the config and the last
  #{@history} transitions (`:history`, newest first).
  """
  @spec get_state(server()) :: map() | {:error, :not_running}
  def get_state(server \\ __MODULE__), do: call(server, :get_state)

  @doc "Runs a check now (as the timer does) and returns the new level."
  @spec check_now(server()) :: level() | {:error, :not_running}
  def check_now(server \\ __MODULE__), do: call(server, :check_now)

  defp call(server, request) do
    case Args.server(server, __MODULE__) do
      nil ->
        {:error, :not_running}

      dest ->
        try do
          GenServer.call(dest, request)
        catch
          # It stopped between the lookup and the call.
          :exit, {:noproc, _} -> {:error, :not_running}
          :exit, {:normal, _} -> {:error, :not_running}
          :exit, {:shutdown, _} -> {:error, :not_running}
        end
    end
  end

  # ---- validation -------------------------------------------------------------

  defp validate!(opts) do
    for k <- [:check_interval_ms, :telemetry_interval_ms, :cool_down_checks] do
      pos!(k, opts[k])
    end

    for k <- [:auto_scale, :load_shedding] do
      unless is_boolean(opts[k]), do: bad!(k, opts[k], "a boolean")
    end

    {min, max} = {opts[:min_workers], opts[:max_workers]}

    unless is_integer(min) and is_integer(max) and min in 1..64 and max in min..64,
      do: bad!(:max_workers, {min, max}, "min_workers..max_workers within 1..64")

    target = opts[:target_workers] || max

    unless is_integer(target) and target in min..max,
      do: bad!(:target_workers, target, "an integer in min_workers..max_workers")

    thresholds = merge!(:thresholds, opts[:thresholds], @default_thresholds, &threshold?/1)
    shedding = merge!(:shedding, opts[:shedding], @default_shedding, &shedding?/1)

    mem = opts[:memory_limit_bytes] || system_memory()
    pos!(:memory_limit_bytes, mem)

    opts
    |> Map.new()
    |> Map.merge(%{
      target_workers: target,
      thresholds: thresholds,
      shedding: shedding,
      memory_limit_bytes: mem
    })
  end

  defp merge!(k, given, defaults, ok?) do
    unless is_map(given), do: bad!(k, given, "a map")

    Enum.each(given, fn {key, v} ->
      unless Map.has_key?(defaults, key) and ok?.(v),
        do: bad!(k, {key, v}, "keys in #{inspect(Map.keys(defaults))} with valid values")
    end)

    Map.merge(defaults, given)
  end

  defp threshold?({a, b, c}),
    do: is_number(a) and is_number(b) and is_number(c) and a <= b and b <= c

  defp threshold?(_), do: false

  defp shedding?({n, low}), do: is_integer(n) and n >= 1 and is_boolean(low)
  defp shedding?(_), do: false

  defp pos!(_k, v) when is_integer(v) and v > 0, do: :ok
  defp pos!(k, v), do: bad!(k, v, "a positive integer")

  defp bad!(k, v, what),
    do:
      raise(
        ArgumentError,
        "BackpressureManager option #{inspect(k)} must be #{what}, got: #{inspect(v)}"
      )

  defp system_memory do
    with {:ok, text} <- File.read("/proc/meminfo"),
         [_, kb] <- Regex.run(~r/MemTotal:\s+(\d+) kB/, text) do
      String.to_integer(kb) * 1024
    else
      _ -> 8 * 1024 * 1024 * 1024
    end
  end

  # ---- server -------------------------------------------------------------------

  @impl true
  def init(c) do
    s = %{
      config: c,
      level: :normal,
      raw: :normal,
      calm_checks: 0,
      readings: %{},
      signal_levels: %{},
      shedding: c.load_shedding,
      applied_shed: nil,
      circuit: :closed,
      workers: nil,
      last: nil,
      history: [],
      checks: 0,
      tel_prev: nil
    }

    Process.send_after(self(), :check, c.check_interval_ms)
    {:ok, s}
  end

  @impl true
  def handle_call(:pressure, _from, s), do: {:reply, s.level, s}

  def handle_call(:recommendation, _from, s),
    do: {:reply, recommend(s.level, s.workers || s.config.min_workers, s.config), s}

  def handle_call({:shedding, on}, _from, s) do
    s = apply_shedding(%{s | shedding: on})
    {:reply, :ok, s}
  end

  def handle_call(:check_now, _from, s) do
    s = check(s)
    {:reply, s.level, s}
  end

  def handle_call(:get_state, _from, s) do
    {:reply,
     %{
       level: s.level,
       raw_level: s.raw,
       readings: s.readings,
       signal_levels: s.signal_levels,
       workers: s.workers,
       shedding: %{enabled: s.shedding, policy: s.applied_shed},
       circuit: s.circuit,
       checks: s.checks,
       history: s.history,
       config: s.config
     }, s}
  end

  @impl true
  def handle_info(:check, s) do
    Process.send_after(self(), :check, s.config.check_interval_ms)
    {:noreply, check(s)}
  end

  def handle_info(_other, s), do: {:noreply, s}

  # ---- one check ------------------------------------------------------------------

  defp check(s) do
    case metrics(s.config.pipeline) do
      nil ->
        s

      m ->
        now = System.monotonic_time(:millisecond)
        readings = readings(m, s.last, now, s.config)
        levels = Map.new(readings, fn {k, v} -> {k, rate(v, s.config.thresholds[k], 1.0)} end)
        raw = Enum.max_by(Map.values(levels), &index/1)

        # Falling needs every signal under the lower level's thresholds x 0.8.
        calm =
          readings
          |> Enum.map(fn {k, v} -> rate(v, s.config.thresholds[k], 0.8) end)
          |> Enum.max_by(&index/1)

        s = %{
          s
          | readings: readings,
            signal_levels: levels,
            raw: raw,
            workers: m.native.pool.workers,
            last: {now, m},
            checks: s.checks + 1
        }

        s
        |> next_level(raw, calm)
        |> circuit(m)
        |> scale()
        |> apply_shedding()
        |> periodic_telemetry(m, now)
    end
  end

  defp metrics(pm) do
    PipelineManager.get_metrics(pm)
  catch
    :exit, _ -> nil
  end

  defp readings(m, last, now, c) do
    n = m.native
    acc = m.accounting
    {dt, prev} = if last, do: {max(now - elem(last, 0), 1), elem(last, 1).native}, else: {1, nil}
    delta = fn get -> if prev, do: max(get.(n) - get.(prev), 0), else: 0 end

    refused = delta.(& &1.accounting.buffer_full)
    buffer = if refused > 0, do: 1.0, else: n.ring.utilization
    handled = delta.(& &1.engine.handled)

    latency_ms =
      cond do
        acc.in_flight == 0 -> 0.0
        handled == 0 -> dt * 1.0
        true -> acc.in_flight / (handled / dt)
      end

    memory = (:erlang.memory(:total) + n.store.memory_bytes) / c.memory_limit_bytes
    attempts = delta.(& &1.pool.batches) + delta.(& &1.pool.retries)

    error_rate =
      cond do
        n.breaker.state != :closed -> 1.0
        attempts == 0 -> 0.0
        true -> delta.(& &1.pool.retries) / attempts
      end

    %{buffer: buffer, latency_ms: latency_ms, memory: memory, error_rate: error_rate}
  end

  defp rate(v, {e, h, c}, scale) do
    cond do
      v > c * scale -> :critical
      v > h * scale -> :high
      v > e * scale -> :elevated
      true -> :normal
    end
  end

  defp index(level), do: Enum.find_index(@levels, &(&1 == level))

  defp next_level(s, raw, calm) do
    cond do
      index(raw) > index(s.level) ->
        transition(%{s | calm_checks: 0}, raw)

      index(calm) < index(s.level) ->
        calm_checks = s.calm_checks + 1

        if calm_checks >= s.config.cool_down_checks,
          do: transition(%{s | calm_checks: 0}, calm),
          else: %{s | calm_checks: calm_checks}

      true ->
        %{s | calm_checks: 0}
    end
  end

  defp transition(s, to) do
    from = s.level
    emit(s, :pressure, %{level: index(to)}, %{from: from, to: to})
    entry = %{at: System.system_time(:millisecond), from: from, to: to, readings: s.readings}
    %{s | level: to, history: Enum.take([entry | s.history], @history)}
  end

  defp circuit(s, m) do
    state = m.native.breaker.state

    if state != s.circuit do
      emit(s, :circuit, %{}, %{from: s.circuit, to: state})
      %{s | circuit: state}
    else
      s
    end
  end

  @doc false
  # The seeds' scaling policy.
  def recommend(level, workers, c) do
    case level do
      :critical when workers < c.max_workers -> {:scale_up, min(4, c.max_workers - workers)}
      :high when workers < c.max_workers -> {:scale_up, min(2, c.max_workers - workers)}
      :elevated when workers < c.target_workers -> {:scale_up, 1}
      :normal when workers > c.min_workers -> {:scale_down, 1}
      _ -> :maintain
    end
  end

  defp scale(%{config: %{auto_scale: false}} = s), do: s

  defp scale(s) do
    workers = s.workers

    to =
      case recommend(s.level, workers, s.config) do
        {:scale_up, n} -> workers + n
        {:scale_down, n} -> workers - n
        :maintain -> workers
      end

    # Outside the bounds (set by hand): come back within them.
    to = to |> max(s.config.min_workers) |> min(s.config.max_workers)

    if to != workers do
      case safe_update(s.config.pipeline, async_writer_pool_size: to) do
        :ok ->
          emit(s, :scaling, %{workers: to}, %{from: workers, to: to})
          %{s | workers: to}

        _ ->
          s
      end
    else
      s
    end
  end

  defp safe_update(pm, changes) do
    PipelineManager.update_config(pm, changes)
  catch
    :exit, _ -> :error
  end

  defp apply_shedding(s) do
    policy = if s.shedding, do: s.config.shedding[s.level], else: {1, false}

    if policy != s.applied_shed do
      case set_shedding(s.config.pipeline, policy) do
        :ok ->
          {n, low} = policy

          emit(s, :shedding, %{keep_one_in: n}, %{
            enabled: s.shedding,
            level: s.level,
            drop_low_priority: low
          })

          %{s | applied_shed: policy}

        _ ->
          s
      end
    else
      s
    end
  end

  defp set_shedding(pm, {n, low}) do
    pipe = PipelineManager.handles(pm).pipe
    :ok = ElixirScope.Native.pipe_configure(pipe, :shed_keep_one_in, n)
    :ok = ElixirScope.Native.pipe_configure(pipe, :shed_low_priority, low)
  catch
    :exit, _ -> :error
  end

  defp periodic_telemetry(s, m, now) do
    n = m.native
    sample = {now, n.pool.batches, n.engine.busy_ns}
    {t0, b0, busy0} = s.tel_prev || sample

    if now - t0 >= s.config.telemetry_interval_ms do
      secs = (now - t0) / 1000
      workers = max(s.workers || 1, 1)

      emit(
        s,
        :throughput,
        %{
          events_per_second: m.events_per_second,
          batches_per_second: (n.pool.batches - b0) / secs
        },
        %{}
      )

      emit(
        s,
        :latency,
        %{p50: m.latency.p50_ns, p95: m.latency.p95_ns, p99: m.latency.p99_ns},
        %{}
      )

      emit(
        s,
        :health,
        %{
          buffer_utilization: n.ring.utilization,
          correlation_success_rate: m.correlation_success_rate,
          worker_utilization: min((n.engine.busy_ns - busy0) / (secs * 1.0e9 * workers), 1.0)
        },
        %{level: s.level}
      )

      %{s | tel_prev: sample}
    else
      %{s | tel_prev: s.tel_prev || sample}
    end
  end

  defp emit(s, what, measurements, metadata) do
    Telemetry.execute(
      [:elixir_scope, :layer2, what],
      measurements,
      Map.put(metadata, :pipeline, s.config.pipeline)
    )
  end
end

defmodule ElixirScope.CapacityPlanning do
  @moduledoc """
  What a pipeline needs for a given load, computed from this machine's
  measured per-event costs (the seeds' appendix D.3, without its assumed
  constants).

      plan = ElixirScope.CapacityPlanning.calculate_requirements(200_000, retention_s: 60)
      plan.recommended_workers   # 1
      plan.drop_risk             # :low

  ## The calibration

  `calibrate/1` runs a short load on a private pipeline (about half a
  second: one producer writes a mix of calls, returns, sends, receives and
  state changes as fast as it can, into a pipeline with one worker) and
  measures:

    * `write_ns` — a producer's cost per event (the `Ingestor` NIF call);
    * `stage_ns` — the correlate-and-store stage's busy time per event (the
      stage runs under the correlator and store locks, so it is the
      pipeline's serial cost whatever the number of workers);
    * `bytes_per_event` — the store's memory per stored event (headers,
      indexes, payloads);
    * `schedulers` — schedulers online.

  `calculate_requirements/2` uses the last calibration (kept in
  `:persistent_term`), runs one when there is none (`calibrate: :auto`, the
  default), always runs a fresh one with `calibrate: true`, or takes
  `calibration:` (a map as `calibrate/1` returns).

  ## The plan

    * `stage_utilization` — `events_per_second × stage_ns / 1e9`: the share
      of one core the stage needs; at 1.0 and above the pipeline cannot keep
      up.
    * `cpu_cores` — producers' and the stage's cores together, beside
      `schedulers`.
    * `min_workers`, `recommended_workers` — one worker keeps the stage busy;
      a second overlaps reading the rings with processing once the stage is
      more than half busy (more do not pay: workers take turns on the
      locks).
    * `ring_size` (per shard, a power of two) and `ring_buffer_size`
      (`shards × ring_size`) — room for `burst_ms` of events arriving at
      twice the average rate while the stage is held up. A process's
      writes all go to its shard, so the burst is split over `writers`
      (the number of busy writing processes, default 1), not over the
      shards; `ring_memory_mb` is the slots' fixed part (104 bytes each,
      payload buffers come on top).
    * `max_events`, `store_memory_mb` — the store bound for `retention_s`
      seconds of events, and its memory at `bytes_per_event`.
    * `correlation_ttl_seconds` — `retention_s`, at most the default 300.
    * `drop_risk` — from the larger of `stage_utilization` and `cpu_cores /
      schedulers`: `:low` below 0.5, `:moderate` below 0.8, `:high` below
      1.0, `:certain` from 1.0 (with `expected_drop_rate`, events/s the
      stage cannot take).
  """

  alias ElixirScope.Capture.{Ingestor, PipelineManager}

  @key {__MODULE__, :calibration}
  @max_events_limit 536_870_912

  @doc """
  Resources for `events_per_second` (see "The plan"). Options:
  `:retention_s` (300), `:burst_ms` (100), `:shards` (16), `:writers`
  (1), `:calibrate`
  (`:auto`, `true`, `false`: `false` raises when no calibration exists),
  `:calibration`.
  """
  @spec calculate_requirements(pos_integer(), keyword()) :: map()
  def calculate_requirements(events_per_second, opts \\ [])

  def calculate_requirements(eps, opts) when is_integer(eps) and eps > 0 do
    o =
      ElixirScope.Args.keyword_opts!(
        opts,
        [
          retention_s: 300,
          burst_ms: 100,
          shards: 16,
          writers: 1,
          calibrate: :auto,
          calibration: nil
        ],
        "calculate_requirements"
      )

    for k <- [:retention_s, :burst_ms, :shards, :writers] do
      unless is_integer(o[k]) and o[k] > 0,
        do:
          raise(
            ArgumentError,
            "option #{inspect(k)} must be a positive integer, got: #{inspect(o[k])}"
          )
    end

    unless o[:shards] <= 256, do: raise(ArgumentError, "option :shards must be at most 256")

    c = calibration!(o)
    rho = eps * c.stage_ns / 1.0e9
    cores = eps * (c.write_ns + c.stage_ns) / 1.0e9
    load = max(rho, cores / c.schedulers)

    slots = ceil(eps * o[:burst_ms] / 1000 * 2)
    # A process writes to one shard: the burst of each of `writers` busy
    # processes lands in its own shard.
    spread = min(o[:writers], o[:shards])
    ring_size = slots |> div_ceil(spread) |> max(1024) |> next_pow2() |> min(16_777_216)
    max_events = min(eps * o[:retention_s], @max_events_limit)

    %{
      events_per_second: eps,
      stage_utilization: Float.round(rho, 3),
      cpu_cores: Float.round(cores, 3),
      schedulers: c.schedulers,
      min_workers: 1,
      recommended_workers: if(rho > 0.5, do: 2, else: 1),
      shards: o[:shards],
      ring_size: ring_size,
      ring_buffer_size: ring_size * o[:shards],
      ring_memory_mb: Float.round(ring_size * o[:shards] * 104 / 1_048_576, 1),
      max_events: max_events,
      store_memory_mb: Float.round(max_events * c.bytes_per_event / 1_048_576, 1),
      retention_s: o[:retention_s],
      retention_capped: eps * o[:retention_s] > @max_events_limit,
      correlation_ttl_seconds: min(o[:retention_s], 300),
      drop_risk: risk(load),
      expected_drop_rate: max(0, round(eps - 1.0e9 / c.stage_ns)),
      calibration: c
    }
  end

  def calculate_requirements(eps, _opts),
    do: raise(ArgumentError, "events_per_second must be a positive integer, got: #{inspect(eps)}")

  defp risk(x) when x < 0.5, do: :low
  defp risk(x) when x < 0.8, do: :moderate
  defp risk(x) when x < 1.0, do: :high
  defp risk(_), do: :certain

  defp calibration!(o) do
    case {o[:calibration], o[:calibrate]} do
      {%{write_ns: w, stage_ns: s, bytes_per_event: b, schedulers: n} = c, _}
      when is_number(w) and is_number(s) and s > 0 and is_number(b) and is_integer(n) and n > 0 ->
        c

      {nil, true} ->
        calibrate()

      {nil, :auto} ->
        :persistent_term.get(@key, nil) || calibrate()

      {nil, false} ->
        :persistent_term.get(@key, nil) ||
          raise ArgumentError, "no calibration yet: pass calibrate: true (or :auto)"

      {nil, other} ->
        raise ArgumentError,
              "option :calibrate must be :auto, true or false, got: #{inspect(other)}"

      {other, _} ->
        raise ArgumentError,
              "option :calibration must be a map with write_ns, stage_ns, bytes_per_event, schedulers, got: #{inspect(other)}"
    end
  end

  @doc """
  Measures this machine's per-event costs (see "The calibration") with
  `events` events (default 200,000) and keeps the result for
  `calculate_requirements/2`.
  """
  @spec calibrate(keyword()) :: map()
  def calibrate(opts \\ []) do
    o = ElixirScope.Args.keyword_opts!(opts, [events: 200_000], "calibrate")
    n = o[:events]

    unless is_integer(n) and n >= 5_000,
      do: raise(ArgumentError, "option :events must be an integer >= 5000, got: #{inspect(n)}")

    {:ok, pm} =
      PipelineManager.start_link(
        name: nil,
        shards: 16,
        ring_size: 65_536,
        async_writer_pool_size: 1,
        batch_size: 1000,
        max_events: n,
        backpressure_enabled: false
      )

    try do
      buf = PipelineManager.ring_buffer(pm)
      rounds = div(n, 5)

      {us, _} =
        :timer.tc(fn ->
          Task.async(fn -> write_mix(buf, rounds) end) |> Task.await(:infinity)
        end)

      :ok = PipelineManager.flush(pm, 60_000)
      m = PipelineManager.get_metrics(pm)
      eng = m.native.engine
      written = rounds * 5

      c = %{
        write_ns: Float.round(us * 1000 / written, 1),
        stage_ns: Float.round(eng.busy_ns / max(eng.handled, 1), 1),
        bytes_per_event:
          Float.round(m.native.store.memory_bytes / max(m.native.store.total_events, 1), 1),
        schedulers: System.schedulers_online(),
        events: written,
        refused: m.accounting.buffer_full,
        measured_at: DateTime.utc_now()
      }

      :persistent_term.put(@key, c)
      c
    after
      Supervisor.stop(pm)
    end
  end

  # Call, send, receive, state change, return, per round; a full shard is
  # retried (counted in the calibration's `refused`).
  defp write_mix(buf, rounds) do
    me = self()

    for i <- 1..rounds do
      retry(fn -> Ingestor.ingest_function_call(buf, __MODULE__, :work, [i, :arg], me, i) end)
      retry(fn -> Ingestor.ingest_message_send(buf, me, me, {:msg, i}) end)
      retry(fn -> Ingestor.ingest_message_receive(buf, me, {:msg, i}) end)
      retry(fn -> Ingestor.ingest_state_change(buf, me, i - 1, i) end)
      retry(fn -> Ingestor.ingest_function_return(buf, {:ok, i}, 1000, i) end)
    end
  end

  defp retry(f) do
    case f.() do
      :ok ->
        :ok

      {:error, :buffer_full} ->
        Process.sleep(1)
        retry(f)
    end
  end

  defp div_ceil(a, b), do: div(a + b - 1, b)

  defp next_pow2(n), do: Bitwise.bsl(1, ceil(:math.log2(n)))
end

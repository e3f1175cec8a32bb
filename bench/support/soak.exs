defmodule ElixirScope.Bench.Soak do
  @moduledoc """
  A soak run: producers write at a steady rate into a pipeline (with its
  BackpressureManager scaling and shedding) for a while; every sample
  interval it records throughput, memory (RSS, BEAM, the native store),
  drops by reason and write→stored latency percentiles over the interval.

  Used by `bench/soak_bench.exs` (minutes, printed as a table) and, in a
  short version, by `test/elixir_scope/soak_test.exs` (invariants only).

  Each producer writes, per round, a call, a nested call, a message to
  itself, its receive and the two returns (6 events), paced in 10 ms ticks
  to `rate / producers` events per second.
  """

  alias ElixirScope.Capture.{Ingestor, PipelineManager}
  alias ElixirScope.Native

  @doc """
  Runs a soak. Options: `:seconds`, `:rate` (events/s, all producers),
  `:producers`, `:sample_ms`, `:max_events`, `:pipeline` (extra
  PipelineManager options), `:on_sample` (called with each sample).
  Returns `%{samples: [...], final: metrics, offered: n, written: n,
  refused: n}`.
  """
  def run(opts) do
    seconds = Keyword.fetch!(opts, :seconds)
    rate = Keyword.fetch!(opts, :rate)
    producers = Keyword.get(opts, :producers, 2)
    sample_ms = Keyword.get(opts, :sample_ms, 5000)
    on_sample = Keyword.get(opts, :on_sample, fn _ -> :ok end)

    pm_opts =
      Keyword.merge(
        [
          name: nil,
          shards: 8,
          ring_size: 65_536,
          async_writer_pool_size: 1,
          batch_size: 1000,
          max_events: Keyword.get(opts, :max_events, 1_000_000),
          backpressure: [auto_scale: true, min_workers: 1, max_workers: 4, load_shedding: true]
        ],
        Keyword.get(opts, :pipeline, [])
      )

    {:ok, pm} = PipelineManager.start_link(pm_opts)
    Process.unlink(pm)
    buf = PipelineManager.ring_buffer(pm)
    pipe = PipelineManager.handles(pm).pipe
    parent = self()
    t0 = System.monotonic_time(:millisecond)
    until = t0 + seconds * 1000
    per_tick = max(div(rate, producers * 100), 6)

    pids =
      for p <- 1..producers do
        spawn_link(fn ->
          send(parent, {:producer, self(), produce(buf, p, per_tick, until, t0, 0, {0, 0})})
        end)
      end

    samples = sample_loop(pm, pipe, t0, until, sample_ms, nil, [], on_sample)

    {written, refused} =
      Enum.reduce(pids, {0, 0}, fn pid, {w, r} ->
        receive do
          {:producer, ^pid, {ok, full}} -> {w + ok, r + full}
        end
      end)

    :ok = PipelineManager.flush(pm, 60_000)
    final = PipelineManager.get_metrics(pm)
    line = PipelineManager.accounting_line(pm)
    PipelineManager.shutdown(pm)

    %{
      samples: Enum.reverse(samples),
      final: final,
      accounting_line: line,
      written: written,
      refused: refused,
      offered: written + refused
    }
  end

  # 10 ms ticks: write `per_tick` events (in rounds of 6), then sleep to
  # the next tick. Returns {ok, buffer_full}.
  defp produce(buf, p, per_tick, until, t0, tick, {ok, full} = acc) do
    now = System.monotonic_time(:millisecond)

    if now >= until do
      acc
    else
      acc = write_rounds(buf, p, tick, div(per_tick, 6), {ok, full})
      next = t0 + (tick + 1) * 10
      wait = next - System.monotonic_time(:millisecond)
      if wait > 0, do: Process.sleep(wait)
      produce(buf, p, per_tick, until, t0, tick + 1, acc)
    end
  end

  defp write_rounds(_buf, _p, _tick, 0, acc), do: acc

  defp write_rounds(buf, p, tick, n, acc) do
    me = self()
    k = {p, tick, n}

    acc =
      acc
      |> count(Ingestor.ingest_function_call(buf, Soak.Server, :handle, [n], me, {:h, k}))
      |> count(Ingestor.ingest_function_call(buf, Soak.Work, :step, [n], me, {:s, k}))
      |> count(Ingestor.ingest_message_send(buf, me, me, {:done, k}))
      |> count(Ingestor.ingest_message_receive(buf, me, {:done, k}))
      |> count(Ingestor.ingest_function_return(buf, n, 100, {:s, k}))
      |> count(Ingestor.ingest_function_return(buf, :ok, 300, {:h, k}))

    write_rounds(buf, p, tick, n - 1, acc)
  end

  defp count({ok, full}, :ok), do: {ok + 1, full}
  defp count({ok, full}, {:error, :buffer_full}), do: {ok, full + 1}

  defp sample_loop(pm, pipe, t0, until, sample_ms, prev, acc, on_sample) do
    now = System.monotonic_time(:millisecond)

    if now >= until do
      acc
    else
      Process.sleep(min(sample_ms, max(until - now, 1)))
      s = sample(pm, pipe, t0, prev)
      on_sample.(s)
      sample_loop(pm, pipe, t0, until, sample_ms, s, [s | acc], on_sample)
    end
  end

  defp sample(pm, pipe, t0, prev) do
    now = System.monotonic_time(:millisecond)
    m = PipelineManager.get_metrics(pm)
    acc = m.accounting
    # Percentiles of this interval only.
    :ok = Native.pipe_reset_latency(pipe)
    handled = m.native.engine.handled
    {pt, ph} = if prev, do: {prev.at_ms, prev.handled}, else: {0, 0}

    %{
      at_ms: now - t0,
      handled: handled,
      events_per_second: (handled - ph) * 1000 / max(now - t0 - pt, 1),
      rss_bytes: rss(),
      beam_bytes: :erlang.memory(:total),
      store_bytes: m.native.store.memory_bytes,
      stored: m.native.store.total_events,
      max_events: m.native.store.max_events,
      workers: m.active_workers,
      pressure: pressure(pm),
      p50_us: div(m.latency.p50_ns, 1000),
      p95_us: div(m.latency.p95_ns, 1000),
      p99_us: div(m.latency.p99_ns, 1000),
      drops: %{
        buffer_full: acc.buffer_full,
        shed: acc.shed,
        evicted: acc.evicted,
        dead_lettered: acc.dead_lettered
      },
      unaccounted: acc.unaccounted,
      in_flight: acc.in_flight
    }
  end

  defp pressure(pm) do
    case PipelineManager.backpressure_manager(pm) do
      nil -> nil
      bpm -> ElixirScope.Capture.BackpressureManager.check_pressure(bpm)
    end
  end

  @doc "The BEAM's resident set size (bytes), from /proc; 0 elsewhere."
  def rss do
    case File.read("/proc/self/status") do
      {:ok, text} ->
        case Regex.run(~r/VmRSS:\s+(\d+) kB/, text) do
          [_, kb] -> String.to_integer(kb) * 1024
          _ -> 0
        end

      _ ->
        0
    end
  end

  @doc """
  Spread of `key` over the samples after warm-up: `{min, max, mean,
  max deviation from the mean in %}`.
  """
  def spread(samples, key) do
    vals = Enum.map(samples, &Map.fetch!(&1, key))

    case vals do
      [] ->
        nil

      _ ->
        mean = Enum.sum(vals) / length(vals)
        {lo, hi} = Enum.min_max(vals)
        dev = if mean == 0, do: 0.0, else: max(hi - mean, mean - lo) / mean * 100
        {lo, hi, mean, dev}
    end
  end
end

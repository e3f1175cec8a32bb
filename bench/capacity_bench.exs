# CapacityPlanning checked against a measured run:
#
#   mix run bench/capacity_bench.exs
#
# Calibrates, asks calculate_requirements/2 for RATE events/s (default
# 300,000) with RETENTION_S seconds of retention (default 5), starts a
# pipeline with the recommended ring, workers and max_events, drives it at
# RATE (2 paced producers, the calibration's event mix) for RETENTION_S +
# 3 s, and prints the prediction beside what was measured: the stage's
# utilization (busy time / wall time), refused and dropped events, the
# store's memory once full.
Code.require_file("support/harness.exs", __DIR__)
alias ElixirScope.Capture.{Ingestor, PipelineManager}
alias ElixirScope.CapacityPlanning

rate = ElixirScope.Bench.Harness.env_int("RATE", 300_000)
retention = ElixirScope.Bench.Harness.env_int("RETENTION_S", 5)
IO.puts(ElixirScope.Bench.Harness.machine())
IO.puts("load before: #{String.trim(File.read!("/proc/loadavg"))}")

plan =
  CapacityPlanning.calculate_requirements(rate,
    retention_s: retention,
    writers: 2,
    calibrate: true
  )

IO.inspect(Map.delete(plan, :calibration), label: "plan")
IO.inspect(plan.calibration, label: "calibration")

{:ok, pm} =
  PipelineManager.start_link(
    name: nil,
    shards: plan.shards,
    ring_size: plan.ring_size,
    async_writer_pool_size: plan.recommended_workers,
    batch_size: 1000,
    max_events: plan.max_events,
    correlation_ttl_ms: plan.correlation_ttl_seconds * 1000
  )

buf = PipelineManager.ring_buffer(pm)
seconds = retention + 3
per_tick = div(rate, 2 * 1000 * 5)

wait = fn wait, t ->
  now = System.monotonic_time(:microsecond)

  cond do
    now >= t ->
      :ok

    t - now > 1500 ->
      Process.sleep(1)
      wait.(wait, t)

    true ->
      wait.(wait, t)
  end
end

m0 = PipelineManager.get_metrics(pm)
t0 = System.monotonic_time(:nanosecond)

refused =
  1..2
  |> Enum.map(fn p ->
    Task.async(fn ->
      me = self()
      start = System.monotonic_time(:microsecond)

      for tick <- 0..(seconds * 1000 - 1), j <- 1..per_tick, reduce: 0 do
        r ->
          i = (tick * per_tick + j) * 2 + p
          if j == 1 and tick > 0, do: wait.(wait, start + tick * 1000)

          Enum.count(
            [
              Ingestor.ingest_function_call(buf, Bench, :work, [i, :arg], me, i),
              Ingestor.ingest_message_send(buf, me, me, {:msg, i}),
              Ingestor.ingest_message_receive(buf, me, {:msg, i}),
              Ingestor.ingest_state_change(buf, me, i - 1, i),
              Ingestor.ingest_function_return(buf, {:ok, i}, 1000, i)
            ],
            &(&1 != :ok)
          ) + r
      end
    end)
  end)
  |> Task.await_many(:infinity)
  |> Enum.sum()

wall = System.monotonic_time(:nanosecond) - t0
:ok = PipelineManager.flush(pm, 60_000)
m = PipelineManager.get_metrics(pm)
busy = m.native.engine.busy_ns - m0.native.engine.busy_ns
handled = m.native.engine.handled - m0.native.engine.handled
acc = m.accounting

IO.puts("""

| | predicted | measured |
|---|---:|---:|
| rate | #{rate} events/s | #{round(handled * 1.0e9 / wall)} events/s handled |
| stage utilization | #{plan.stage_utilization} | #{Float.round(busy / wall, 3)} |
| refused (buffer full) / dropped | risk #{plan.drop_risk}, #{plan.expected_drop_rate}/s | #{refused} refused, #{acc.overflow + acc.failed + acc.dead_lettered} dropped |
| store memory at #{plan.max_events} events | #{plan.store_memory_mb} MiB | #{Float.round(m.memory_bytes / 1_048_576, 1)} MiB (#{acc.stored} stored, #{acc.evicted} evicted) |
| write→stored p99 | – | #{Float.round(m.latency.p99_ns / 1.0e6, 2)} ms |

accounting: #{ElixirScope.Capture.Pipeline.accounting_line(acc)}
load after: #{String.trim(File.read!("/proc/loadavg"))}
""")

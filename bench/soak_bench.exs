# Soak benchmark: a pipeline (with its BackpressureManager scaling and
# shedding) under a steady write rate for minutes; prints, over time,
# throughput, memory (RSS, BEAM, native store), drops by reason and
# write->stored latency percentiles, then whether memory stayed flat after
# warm-up and whether every event is accounted for.
#
#     mix run bench/soak_bench.exs
#
# SOAK_SECONDS (default 180), SOAK_RATE (events/s, default 1_000_000),
# SOAK_PRODUCERS (2), SOAK_SAMPLE_MS (5000), SOAK_MAX_EVENTS (1_000_000),
# SOAK_WARMUP_S (30: samples before this are left out of the flatness
# figures).

Code.require_file("support/harness.exs", __DIR__)
Code.require_file("support/soak.exs", __DIR__)

alias ElixirScope.Bench.{Harness, Soak}

env = fn k, d -> String.to_integer(System.get_env(k, Integer.to_string(d))) end
seconds = env.("SOAK_SECONDS", 180)
rate = env.("SOAK_RATE", 1_000_000)
producers = env.("SOAK_PRODUCERS", 2)
sample_ms = env.("SOAK_SAMPLE_MS", 5000)
max_events = env.("SOAK_MAX_EVENTS", 1_000_000)
warmup_s = env.("SOAK_WARMUP_S", 30)

mib = fn b -> :erlang.float_to_binary(b / 1_048_576, decimals: 1) end

IO.puts("# ElixirScope soak — #{Harness.machine()}")

IO.puts(
  "# #{seconds} s at #{rate} events/s offered by #{producers} producers, max_events #{max_events}, " <>
    "BackpressureManager: auto_scale, load_shedding"
)

IO.puts("")

IO.puts(
  "| t s | events/s stored | stored | workers | pressure | RSS MiB | BEAM MiB | store MiB | p50 µs | p95 µs | p99 µs | buffer_full | shed | evicted | dead-lettered | in flight |"
)

IO.puts("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

row = fn s ->
  IO.puts(
    "| #{Float.round(s.at_ms / 1000, 1)} | #{round(s.events_per_second)} | #{s.stored} | #{s.workers} | #{s.pressure} | " <>
      "#{mib.(s.rss_bytes)} | #{mib.(s.beam_bytes)} | #{mib.(s.store_bytes)} | #{s.p50_us} | #{s.p95_us} | #{s.p99_us} | " <>
      "#{s.drops.buffer_full} | #{s.drops.shed} | #{s.drops.evicted} | #{s.drops.dead_lettered} | #{s.in_flight} |"
  )
end

r =
  Soak.run(
    seconds: seconds,
    rate: rate,
    producers: producers,
    sample_ms: sample_ms,
    max_events: max_events,
    on_sample: row
  )

after_warmup = Enum.filter(r.samples, &(&1.at_ms >= warmup_s * 1000))

IO.puts("\n## Memory after warm-up (#{warmup_s} s; #{length(after_warmup)} samples)")

for {key, label} <- [rss_bytes: "RSS", beam_bytes: "BEAM", store_bytes: "native store"] do
  case Soak.spread(after_warmup, key) do
    nil ->
      IO.puts("  #{label}: no samples after warm-up (raise SOAK_SECONDS)")

    {lo, hi, mean, dev} ->
      verdict = if dev <= 10, do: "flat (within ±10%)", else: "NOT flat (target ±10%)"

      IO.puts(
        "  #{label}: #{mib.(lo)}–#{mib.(hi)} MiB, mean #{mib.(mean)} MiB, max deviation " <>
          "#{:erlang.float_to_binary(dev, decimals: 1)}% — #{verdict}"
      )
  end
end

acc = r.final.accounting
stored_rate = r.final.events_processed / seconds

IO.puts("\n## Totals")

IO.puts(
  "  offered #{r.offered} (#{round(r.offered / seconds)}/s), refused by a full ring #{r.refused}"
)

IO.puts("  processed #{r.final.events_processed} (#{round(stored_rate)}/s)")
IO.puts("  " <> r.accounting_line)

ok =
  acc.unaccounted == 0 and acc.accepted + acc.shed == r.written and acc.buffer_full == r.refused

IO.puts("  every event accounted for: #{ok}")
unless ok, do: System.halt(1)

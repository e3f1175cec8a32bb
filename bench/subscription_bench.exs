# Live subscriptions and Prometheus rendering, each figure beside a baseline
# measured in the same run:
#
#   mix run bench/subscription_bench.exs
#
# 1. Notification latency at a paced 500k events/s (2 producers, calls to
#    10 modules in turn) with 10 subscribers, one per module (50k
#    notifications/s each): write → message in the mailbox (the delivery
#    thread's reading after enif_send) and write → taken out by the
#    subscriber, p50/p99, beside the pipeline's own write → stored latency
#    in the same run. Target p99 ≤ 10 ms. Run twice: subscribers matching
#    every event (500k notifications/s in all), then 1 in 20 of theirs
#    (25k/s in all).
# 2. End-to-end throughput (4 producers, 1.2M events written as fast as
#    possible, until flushed) with 10 subscribers whose filters match
#    nothing, beside none: rounds interleaved, medians. Target ≥ 0.9×.
# 3. The same with one slow subscriber (matches everything, never reads,
#    max_queue 10,000): throughput ratio, its mailbox, BEAM memory.
# 4. Prometheus.render/1 of one pipeline, beside PipelineManager.get_metrics/1
#    (the data it formats). Target ≤ 1 ms.
#
# Env: BENCH_SECTIONS (default "1234"), LAT_SECONDS (3), ROUNDS (5),
# EVENTS (1_200_000).
Code.require_file("support/harness.exs", __DIR__)

defmodule SubBench do
  alias ElixirScope.Bench.Harness
  alias ElixirScope.Capture.{Ingestor, PipelineManager}
  alias ElixirScope.Metrics.Prometheus
  alias ElixirScope.Storage.QueryCoordinator

  @mods for i <- 0..9, do: Module.concat(SubBench, "M#{i}")

  def pipeline(opts \\ []) do
    {:ok, pm} =
      PipelineManager.start_link(
        [name: nil, shards: 16, ring_size: 65_536, async_writer_pool_size: 2, batch_size: 1000] ++
          opts
      )

    pm
  end

  # 1 call in 20 is to `:hot` (blocks of 10 calls, one to each module),
  # the others to `:f`.
  defp call(buf, m, i, me) do
    f = if rem(div(i, 10), 20) == 0, do: :hot, else: :f

    case Ingestor.ingest_function_call(buf, m, f, [i], me, i) do
      :ok ->
        :ok

      {:error, :buffer_full} ->
        Process.sleep(1)
        call(buf, m, i, me)
    end
  end

  def pct(sorted, q) do
    case sorted do
      [] -> 0
      _ -> Enum.at(sorted, min(length(sorted) - 1, trunc(q * length(sorted))))
    end
  end

  # ---- 1. latency ---------------------------------------------------------------

  # mode :all: subscriber k takes every call to module k (all events are
  # notified: 500k notifications/s); :slice: only its calls to `:hot` (1 in
  # 20: 25k/s in all).
  def latency(mode) do
    seconds = Harness.env_int("LAT_SECONDS", 3)
    rate = 500_000
    pm = pipeline(flush_interval_us: 200)
    buf = PipelineManager.ring_buffer(pm)
    parent = self()

    subs =
      for m <- @mods do
        spawn_link(fn ->
          f = if mode == :all, do: [module: m], else: [module: m, function: :hot]
          {:ok, ref} = QueryCoordinator.subscribe(pm, f)
          send(parent, {:ready, self(), ref})
          collect(ref, [])
        end)
      end

    refs =
      for s <- subs do
        receive do
          {:ready, ^s, ref} -> ref
        end
      end

    # Warm up, then measure from a clean latency histogram.
    produce(buf, 2, div(rate, 2), 1)
    :ok = QueryCoordinator.flush(pm)
    Enum.each(subs, &send(&1, :reset))
    ElixirScope.Native.pipe_reset_latency(PipelineManager.handles(pm).pipe)
    stats0 = Enum.map(refs, &QueryCoordinator.stats/1)
    {us, written} = :timer.tc(fn -> produce(buf, 2, div(rate, 2), seconds) end)
    :ok = QueryCoordinator.flush(pm)
    stats1 = Enum.map(refs, &QueryCoordinator.stats/1)

    received =
      for s <- subs do
        send(s, {:report, self()})

        receive do
          {:lat, ^s, lats} -> lats
        end
      end

    all = received |> List.flatten() |> Enum.sort()
    m = PipelineManager.get_metrics(pm)
    delivered = Enum.zip(stats0, stats1) |> Enum.map(fn {a, b} -> b.delivered - a.delivered end)
    dropped = Enum.zip(stats0, stats1) |> Enum.map(fn {a, b} -> b.dropped - a.dropped end)
    native_p99 = Enum.map(stats1, & &1.latency_p99_ns)
    native_p50 = Enum.map(stats1, & &1.latency_p50_ns)

    IO.puts("""

    ## 1#{if mode == :all, do: "a", else: "b"}. Notification latency, #{seconds} s paced at #{rate} events/s (achieved #{round(written * 1.0e6 / us)}/s), 10 subscribers, #{if mode == :all, do: "each matching a tenth of all events", else: "each matching 1 in 200 events"}

    | | p50 | p99 |
    |---|---:|---:|
    | baseline: the pipeline's write → stored | #{ms(m.latency.p50_ns)} | #{ms(m.latency.p99_ns)} |
    | write → message in the mailbox (native, median / max over subscribers) | #{ms(median(native_p50))} / #{ms(Enum.max(native_p50))} | #{ms(median(native_p99))} / #{ms(Enum.max(native_p99))} |
    | write → taken out by the subscriber (all #{length(all)} notifications) | #{ms(pct(all, 0.5))} | #{ms(pct(all, 0.99))} |

    notifications delivered #{Enum.sum(delivered)} (#{round(Enum.sum(delivered) * 1.0e6 / us)}/s), dropped #{Enum.sum(dropped)}; target p99 ≤ 10 ms
    """)

    Enum.each(subs, &Process.unlink/1)
    Enum.each(subs, &Process.exit(&1, :kill))
    PipelineManager.shutdown(pm)
  end

  defp collect(ref, lats) do
    receive do
      {:elixir_scope_event, ^ref, e} ->
        collect(ref, [System.monotonic_time(:nanosecond) - e.timestamp | lats])

      {:elixir_scope_dropped, ^ref, _} ->
        collect(ref, lats)

      :reset ->
        collect(ref, [])

      {:report, to} ->
        send(to, {:lat, self(), lats})
        collect(ref, [])
    end
  end

  # `procs` producers, each writing `per_sec` events/s for `seconds`, in
  # 1 ms ticks (calls to the 10 modules in turn). Returns events written.
  defp produce(buf, procs, per_sec, seconds) do
    per_tick = div(per_sec, 1000)
    ticks = seconds * 1000

    1..procs
    |> Enum.map(fn p ->
      Task.async(fn ->
        me = self()
        t0 = System.monotonic_time(:microsecond)

        for tick <- 0..(ticks - 1) do
          for j <- 1..per_tick do
            i = tick * per_tick + j
            call(buf, Enum.at(@mods, rem(i + p, 10)), i, me)
          end

          # Pace: wait for the next tick's start.
          wait_until(t0 + (tick + 1) * 1000)
        end

        ticks * per_tick
      end)
    end)
    |> Task.await_many(:infinity)
    |> Enum.sum()
  end

  defp wait_until(t) do
    now = System.monotonic_time(:microsecond)

    cond do
      now >= t -> :ok
      t - now > 1500 -> Process.sleep(1) && wait_until(t)
      true -> wait_until(t)
    end
  end

  # ---- 2. / 3. throughput --------------------------------------------------------------

  def throughput do
    rounds = Harness.env_int("ROUNDS", 5)
    n = Harness.env_int("EVENTS", 1_200_000)
    nobody = spawn(fn -> Process.sleep(:infinity) end)

    configs = [
      none: fn _pm -> [] end,
      idle10: fn pm ->
        for i <- 1..10 do
          f = if rem(i, 2) == 0, do: [module: NoSuchModule], else: [pid: nobody]
          {:ok, ref} = QueryCoordinator.subscribe(pm, f)
          {ref, nil}
        end
      end,
      slow1: fn pm ->
        slow = spawn(fn -> Process.sleep(:infinity) end)
        {:ok, ref} = QueryCoordinator.subscribe(pm, [], subscriber: slow)
        [{ref, slow}]
      end
    ]

    results =
      for _ <- 1..rounds, {name, setup} <- configs, reduce: %{} do
        acc ->
          pm = pipeline()
          subs = setup.(pm)
          buf = PipelineManager.ring_buffer(pm)
          :erlang.garbage_collect()
          t0 = System.monotonic_time(:nanosecond)

          1..4
          |> Enum.map(fn p ->
            Task.async(fn ->
              me = self()
              for i <- 1..div(n, 4), do: call(buf, Enum.at(@mods, rem(i + p, 10)), i, me)
            end)
          end)
          |> Task.await_many(:infinity)

          :ok = PipelineManager.flush(pm, 60_000)
          ns = System.monotonic_time(:nanosecond) - t0
          acc_m = PipelineManager.get_metrics(pm).accounting
          true = acc_m.stored + acc_m.evicted == n and acc_m.unaccounted == 0

          extra =
            case subs do
              [{ref, slow}] when is_pid(slow) ->
                :ok = QueryCoordinator.flush(pm)
                s = QueryCoordinator.stats(ref)
                {:message_queue_len, len} = Process.info(slow, :message_queue_len)
                Process.exit(slow, :kill)

                %{
                  mailbox: len,
                  dropped: s.dropped,
                  delivered: s.delivered,
                  beam: :erlang.memory(:total)
                }

              _ ->
                %{beam: :erlang.memory(:total)}
            end

          PipelineManager.shutdown(pm)
          Map.update(acc, name, [{n * 1.0e9 / ns, extra}], &[{n * 1.0e9 / ns, extra} | &1])
      end

    med = fn name -> results[name] |> Enum.map(&elem(&1, 0)) |> median() end

    runs = fn name ->
      results[name] |> Enum.map(&(elem(&1, 0) / 1.0e6)) |> Enum.map_join(", ", &fmt2/1)
    end

    none = med.(:none)
    slow_extra = results[:slow1] |> Enum.map(&elem(&1, 1))

    IO.puts("""

    ## 2./3. End-to-end throughput, 4 producers, #{n} events → queryable, #{rounds} interleaved rounds

    | subscribers | median | ratio to none | runs (M/s) |
    |---|---:|---:|---|
    | none (baseline) | #{fmt2(none / 1.0e6)} M/s | 1.00 | #{runs.(:none)} |
    | 10 with filters matching nothing | #{fmt2(med.(:idle10) / 1.0e6)} M/s | #{fmt2(med.(:idle10) / none)} | #{runs.(:idle10)} |
    | 1 slow (matches all, never reads) | #{fmt2(med.(:slow1) / 1.0e6)} M/s | #{fmt2(med.(:slow1) / none)} | #{runs.(:slow1)} |

    slow subscriber's mailbox after each run: #{Enum.map_join(slow_extra, ", ", & &1.mailbox)} (max_queue 10,000); dropped #{Enum.map_join(slow_extra, ", ", & &1.dropped)}
    BEAM memory after runs: none #{mem(results[:none])}, slow #{mem(results[:slow1])} MiB
    target: 10 idle subscribers ≥ 0.9× of none
    """)
  end

  defp mem(rs), do: Enum.map_join(rs, "/", fn {_, e} -> fmt2(e.beam / 1_048_576) end)

  # ---- 4. render ---------------------------------------------------------------------

  def render do
    pm = pipeline()
    buf = PipelineManager.ring_buffer(pm)
    for i <- 1..50_000, do: call(buf, Enum.at(@mods, rem(i, 10)), i, self())
    :ok = PipelineManager.flush(pm)
    {:ok, _} = QueryCoordinator.subscribe(pm, module: hd(@mods))
    bytes = IO.iodata_length(Prometheus.render(pm))

    r =
      Harness.run([
        %{
          name: "Prometheus.render/1 (one pipeline)",
          n: 100,
          run: fn _ -> for _ <- 1..100, do: IO.iodata_to_binary(Prometheus.render(pm)) end
        },
        %{
          name: "baseline: PipelineManager.get_metrics/1",
          n: 100,
          run: fn _ -> for _ <- 1..100, do: PipelineManager.get_metrics(pm) end
        }
      ])

    Harness.print_table("4. render/1, #{bytes} bytes of text (µs per call = ns/1000)", r, [
      "Prometheus.render/1 (one pipeline)",
      "baseline: PipelineManager.get_metrics/1"
    ])

    IO.puts("target: render/1 ≤ 1 ms (1,000,000 ns)")
    PipelineManager.shutdown(pm)
  end

  def median(xs) do
    s = Enum.sort(xs)
    Enum.at(s, div(length(s), 2))
  end

  defp ms(ns), do: "#{fmt2(ns / 1.0e6)} ms"
  defp fmt2(x), do: :erlang.float_to_binary(x / 1, decimals: 2)
end

IO.puts(ElixirScope.Bench.Harness.machine())
IO.puts("load before: #{File.read!("/proc/loadavg") |> String.trim()}")
sections = System.get_env("BENCH_SECTIONS", "1234")
if sections =~ "1", do: SubBench.latency(:all) && SubBench.latency(:slice)
if sections =~ "2" or sections =~ "3", do: SubBench.throughput()
if sections =~ "4", do: SubBench.render()
IO.puts("load after: #{File.read!("/proc/loadavg") |> String.trim()}")

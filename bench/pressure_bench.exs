# How fast the BackpressureManager's pressure follows an overload, in check
# intervals: producers far faster than a (deliberately slowed) store start
# at t0; the time until the pressure is :critical, then, after the store is
# fast again and producers stop, the time until it is back to :normal.
#
#     mix run bench/pressure_bench.exs
#
# PRESSURE_BENCH_ROUNDS (default 5), PRESSURE_BENCH_CHECK_MS (default 100).

Code.require_file("support/harness.exs", __DIR__)

alias ElixirScope.Bench.Harness
alias ElixirScope.Capture.{BackpressureManager, Ingestor, PipelineManager}
alias ElixirScope.Native

defmodule PressureBench do
  def produce(buf, stop_ref, n) do
    receive do
      ^stop_ref -> n
    after
      0 ->
        for i <- 1..500, do: Ingestor.ingest_function_call(buf, M, :f, [i], self(), i)
        produce(buf, stop_ref, n + 500)
    end
  end

  # Polls the manager until its level is `level`; ms since `t0`.
  def until_level(bpm, level, t0) do
    if BackpressureManager.check_pressure(bpm) == level do
      System.monotonic_time(:microsecond) - t0
    else
      Process.sleep(1)
      until_level(bpm, level, t0)
    end
  end
end

rounds = String.to_integer(System.get_env("PRESSURE_BENCH_ROUNDS", "5"))
check_ms = String.to_integer(System.get_env("PRESSURE_BENCH_CHECK_MS", "100"))

IO.puts("# BackpressureManager transitions — #{Harness.machine()}")
IO.puts("# check interval #{check_ms} ms, default cool-down (1 check), #{rounds} rounds\n")

results =
  for r <- 1..rounds do
    {:ok, pm} =
      PipelineManager.start_link(
        name: nil,
        shards: 4,
        ring_size: 8192,
        async_writer_pool_size: 1,
        batch_size: 200,
        backpressure: [check_interval_ms: check_ms, auto_scale: true, max_workers: 4]
      )

    bpm = PipelineManager.backpressure_manager(pm)
    buf = PipelineManager.ring_buffer(pm)
    pipe = PipelineManager.handles(pm).pipe
    :ok = Native.pipe_inject_delay(pipe, 5000)
    Process.sleep(check_ms * 2)
    stop = make_ref()
    t0 = System.monotonic_time(:microsecond)
    producers = for _ <- 1..2, do: spawn(fn -> PressureBench.produce(buf, stop, 0) end)
    up_us = PressureBench.until_level(bpm, :critical, t0)
    Process.sleep(check_ms * 5)
    Enum.each(producers, &send(&1, stop))
    :ok = Native.pipe_inject_delay(pipe, 0)
    :ok = PipelineManager.flush(pm, 60_000)
    t1 = System.monotonic_time(:microsecond)
    down_us = PressureBench.until_level(bpm, :normal, t1)
    PipelineManager.shutdown(pm)

    IO.puts(
      "round #{r}: to :critical #{div(up_us, 1000)} ms, back to :normal #{div(down_us, 1000)} ms after the backlog drained"
    )

    {up_us / 1000 / check_ms, down_us / 1000 / check_ms}
  end

{ups, downs} = Enum.unzip(results)
med = fn xs -> xs |> Enum.sort() |> Enum.at(div(length(xs), 2)) end
f = &:erlang.float_to_binary(&1, decimals: 2)

IO.puts("\n| transition | median (check intervals) | max | target |")
IO.puts("|---|---:|---:|---:|")
IO.puts("| overload start → :critical | #{f.(med.(ups))} | #{f.(Enum.max(ups))} | ≤ 2 |")
IO.puts("| backlog drained → :normal | #{f.(med.(downs))} | #{f.(Enum.max(downs))} | ≤ 2 |")

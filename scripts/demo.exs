# ElixirScope Native demo: the Rust-backed ring buffer under concurrent load,
# then the same kind of load through the native pipeline (correlated,
# stored, queried; accounting checked).
#
# Run it with `bash scripts/demo.sh` (or `mix run scripts/demo.exs`).
#
# 8 writer processes each ingest 50_000 function-call events through
# ElixirScope.Capture.Ingestor while one reader process drains the ring with
# read_batch/3. At the end the demo prints throughput, a few of the events
# read, the ring's stats, and checks that every event is accounted for:
#
#     written = read + dropped + still available
#
# It exits with status 1 if that accounting does not add up.

defmodule ElixirScope.Demo do
  alias ElixirScope.Capture.{Ingestor, RingBuffer}

  @ring_size 65_536
  @writers 8
  @events_per_writer 50_000
  @batch 1_000

  def run do
    {:ok, buf} = RingBuffer.new(size: @ring_size, overflow_strategy: :drop_oldest)

    header("ElixirScope Native ring buffer demo")

    IO.puts(
      "ring size #{fmt(@ring_size)} (overflow: :drop_oldest), " <>
        "#{@writers} writers x #{fmt(@events_per_writer)} events, 1 reader (batches of #{fmt(@batch)})"
    )

    parent = self()
    started = System.monotonic_time()

    reader = spawn_link(fn -> send(parent, {:reader_done, read_loop(buf, 0, 0, [], false)}) end)

    writers =
      for i <- 1..@writers do
        spawn_link(fn -> send(parent, {:writer_done, self(), write_loop(buf, i, 1, 0, 0)}) end)
      end

    {ok, full} =
      Enum.reduce(writers, {0, 0}, fn pid, {ok_acc, full_acc} ->
        receive do
          {:writer_done, ^pid, {ok, full}} -> {ok_acc + ok, full_acc + full}
        end
      end)

    send(reader, :writers_done)

    {read, first} =
      receive do
        {:reader_done, result} -> result
      end

    elapsed_us =
      max(System.convert_time_unit(System.monotonic_time() - started, :native, :microsecond), 1)

    written = ok + full
    stats = RingBuffer.stats(buf)

    header("Throughput")

    IO.puts(
      "  ingest calls (written): #{fmt(written)}  (ok #{fmt(ok)}, {:error, :buffer_full} #{fmt(full)})"
    )

    IO.puts("  events read:            #{fmt(read)}")
    IO.puts("  elapsed:                #{fmt(div(elapsed_us, 1000))} ms")

    IO.puts(
      "  throughput:             #{fmt(div(written * 1_000_000, elapsed_us))} events/s written"
    )

    header("First #{length(first)} events read")

    first
    |> Enum.with_index(1)
    |> Enum.each(fn {event, n} ->
      IO.puts("  #{n}. " <> indent(inspect(event, pretty: true, width: 100)))
    end)

    header("RingBuffer.stats/1")
    print_stats(stats)

    header("Accounting")
    dropped = Map.get(stats, :dropped_events, 0)
    available = Map.get(stats, :available_events, 0)
    balanced? = written == read + dropped + available

    IO.puts(
      "  accounting: written #{fmt(written)} = read #{fmt(read)} + dropped #{fmt(dropped)} + " <>
        "available #{fmt(available)} -> #{if balanced?, do: "OK", else: "MISMATCH"}"
    )

    unless balanced?, do: System.halt(1)
  end

  # One writer: ingest n events, counting :ok and {:error, :buffer_full}.
  defp write_loop(_buf, _i, j, ok, full) when j > @events_per_writer, do: {ok, full}

  defp write_loop(buf, i, j, ok, full) do
    case Ingestor.ingest_function_call(buf, MyMod, :fun, [i, j], self(), i) do
      :ok -> write_loop(buf, i, j + 1, ok + 1, full)
      {:error, :buffer_full} -> write_loop(buf, i, j + 1, ok, full + 1)
    end
  end

  # The reader: drain until the writers are done and a read comes back empty.
  defp read_loop(buf, pos, count, first, writers_done?) do
    case RingBuffer.read_batch(buf, pos, @batch) do
      {[], _next_pos} when writers_done? ->
        {count, first}

      {[], next_pos} ->
        receive do
          :writers_done -> read_loop(buf, next_pos, count, first, true)
        after
          0 ->
            :erlang.yield()
            read_loop(buf, next_pos, count, first, false)
        end

      {events, next_pos} ->
        first = if length(first) < 3, do: Enum.take(first ++ events, 3), else: first
        read_loop(buf, next_pos, count + length(events), first, writers_done?)
    end
  end

  defp print_stats(stats) do
    keys = [
      :size,
      :write_position,
      :read_position,
      :available_events,
      :total_writes,
      :total_reads,
      :dropped_events,
      :utilization
    ]

    for key <- keys, Map.has_key?(stats, key) do
      IO.puts("  #{String.pad_trailing(Atom.to_string(key), 18)} #{fmt(Map.fetch!(stats, key))}")
    end

    case Map.get(stats, :dropped) do
      dropped when is_map(dropped) and map_size(dropped) > 0 ->
        IO.puts("  dropped by reason:")

        for {reason, n} <- Enum.sort(dropped) do
          IO.puts("    #{String.pad_trailing(inspect(reason), 16)} #{fmt(n)}")
        end

      dropped when is_map(dropped) ->
        IO.puts("  dropped by reason: (none)")

      _ ->
        :ok
    end

    # Anything else the ring reports.
    for {key, value} <- Enum.sort(stats), key not in [:dropped | keys] do
      IO.puts("  #{String.pad_trailing(to_string(key), 18)} #{inspect(value)}")
    end
  end

  defp header(title),
    do: IO.puts("\n== #{title} " <> String.duplicate("=", max(60 - String.length(title), 3)))

  defp indent(text), do: String.replace(text, "\n", "\n     ")

  # 1234567 -> "1,234,567"; floats with two decimals.
  defp fmt(n) when is_integer(n) and n < 0, do: "-" <> fmt(-n)

  defp fmt(n) when is_integer(n) do
    n
    |> Integer.to_string()
    |> String.reverse()
    |> String.to_charlist()
    |> Enum.chunk_every(3)
    |> Enum.join(",")
    |> String.reverse()
  end

  defp fmt(n) when is_float(n), do: :erlang.float_to_binary(n, decimals: 2)
  defp fmt(other), do: inspect(other)
end

defmodule ElixirScope.PipelineDemo do
  @moduledoc false
  # Part two: the same kind of load through a PipelineManager — correlated,
  # stored and queried — with the accounting identity checked.
  alias ElixirScope.Capture.{Ingestor, PipelineManager}
  alias ElixirScope.Storage.DataAccess

  @procs 8
  @rounds 20_000

  def run do
    IO.puts(
      "\n== Pipeline: #{@procs} processes x #{@rounds} rounds (call, nested call, send, receive, 2 returns)"
    )

    {:ok, pm} = PipelineManager.start_link(name: nil, batch_size: 1000, async_writer_pool_size: 2)
    buf = PipelineManager.ring_buffer(pm)
    parent = self()
    t0 = System.monotonic_time(:microsecond)

    pids =
      for i <- 1..@procs do
        spawn_link(fn ->
          me = self()

          for k <- 1..@rounds do
            w(fn -> Ingestor.ingest_function_call(buf, Demo.Server, :handle, [k], me, {:h, k}) end)

            w(fn -> Ingestor.ingest_function_call(buf, Demo.Math, :square, [k], me, {:s, k}) end)
            w(fn -> Ingestor.ingest_message_send(buf, me, me, {:squared, i, k}) end)
            w(fn -> Ingestor.ingest_message_receive(buf, me, {:squared, i, k}) end)
            w(fn -> Ingestor.ingest_function_return(buf, k * k, 100, {:s, k}) end)
            w(fn -> Ingestor.ingest_function_return(buf, :ok, 300, {:h, k}) end)
          end

          send(parent, {:done, self()})
        end)
      end

    for p <- pids, do: receive(do: ({:done, ^p} -> :ok))
    :ok = PipelineManager.flush(pm, 60_000)
    us = max(System.monotonic_time(:microsecond) - t0, 1)
    total = @procs * @rounds * 6

    IO.puts(
      "  #{total} events stored and queryable in #{div(us, 1000)} ms (#{div(total * 1_000_000, us)} events/s)"
    )

    store = PipelineManager.data_access(pm)
    {:ok, [call | _]} = DataAccess.query_by_process(store, hd(pids), limit: 6)
    {:ok, inside} = DataAccess.call_contents(store, call.id)
    IO.puts("\n  Everything inside the first call of #{inspect(hd(pids))}:")

    for e <- inside do
      IO.puts(
        "    #{e.id} #{e.correlation_type} parent=#{inspect(e.parent_id)} links=#{inspect(e.links)}"
      )
    end

    m = PipelineManager.get_metrics(pm)

    IO.puts(
      "\n  latency write->stored: p50 #{div(m.latency.p50_ns, 1000)} us, p99 #{div(m.latency.p99_ns, 1000)} us"
    )

    IO.puts("  correlation success rate: #{m.correlation_success_rate}")
    IO.puts("  store memory: #{div(m.memory_bytes, 1024)} KiB")
    IO.puts("  " <> PipelineManager.accounting_line(pm))
    PipelineManager.shutdown(pm)

    unless m.accounting.unaccounted == 0 and m.accounting.in_flight == 0 do
      IO.puts("ACCOUNTING DOES NOT ADD UP")
      System.halt(1)
    end
  end

  # A full shard refuses the write: back off and retry (nothing is lost).
  defp w(write) do
    case write.() do
      :ok ->
        :ok

      {:error, :buffer_full} ->
        Process.sleep(1)
        w(write)
    end
  end
end

ElixirScope.Demo.run()
ElixirScope.PipelineDemo.run()

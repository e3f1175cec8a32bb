# ElixirScope Native demo.
#
# Run it with `bash scripts/demo.sh` (or `mix run scripts/demo.exs`).
#
# Part one traces a small supervised sample application
# (scripts/sample_app.ex: a Bank GenServer and an Auditor exchanging
# messages, a recursive computation, and a crash followed by a restart)
# with `ElixirScope.trace/2` through the full native pipeline, then prints
# a call tree with message arrows, the traceback of the crash, the Bank's
# state history as diffs (before and after its restart), the state in force
# at the crash and why the balance is what it is (the causal chain back to
# the client's call), the top call statistics and the pipeline's metrics
# with the accounting line.
#
# Parts two and three put load on the ring buffer (8 writers, 1 reader)
# and on the pipeline (correlated, stored, queried).
#
# The demo checks what it shows against the sample app's ground truth and
# the accounting identity, and exits with status 1 if anything is off.

Code.require_file("sample_app.ex", __DIR__)

defmodule ElixirScope.TraceDemo do
  @moduledoc false
  alias ElixirScope.Analysis
  alias ElixirScope.Analysis.{Entry, Format}
  alias ElixirScope.Capture.PipelineManager
  alias ElixirScope.SampleApp
  alias ElixirScope.SampleApp.{Auditor, Bank, Math}

  def run do
    IO.puts("== Tracing a supervised sample app (scripts/sample_app.ex)")
    {:ok, _} = SampleApp.start()

    {:ok, info} = ElixirScope.trace([Bank, Auditor, Math], pids: :all, max_payload_bytes: 1024)

    IO.puts(
      "  tracing #{info.functions} functions in all processes, flags #{inspect(info.flags)}"
    )

    truth = SampleApp.run_scenario()
    {:ok, s} = ElixirScope.stop_trace()

    IO.puts(
      "  #{s.traced} events traced (#{s.dropped} dropped, #{s.truncated} values cut at 1 KiB), " <>
        "all stored and queryable"
    )

    bank = truth.bank_pid_before

    header("The first deposit: the client's call, the Bank's handle_call, the audit cast")
    [deposit | _] = Analysis.select(types: [:call], function: :deposit, limit: 1)
    deposit |> Analysis.call_tree() |> Format.print_tree()

    [handle | _] = Analysis.select(types: [:call], pid: bank, function: :handle_call, limit: 1)

    handle |> Analysis.call_tree() |> Format.print_tree()
    IO.puts("\nBank → Auditor messages, with the call they were sent from:")

    Analysis.messages(pid: bank)
    |> Enum.filter(&(&1.receive && &1.receive.pid == truth.auditor_pid))
    |> Enum.take(2)
    |> Format.print_messages()

    header("Interest: Math.fib(#{truth.fib_n}) inside the Bank (first 3 levels)")

    [interest | _] =
      Analysis.filter(&match?([{:interest, _}, _, _], &1.data),
        types: [:call],
        pid: bank,
        function: :handle_call
      )

    interest |> Analysis.call_tree() |> Format.print_tree(max_depth: 3)

    header("The crash: traceback at the exception")
    [crash | _] = Analysis.select(types: [:exception], pid: bank, limit: 1)
    IO.puts(Format.format_entry(crash))
    stack = Analysis.traceback(crash)
    Format.print_traceback(stack)

    [exit] = Analysis.select(types: [:exit], pid: bank)

    reason =
      case exit.data do
        {:truncated, bytes, type} -> "a #{type} of over #{bytes} bytes (cut at the state cap)"
        other -> inspect(other, limit: 3, printable_limit: 40)
      end

    IO.puts("#{inspect(bank)} exited, reason: #{reason}")

    restart = Enum.find(Analysis.select(types: [:spawn]), &(&1.pid == truth.bank_pid_after))

    IO.puts("#{inspect(restart.peer)} (the supervisor) restarted it as #{inspect(restart.pid)}")

    time_travel = time_travel(truth, crash)

    header("Top call statistics")
    stats = Analysis.call_stat()
    Format.print_call_stat(stats, 8)

    header("Repeated call trees (top 2)")
    Analysis.top_call_trees(max: 2, min_size: 3) |> Format.format_top_call_trees() |> IO.puts()

    header("Pipeline metrics")
    pm = ElixirScope.trace_pipeline()
    m = PipelineManager.get_metrics(pm)

    IO.puts(
      "  latency write->stored: p50 #{div(m.latency.p50_ns, 1000)} us, p99 #{div(m.latency.p99_ns, 1000)} us"
    )

    IO.puts("  correlation success rate: #{m.correlation_success_rate}")
    IO.puts("  " <> PipelineManager.accounting_line(pm))
    SampleApp.stop()

    fib = Enum.find(stats, &(&1.key == {Math, :fib, 1}))

    checks = [
      {"traceback is #{inspect(truth.crash_call_chain)}",
       Enum.map(stack, &{&1.module, &1.function, &1.arity}) ==
         Enum.reverse(truth.crash_call_chain)},
      {"#{truth.fib_calls} fib calls", fib && fib.count == truth.fib_calls},
      {"the crash is #{inspect(truth.crash_exception)}",
       match?(%Entry{data: {:error, %{__struct__: e}}} when e == truth.crash_exception, crash)},
      {"the restart is seen", restart != nil},
      {"nothing dropped", s.dropped == 0},
      {"every event accounted for",
       m.accounting.unaccounted == 0 and m.accounting.accepted == s.traced}
    ]

    checks = checks ++ time_travel

    for {what, ok} <- checks, not ok do
      IO.puts("CHECK FAILED: #{what}")
      System.halt(1)
    end

    IO.puts("\n  checked against the sample app's ground truth: #{length(checks)} checks passed")
  end

  # The Bank's states (captured from its OTP callbacks' returns, the first
  # one a snapshot taken when the trace started) as a sequence of diffs, the
  # state in force at the crash, and why the balance was what it was then.
  # Returns the checks of what it showed against the ground truth.
  defp time_travel(truth, crash) do
    bank = truth.bank_pid_before
    account = truth.account
    balance = truth.balance_before_crash

    header("Time travel: the Bank's state history, as diffs")
    history = Analysis.state_history(bank)
    Format.print_state_history(history)
    IO.puts("\nThe restarted Bank #{inspect(truth.bank_pid_after)} starts again from init/1:")
    after_restart = Analysis.state_history(truth.bank_pid_after)
    Format.print_state_history(after_restart)

    header("Why is #{inspect(account)}'s balance #{balance}?")
    {:ok, at_crash} = Analysis.state_at(crash)

    IO.puts(
      "state_at(the exception): #{inspect(at_crash.state)}, in force since record " <>
        "#{at_crash.source_id} (#{at_crash.returned} of #{callback(at_crash)})"
    )

    set_by = Enum.find(history, &(&1.id == at_crash.source_id))
    prev = history |> Enum.take_while(&(&1.id != set_by.id)) |> List.last()
    IO.puts("what it changed: " <> Format.format_diff(Analysis.state_diff(prev, set_by)))
    IO.puts("\nthe causal chain, from the state back to the root (across processes):")
    chain = Analysis.why(set_by)
    Format.print_why(chain)

    {root_role, root} = List.last(chain)
    deposits = Enum.filter(history, &match?({:"$gen_call", _, {:deposit, _, _}}, &1.trigger))

    [
      {"the Bank's states are #{inspect(balances(history, account))}",
       balances(history, account) == expected_balances(truth)},
      {"the restarted Bank starts from an empty init/1 state",
       match?([%{callback: {_, :init, 1}, state: s} | _] when s == %{}, after_restart)},
      {"the state at the crash holds #{balance}",
       Map.get(at_crash.state, account) == balance and set_by.state == at_crash.state},
      {"why: the state ← its handle_call ← the message ← the client's Bank.deposit/2 call",
       Enum.map(chain, &elem(&1, 0)) == [:state, :callback, :received, :sent, :call] and
         root_role == :call and root.pid == truth.caller_pid and
         {root.module, root.function} == {Bank, :deposit} and
         root.data == [account, balance - Map.get(prev.state, account, 0)] and
         set_by.id == List.last(deposits).id}
    ]
  end

  defp callback(%{callback: {m, f, a}}), do: "#{inspect(m)}.#{f}/#{a}"
  defp callback(%{kind: kind}), do: to_string(kind)

  # The account's balance in each state (nil before it has one).
  defp balances(history, account), do: Enum.map(history, &Map.get(&1.state, account))

  # The snapshot (no account yet), the deposit, the interest, the second
  # deposit, and terminate/2 keeping the last state after the crash.
  defp expected_balances(truth) do
    [first, second, _after_restart] = truth.deposits

    [nil, first, first + truth.fib_result, first + truth.fib_result + second]
    |> Enum.concat([truth.balance_before_crash])
  end

  defp header(title), do: IO.puts("\n-- #{title}")
end

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

ElixirScope.TraceDemo.run()
ElixirScope.Demo.run()
ElixirScope.PipelineDemo.run()

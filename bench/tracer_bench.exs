# Cost per traced event on a call-heavy workload: untraced, ElixirScope's
# tracer (ElixirScope.trace/2), :dbg with a counting fun handler, and an
# Erlang-Doctor-style tracer (a process writing every trace message into an
# ETS ordered_set), measured in the same run, samples interleaved.
#
#   mix run bench/tracer_bench.exs          # TRACER_BENCH_N=500000 BENCH_SAMPLES=5
#
# The workload is TracerBench.Work.loop(n): n local calls to step/1, traced
# with local call tracing and return traces, so 2 events per call (call +
# return), 2n per sample. It runs in a process spawned for the sample; trace
# flags are set on that process only, before it starts.
#
# Two times per sample, both divided by 2n:
#   workload   — the workload's wall time in the traced process (what the
#                traced code pays);
#   processed  — from the workload's start until every event has been
#                handled: ours, ElixirScope.stop_trace/0 then
#                ElixirScope.flush_trace/1 returned (every event queryable);
#                dbg, the handler fun has counted 2n messages; doctor, 2n rows
#                are in its ETS table.
# "drain" is processed minus workload: how long after the workload the
# tracer still needs.
#
# Environment: TRACER_BENCH_N (calls per sample, default 500_000),
# BENCH_SAMPLES (default 5), TRACER_BENCH_TIMEOUT_MS (the longest wait for
# a tracer to catch up, default 30_000), TRACER_BENCH_VARIANTS (default
# "untraced,ours,dbg,doctor").
#
# ElixirScope.trace/2 is called only when it is exported (the variant is
# reported as skipped otherwise).
Code.require_file("support/harness.exs", __DIR__)

defmodule TracerBench.Work do
  @moduledoc false
  # loop/1 calls step/1 n times, as local calls (the only traced function).

  def loop(n), do: loop(n, 0)

  def loop(0, acc), do: acc
  def loop(n, acc), do: loop(n - 1, step(acc))

  def step(x), do: x + 1
end

defmodule TracerBench do
  @moduledoc false
  alias ElixirScope.Bench.Harness
  alias TracerBench.Work

  @mfa {Work, :step, 1}
  @variants ~w(untraced null ours ours_full dbg doctor)

  defdelegate env_int(name, default), to: ElixirScope.Bench.Harness

  defp timeout_ms, do: env_int("TRACER_BENCH_TIMEOUT_MS", 30_000)

  # ---- the traced process ------------------------------------------------------

  # Spawns the process that will run the workload; it waits for `:go`, runs
  # `Work.loop(n)`, and reports `{:work_done, pid, t0, t1}` (monotonic ns).
  defp spawn_worker(n) do
    parent = self()

    pid =
      spawn(fn ->
        receive do
          :go -> :ok
        after
          # Not started (the variant failed before): just go away.
          60_000 -> exit(:normal)
        end

        t0 = System.monotonic_time(:nanosecond)
        Work.loop(n)
        t1 = System.monotonic_time(:nanosecond)
        send(parent, {:work_done, self(), t0, t1})
      end)

    ref = Process.monitor(pid)
    {pid, ref}
  end

  defp run_worker({pid, ref}) do
    :erlang.garbage_collect()
    send(pid, :go)

    receive do
      {:work_done, ^pid, t0, t1} ->
        receive do
          {:DOWN, ^ref, :process, ^pid, _} -> :ok
        end

        {t0, t1}
    end
  end

  # Samples the message queue length of `pid` (and the memory of `tab`, if
  # given) every 10 ms; `stop_sampler/1` returns the peaks.
  defp start_sampler(pid, tab \\ nil) do
    spawn_link(fn -> sampler_loop(pid, tab, 0, 0) end)
  end

  defp sampler_loop(pid, tab, mq, mem) do
    mq = max(mq, queue_len(pid))
    mem = max(mem, ets_bytes(tab))

    receive do
      {:stop, from} -> send(from, {:sampler, self(), mq, mem})
    after
      10 -> sampler_loop(pid, tab, mq, mem)
    end
  end

  defp stop_sampler(s) do
    send(s, {:stop, self()})

    receive do
      {:sampler, ^s, mq, mem} -> {mq, mem}
    end
  end

  defp queue_len(pid) do
    case Process.info(pid, :message_queue_len) do
      {:message_queue_len, n} -> n
      nil -> 0
    end
  end

  defp ets_bytes(nil), do: 0

  defp ets_bytes(tab) do
    case :ets.info(tab, :memory) do
      :undefined -> 0
      words -> words * :erlang.system_info(:wordsize)
    end
  end

  # Leaves no tracing behind: no trace flags on any process, no call trace
  # patterns, no dbg.
  def cleanup do
    if Process.whereis(:dbg), do: dbg_stop()
    :erlang.trace(:all, false, [:all])
    :erlang.trace_pattern({:_, :_, :_}, false, [:local])
    :erlang.trace_pattern({:_, :_, :_}, false, [:global])
    :ok
  end

  defp dbg_stop do
    Code.ensure_loaded(:dbg)

    # OTP 25: stop_clear/0 also clears the trace patterns; from OTP 27 stop/0 does.
    if function_exported?(:dbg, :stop_clear, 0),
      do: apply(:dbg, :stop_clear, []),
      else: :dbg.stop()
  end

  defp sample(work_ns, total_ns, n, extra) do
    Map.merge(
      %{work: work_ns / (2 * n), total: total_ns / (2 * n), drain: total_ns - work_ns},
      extra
    )
  end

  # ---- (a) untraced -------------------------------------------------------------

  def untraced(n) do
    {t0, t1} = run_worker(spawn_worker(n))
    sample(t1 - t0, t1 - t0, n, %{})
  end

  # ---- (b) ours: ElixirScope.trace/2 ------------------------------------------------

  # The module is looked up at run time, so this file compiles without
  # warnings before ElixirScope.trace/2 exists.
  defp scope, do: ElixirScope

  def ours_available? do
    Code.ensure_loaded?(scope()) and function_exported?(scope(), :trace, 2)
  end

  def ours(n, opts) do
    {pid, _} = worker = spawn_worker(n)
    big = 100 * n

    {:ok, _info} =
      apply(scope(), :trace, [
        @mfa,
        [
          pids: [pid],
          events: [:calls, :returns],
          max_events: big,
          max_rate: big * 1000,
          max_stored: 2 * n + 1000,
          duration: 3_600_000
        ] ++ ring_opts() ++ opts
      ])

    {t0, t1} = run_worker(worker)
    {:ok, summary} = apply(scope(), :stop_trace, [])
    :ok = apply(scope(), :flush_trace, [timeout_ms()])
    t2 = System.monotonic_time(:nanosecond)
    status = apply(scope(), :trace_status, [])

    # A dry run writes nothing: count the trace calls it saw instead.
    captured = count_from(summary, status, if(opts[:dry_run], do: :offered, else: :traced))
    dropped = count_from(summary, status, :dropped)
    sample(t1 - t0, t2 - t0, n, %{captured: captured, dropped: dropped})
  end

  # TRACER_BENCH_RING: ring slots per shard (default: the tracer's default).
  defp ring_opts do
    case System.get_env("TRACER_BENCH_RING") do
      nil -> []
      v -> [ring_size: String.to_integer(v)]
    end
  end

  # The stop summary's count if it has one, else trace_status's.
  defp count_from(summary, status, key) do
    cond do
      is_map(summary) and is_integer(Map.get(summary, key)) -> Map.get(summary, key)
      is_map(status) and is_integer(Map.get(status, key)) -> Map.get(status, key)
      true -> nil
    end
  end

  # ---- (c) :dbg with a counting fun handler ---------------------------------------

  def dbg_counting(n) do
    target = 2 * n
    bench = self()
    {pid, _} = worker = spawn_worker(n)

    handler = fn _msg, acc ->
      acc = acc + 1
      if acc == target, do: send(bench, {:dbg_done, System.monotonic_time(:nanosecond)})
      acc
    end

    {:ok, tracer} = :dbg.tracer(:process, {handler, 0})
    {:ok, _} = :dbg.p(pid, [:c])
    {:ok, _} = :dbg.tpl(Work, :step, 1, [{:_, [], [{:return_trace}]}])
    sampler = start_sampler(tracer)

    {t0, t1} = run_worker(worker)

    {t2, captured} =
      receive do
        {:dbg_done, t2} -> {t2, target}
      after
        timeout_ms() -> {nil, nil}
      end

    {peak_mq, _} = stop_sampler(sampler)
    dbg_stop()

    if t2 == nil,
      do: %{timeout: true, work: (t1 - t0) / target, peak_mq: peak_mq},
      else: sample(t1 - t0, t2 - t0, n, %{captured: captured, peak_mq: peak_mq})
  end

  # ---- (d) Erlang-Doctor-style: a tracer process writing to ETS --------------------

  # Like Erlang Doctor's `tr`: trace flags [call, timestamp], local call
  # patterns with exception_trace, and every trace message stored as a row
  # {index, pid, event, mfarity, data, timestamp_us} in an ordered_set keyed
  # by an increasing index (data: the arguments of a call, the value of a
  # return).
  def doctor(n) do
    target = 2 * n
    bench = self()
    {pid, _} = worker = spawn_worker(n)

    tracer =
      spawn(fn ->
        tab = :ets.new(:tracer_bench_doctor, [:ordered_set, :protected])
        send(bench, {:doctor_tab, self(), tab})
        doctor_loop(tab, 1, target, bench)
      end)

    tab =
      receive do
        {:doctor_tab, ^tracer, tab} -> tab
      end

    tref = Process.monitor(tracer)
    1 = :erlang.trace(pid, true, [:call, :timestamp, {:tracer, tracer}])
    1 = :erlang.trace_pattern(@mfa, [{:_, [], [{:exception_trace}]}], [:local])
    sampler = start_sampler(tracer, tab)

    {t0, t1} = run_worker(worker)

    t2 =
      receive do
        {:doctor_done, ^tracer, t2} -> t2
      after
        timeout_ms() -> nil
      end

    {peak_mq, peak_mem} = stop_sampler(sampler)
    rows = :ets.info(tab, :size)
    peak_mem = max(peak_mem, ets_bytes(tab))
    :erlang.trace_pattern(@mfa, false, [:local])
    Process.exit(tracer, :kill)

    receive do
      {:DOWN, ^tref, :process, ^tracer, _} -> :ok
    end

    if t2 == nil,
      do: %{timeout: true, work: (t1 - t0) / target, captured: rows, peak_mq: peak_mq},
      else: sample(t1 - t0, t2 - t0, n, %{captured: rows, peak_mq: peak_mq, peak_ets: peak_mem})
  end

  defp doctor_loop(tab, index, target, bench) do
    receive do
      {:trace_ts, pid, :call, {m, f, args}, ts} ->
        :ets.insert(tab, {index, pid, :call, {m, f, length(args)}, args, usec(ts)})
        doctor_next(tab, index, target, bench)

      {:trace_ts, pid, :return_from, mfarity, value, ts} ->
        :ets.insert(tab, {index, pid, :return, mfarity, value, usec(ts)})
        doctor_next(tab, index, target, bench)

      {:trace_ts, pid, :exception_from, mfarity, {class, value}, ts} ->
        :ets.insert(tab, {index, pid, :exception, mfarity, {class, value}, usec(ts)})
        doctor_next(tab, index, target, bench)

      _other ->
        doctor_loop(tab, index, target, bench)
    end
  end

  defp doctor_next(tab, index, target, bench) do
    if index == target,
      do: send(bench, {:doctor_done, self(), System.monotonic_time(:nanosecond)})

    doctor_loop(tab, index + 1, target, bench)
  end

  defp usec({mega, sec, micro}), do: (mega * 1_000_000 + sec) * 1_000_000 + micro

  # ---- the run --------------------------------------------------------------------

  defp run_variant("untraced", n), do: untraced(n)
  defp run_variant("ours", n), do: ours(n, payload: :arity)
  defp run_variant("ours_full", n), do: ours(n, payload: :full)
  defp run_variant("null", n), do: ours(n, payload: :arity, dry_run: true)
  defp run_variant("dbg", n), do: dbg_counting(n)
  defp run_variant("doctor", n), do: doctor(n)

  # One sample of one variant; tracing is cleared before and after, and a
  # failure is reported as the sample's result instead of stopping the bench.
  defp one(variant, n) do
    cleanup()

    try do
      run_variant(variant, n)
    rescue
      e ->
        abort(variant)
        %{error: Exception.format_banner(:error, e, __STACKTRACE__)}
    catch
      kind, reason ->
        abort(variant)
        %{error: Exception.format_banner(kind, reason, __STACKTRACE__)}
    after
      cleanup()
    end
  end

  # A failed "ours" sample may have left a trace session open.
  defp abort(v) when v in ["ours", "ours_full", "null"] do
    try do
      apply(scope(), :stop_trace, [])
    catch
      _, _ -> :ok
    end
  end

  defp abort(_), do: :ok

  def main do
    n = env_int("TRACER_BENCH_N", 500_000)
    samples = env_int("BENCH_SAMPLES", 5)

    wanted =
      System.get_env("TRACER_BENCH_VARIANTS", Enum.join(@variants, ","))
      |> String.split(",", trim: true)

    IO.puts("# ElixirScope tracer bench — #{Harness.machine()}")

    IO.puts(
      "# logical processors #{:erlang.system_info(:logical_processors)}, " <>
        "OTP #{System.otp_release()} (erts #{:erlang.system_info(:version)}), " <>
        "#{DateTime.utc_now() |> DateTime.truncate(:second)}"
    )

    IO.puts(
      "# workload: #{inspect(Work)}.loop(#{n}) — #{n} local calls to step/1, " <>
        "#{2 * n} events per sample (call + return); #{samples} samples, interleaved\n"
    )

    {skipped, variants} =
      Enum.split_with(Enum.filter(@variants, &(&1 in wanted)), fn v ->
        v in ["ours", "ours_full", "null"] and not ours_available?()
      end)

    if skipped != [], do: IO.puts("ours: skipped: ElixirScope.trace/2 not available\n")

    # Warm-up: every variant once on a small n (code loaded, dbg started once).
    for v <- variants, do: one(v, min(n, 10_000))

    results =
      for s <- 1..samples, v <- variants, reduce: %{} do
        acc ->
          r = one(v, n)
          IO.puts("sample #{s} #{String.pad_trailing(v, 8)} #{describe(r, n)}")
          Map.update(acc, v, [r], &[r | &1])
      end

    print_table(variants, skipped, results, n, samples)
    check_clean()
  end

  defp describe(%{error: e}, _n), do: "ERROR #{e}"
  defp describe(%{timeout: true}, _n), do: "TIMEOUT waiting for the tracer to catch up"

  defp describe(r, n) do
    "workload #{f1(r.work)} ns/event, processed #{f1(r.total)} ns/event" <>
      if(Map.has_key?(r, :captured), do: ", captured #{r.captured}/#{2 * n}", else: "") <>
      if(Map.get(r, :dropped), do: ", dropped #{r.dropped}", else: "")
  end

  defp print_table(variants, skipped, results, n, samples) do
    ok = fn v -> Enum.reject(results[v] || [], &(&1[:error] || &1[:timeout])) end

    med = fn v, key ->
      case ok.(v) do
        [] -> nil
        rs -> Harness.stats(Enum.map(rs, & &1[key])).median
      end
    end

    ours_w = med.("ours", :work)
    ours_t = med.("ours", :total)
    base_w = med.("untraced", :work)
    base_t = med.("untraced", :total)

    IO.puts("\n## Cost per traced event (median of #{samples}; #{2 * n} events per sample)\n")

    IO.puts(
      "| variant | workload ns/event | processed ns/event | drain ms | " <>
        "workload ×ours | processed ×ours | workload ×untraced | processed ×untraced | " <>
        "captured / expected | peak tracer mailbox | peak ETS | failed samples |"
    )

    IO.puts("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")

    for v <- @variants, v in variants or v in skipped do
      if v in skipped,
        do: print_skipped(v),
        else: print_row(v, results, ok, med, {ours_w, ours_t, base_w, base_t}, n)
    end

    errors = for v <- variants, r <- results[v] || [], r[:error], do: {v, r.error}
    Enum.each(Enum.uniq(errors), fn {v, e} -> IO.puts("\n#{v}: #{e}") end)

    IO.puts(
      "\nworkload: the traced process's wall time / 2n. processed: workload start → " <>
        "every event handled / 2n (ours: stop_trace + flush_trace returned; dbg: handler " <>
        "counted 2n; doctor: 2n rows in ETS). drain: processed − workload, in ms. " <>
        "Mailbox and ETS peaks are sampled every 10 ms (ETS also at the end)."
    )
  end

  defp print_skipped(v) do
    IO.puts(
      "| #{label(v)} | skipped: ElixirScope.trace/2 not available" <> String.duplicate(" |", 11)
    )
  end

  defp print_row(v, results, ok, med, {ours_w, ours_t, base_w, base_t}, n) do
    rs = results[v] || []
    w = med.(v, :work)
    t = med.(v, :total)
    drain = med.(v, :drain)
    failed = length(rs) - length(ok.(v))

    cols = [
      label(v),
      f1(w),
      f1(t),
      if(drain, do: f1(drain / 1.0e6), else: "–"),
      ratio(w, ours_w),
      ratio(t, ours_t),
      ratio(w, base_w),
      ratio(t, base_t),
      captured(rs, 2 * n),
      peak(rs, :peak_mq, &to_string/1),
      peak(rs, :peak_ets, &"#{Float.round(&1 / 1_048_576, 1)} MiB"),
      to_string(failed)
    ]

    IO.puts("| " <> Enum.join(cols, " | ") <> " |")
  end

  defp label("untraced"), do: "untraced"
  defp label("ours"), do: "ours (ElixirScope.trace, payload: :arity)"
  defp label("ours_full"), do: "ours (ElixirScope.trace, payload: :full)"
  defp label("null"), do: "NIF tracer keeping nothing (dry_run: VM cost)"
  defp label("dbg"), do: ":dbg (fun handler counting)"
  defp label("doctor"), do: "doctor-style (process → ETS ordered_set)"

  defp captured(rs, expected) do
    counts = for r <- rs, c = r[:captured], is_integer(c), do: c

    case counts do
      [] ->
        "–"

      cs ->
        {lo, hi} = Enum.min_max(cs)
        range = if lo == hi, do: "#{lo}", else: "#{lo}..#{hi}"
        mark = if lo == expected and hi == expected, do: "", else: " (MISSING)"
        "#{range} / #{expected}#{mark}"
    end
  end

  defp peak(rs, key, fmt) do
    case for(r <- rs, v = r[key], is_number(v), do: v) do
      [] -> "–"
      vs -> fmt.(Enum.max(vs))
    end
  end

  defp ratio(nil, _), do: "–"
  defp ratio(_, nil), do: "–"
  defp ratio(_, d) when d == 0, do: "–"
  defp ratio(x, d) when x / d < 0.1, do: "#{:erlang.float_to_binary(x / d, decimals: 4)}×"
  defp ratio(x, d), do: "#{:erlang.float_to_binary(x / d, decimals: 2)}×"

  defp f1(nil), do: "–"
  defp f1(x), do: :erlang.float_to_binary(x / 1, decimals: 1)

  # After the last variant: nothing is traced any more.
  defp check_clean do
    {:traced, local} = :erlang.trace_info(@mfa, :traced)
    {:flags, new_flags} = :erlang.trace_info(:new, :flags)

    traced_procs =
      for p <- Process.list(), match?({:flags, [_ | _]}, :erlang.trace_info(p, :flags)), do: p

    if local == false and new_flags == [] and traced_procs == [] and Process.whereis(:dbg) == nil,
      do: IO.puts("\ncleanup: no trace flags or patterns left"),
      else:
        IO.puts(
          "\ncleanup: tracing LEFT: step/1 #{inspect(local)}, new-process flags " <>
            "#{inspect(new_flags)}, traced processes #{inspect(traced_procs)}"
        )
  end
end

unless System.get_env("BENCH_NO_MAIN"), do: TracerBench.main()

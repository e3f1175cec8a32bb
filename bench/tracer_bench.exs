# Cost per traced event on three workloads: untraced, ElixirScope's
# tracer (ElixirScope.trace/2), a do-nothing NIF tracer (dry_run: the VM's
# own tracing floor), ElixirScope's stats modes (mode: :stats / :counts,
# the VM's call_time / call_count counters, no events), :dbg with a
# counting fun handler, and an Erlang-Doctor-style tracer (a process
# writing every trace message into an ETS ordered_set), measured in the
# same run, samples interleaved.
#
#   mix run bench/tracer_bench.exs          # TRACER_BENCH_N=500000 BENCH_SAMPLES=5
#
# Workloads (each runs in a process spawned for the sample; trace flags are
# set on that process only, before it starts):
#   calls     TracerBench.Work.loop(n): n local calls to step/1, traced with
#             local call tracing and return traces: 2 events per call.
#   calls3    TracerBench.Work.loop3(n): n local calls to step3/3 (three
#             small arguments: an integer, an atom, a 2-tuple), 2 events
#             per call.
#   messages  TracerBench.Work.msgs(n): n sends of a small tuple to itself,
#             each received: send + receive events, 2 per iteration (plus
#             the worker's :go receive and result send).
# Every figure is per event: the workload's time / 2n (also for the stats
# modes, which make no event: their cost per call is twice the figure).
#
# Two times per sample:
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
# Then two more sections, same run:
#   floor parts — the dry-run floor taken apart on the calls workload with
#     raw trace flags and patterns and a do-nothing NIF tracer: call events
#     only; call + return_trace; call + exception_trace (our default);
#     with the :arity flag; enabled/3 discarding every event; the
#     monotonic_timestamp flag; and call_time / call_count counters.
#   stats accuracy — call_stat/1 of a full trace (payload: :arity) beside
#     mode: :stats (exact and sample: 0.1) and mode: :counts on a workload
#     of calls that compute ~50 and ~250 µs each (TracerBench.Work.busy/1,
#     busy_long/1; TRACER_BENCH_ACCURACY_CALLS of each, default 500):
#     counts must be equal, own times per function within 10%.
#
# Environment: TRACER_BENCH_N (calls per sample, default 500_000),
# BENCH_SAMPLES (default 5), TRACER_BENCH_TIMEOUT_MS (the longest wait for
# a tracer to catch up, default 30_000), TRACER_BENCH_WORKLOADS (default
# "calls,calls3,messages"), TRACER_BENCH_VARIANTS (default all:
# "untraced,null,ours,ours_full,stats,stats_sampled,counts,dbg,doctor";
# the stats variants and doctor run on the call workloads only;
# stats_sampled runs TRACER_BENCH_SAMPLED_X × n calls, default 10), TRACER_BENCH_SECTIONS (default
# "main,floor,accuracy").
#
# ElixirScope.trace/2 is called only when it is exported (the variant is
# reported as skipped otherwise).
Code.require_file("support/harness.exs", __DIR__)

defmodule TracerBench.Work do
  @moduledoc false
  # loop/1 calls step/1 n times, loop3/1 step3/3, as local calls (the only
  # traced functions); msgs/1 sends n messages to itself and receives
  # them; busy/1 and busy_long/1 compute ~50 and ~250 µs per call (the stats
  # accuracy workload).

  def loop(n), do: loop(n, 0)

  def loop(0, acc), do: acc
  def loop(n, acc), do: loop(n - 1, step(acc))

  def step(x), do: x + 1

  def loop3(n), do: loop3(n, 0)

  def loop3(0, acc), do: acc
  def loop3(n, acc), do: loop3(n - 1, step3(acc, :ok, {n, 1}))

  def step3(x, _tag, {_, y}), do: x + y

  def msgs(0), do: :ok

  def msgs(n) do
    send(self(), {:m, n})

    receive do
      {:m, ^n} -> msgs(n - 1)
    end
  end

  # The stats accuracy workload: k calls each of busy/1 and busy_long/1,
  # alternating. Both only compute (a counting loop in spin/2, which is not
  # traced: its time is theirs; no allocation, so no garbage collection
  # inside the timed calls), ~50 and ~250 µs per call, so that a full
  # trace's own cost per call (two events, ~1 µs) is ≤ 2% of what it times.
  def heavy(k), do: for(_ <- 1..k, do: {busy(20_000), busy_long(100_000)})

  def busy(m), do: spin(m, 0)
  def busy_long(m), do: spin(m, 0)

  defp spin(0, acc), do: acc
  defp spin(n, acc), do: spin(n - 1, acc + 1)
end

defmodule TracerBench do
  @moduledoc false
  alias ElixirScope.Bench.Harness
  alias TracerBench.Work

  @variants ~w(untraced null null_full ours ours_full stats stats_sampled counts dbg doctor)
  @workloads ~w(calls calls3 messages)
  # Variants that only make sense for call workloads.
  @calls_only ~w(stats stats_sampled counts doctor)

  defdelegate env_int(name, default), to: ElixirScope.Bench.Harness

  defp timeout_ms, do: env_int("TRACER_BENCH_TIMEOUT_MS", 30_000)

  # The traced function and the events of a workload, per sample of n.
  defp mfa("calls"), do: {Work, :step, 1}
  defp mfa("calls3"), do: {Work, :step3, 3}
  defp mfa("messages"), do: nil

  defp run_fun("calls"), do: &Work.loop/1
  defp run_fun("calls3"), do: &Work.loop3/1
  defp run_fun("messages"), do: &Work.msgs/1

  # Events a sample makes: 2 per iteration; the message workload's worker
  # also receives :go and sends its result (traced too).
  defp expected("messages", n), do: 2 * n + 2
  defp expected(_, n), do: 2 * n

  # ---- the traced process ------------------------------------------------------

  # Spawns the process that will run the workload, bound to the last
  # scheduler; it waits for `:go`, runs it, and reports `{:work_done, pid,
  # t0, t1, cpu}`: monotonic ns, and the CPU time (ns) that scheduler's
  # thread spent meanwhile (/proc/self/task/<tid>/schedstat; nil where it
  # cannot be read). The CPU time does not count the time the OS gave the
  # core to other programs, so it holds up on a loaded machine where the
  # wall time does not.
  defp spawn_worker(fun, n) do
    parent = self()
    sched = System.schedulers_online()
    stat = schedstat_path(sched)

    pid =
      :erlang.spawn_opt(
        fn ->
          receive do
            :go -> :ok
          after
            # Not started (the variant failed before): just go away.
            60_000 -> exit(:normal)
          end

          c0 = thread_cpu(stat)
          t0 = System.monotonic_time(:nanosecond)
          fun.(n)
          t1 = System.monotonic_time(:nanosecond)
          c1 = thread_cpu(stat)
          send(parent, {:work_done, self(), t0, t1, c0 && c1 && c1 - c0})
        end,
        [{:scheduler, sched}]
      )

    ref = Process.monitor(pid)
    {pid, ref}
  end

  # The schedstat file of the thread running scheduler `id` ("<id>_scheduler").
  defp schedstat_path(id) do
    name = "#{id}_scheduler"

    case File.ls("/proc/self/task") do
      {:ok, tids} ->
        Enum.find_value(tids, fn tid ->
          case File.read("/proc/self/task/#{tid}/comm") do
            {:ok, comm} -> if String.trim(comm) == name, do: "/proc/self/task/#{tid}/schedstat"
            _ -> nil
          end
        end)

      _ ->
        nil
    end
  end

  defp thread_cpu(nil), do: nil

  # prim_file directly: File.read/1 asks the file server, and the message
  # workload would trace those messages.
  defp thread_cpu(path) do
    case :prim_file.read_file(path) do
      {:ok, s} -> s |> String.split() |> hd() |> String.to_integer()
      _ -> nil
    end
  end

  defp run_worker({pid, ref}) do
    :erlang.garbage_collect()
    send(pid, :go)

    receive do
      {:work_done, ^pid, t0, t1, cpu} ->
        receive do
          {:DOWN, ^ref, :process, ^pid, _} -> :ok
        end

        Process.put(:last_cpu, cpu)
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
  # patterns or counters, no dbg.
  def cleanup do
    if Process.whereis(:dbg), do: dbg_stop()
    :erlang.trace(:all, false, [:all])

    for flags <- [[:local], [:global], [:call_time], [:call_count]],
        do: :erlang.trace_pattern({:_, :_, :_}, false, flags)

    :ok
  end

  defp dbg_stop do
    Code.ensure_loaded(:dbg)

    # OTP 25: stop_clear/0 also clears the trace patterns; from OTP 27 stop/0 does.
    if function_exported?(:dbg, :stop_clear, 0),
      do: apply(:dbg, :stop_clear, []),
      else: :dbg.stop()
  end

  # Per event: times / the 2n events a sample would make.
  defp sample(work_ns, total_ns, n, extra) do
    cpu = Process.get(:last_cpu)

    Map.merge(
      %{
        work: work_ns / (2 * n),
        cpu: cpu && cpu / (2 * n),
        total: total_ns / (2 * n),
        drain: total_ns - work_ns
      },
      extra
    )
  end

  # ---- (a) untraced -------------------------------------------------------------

  def untraced(w, n) do
    {t0, t1} = run_worker(spawn_worker(run_fun(w), n))
    sample(t1 - t0, t1 - t0, n, %{})
  end

  # ---- (b) ours: ElixirScope.trace/2 ------------------------------------------------

  # The module is looked up at run time, so this file compiles without
  # warnings before ElixirScope.trace/2 exists.
  defp scope, do: ElixirScope

  def ours_available? do
    Code.ensure_loaded?(scope()) and function_exported?(scope(), :trace, 2)
  end

  def ours(w, n, opts) do
    {pid, _} = worker = spawn_worker(run_fun(w), n)
    big = 100 * n

    {target, events} =
      if w == "messages", do: {[], [:messages]}, else: {mfa(w), [:calls, :returns]}

    {:ok, _info} =
      apply(scope(), :trace, [
        target,
        [
          pids: [pid],
          events: events,
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

  # mode: :stats / :counts — the VM counts calls; "captured" is what the
  # counters say, as 2 events per call (so it compares with 2n).
  def stats(w, n, mode) do
    {pid, _} = worker = spawn_worker(run_fun(w), n)
    pids = if mode == :counts, do: :all, else: [pid]
    {:ok, _} = apply(scope(), :trace, [mfa(w), [mode: mode, pids: pids, duration: 3_600_000]])
    {t0, t1} = run_worker(worker)
    {:ok, summary} = apply(scope(), :stop_trace, [])
    t2 = System.monotonic_time(:nanosecond)
    sample(t1 - t0, t2 - t0, n, %{captured: 2 * summary.calls})
  end

  # mode: :stats, sample: 0.1 (call_count always, call_time 1 ms in 10;
  # pids: :all). Its workload is 10n calls (TRACER_BENCH_SAMPLED_X) so that
  # it spans many 10 ms windows (n calls take ~15 ms): a workload shorter
  # than a window would only measure the first, timed, window. Figures are
  # per event of that workload (its time / 20n); captured is 2 × the calls
  # counted against 20n.
  def stats_sampled(w, n) do
    m = n * env_int("TRACER_BENCH_SAMPLED_X", 10)
    worker = spawn_worker(run_fun(w), m)
    opts = [mode: :stats, sample: 0.1, pids: :all, duration: 3_600_000]
    {:ok, _} = apply(scope(), :trace, [mfa(w), opts])
    {t0, t1} = run_worker(worker)
    {:ok, summary} = apply(scope(), :stop_trace, [])
    t2 = System.monotonic_time(:nanosecond)

    sample(t1 - t0, t2 - t0, m, %{
      captured: 2 * summary.calls,
      expected: 2 * m,
      sampled_calls: summary[:sampled_calls]
    })
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

  def dbg_counting(w, n) do
    target = expected(w, n)
    bench = self()
    {pid, _} = worker = spawn_worker(run_fun(w), n)

    handler = fn _msg, acc ->
      acc = acc + 1
      if acc == target, do: send(bench, {:dbg_done, System.monotonic_time(:nanosecond)})
      acc
    end

    {:ok, tracer} = :dbg.tracer(:process, {handler, 0})

    if w == "messages" do
      {:ok, _} = :dbg.p(pid, [:s, :r])
    else
      {m, f, a} = mfa(w)
      {:ok, _} = :dbg.p(pid, [:c])
      {:ok, _} = :dbg.tpl(m, f, a, [{:_, [], [{:return_trace}]}])
    end

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
      do: %{timeout: true, work: (t1 - t0) / (2 * n), peak_mq: peak_mq},
      else: sample(t1 - t0, t2 - t0, n, %{captured: captured, peak_mq: peak_mq})
  end

  # ---- (d) Erlang-Doctor-style: a tracer process writing to ETS --------------------

  # Like Erlang Doctor's `tr`: trace flags [call, timestamp], local call
  # patterns with exception_trace, and every trace message stored as a row
  # {index, pid, event, mfarity, data, timestamp_us} in an ordered_set keyed
  # by an increasing index (data: the arguments of a call, the value of a
  # return).
  def doctor(w, n) do
    target = 2 * n
    bench = self()
    {pid, _} = worker = spawn_worker(run_fun(w), n)

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
    1 = :erlang.trace_pattern(mfa(w), [{:_, [], [{:exception_trace}]}], [:local])
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
    :erlang.trace_pattern(mfa(w), false, [:local])
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

  defp run_variant("untraced", w, n), do: untraced(w, n)
  defp run_variant("ours", w, n), do: ours(w, n, payload: :arity)
  defp run_variant("ours_full", w, n), do: ours(w, n, payload: :full)
  defp run_variant("null", w, n), do: ours(w, n, payload: :arity, dry_run: true)
  defp run_variant("null_full", w, n), do: ours(w, n, payload: :full, dry_run: true)
  defp run_variant("stats", w, n), do: stats(w, n, :stats)
  defp run_variant("stats_sampled", w, n), do: stats_sampled(w, n)
  defp run_variant("counts", w, n), do: stats(w, n, :counts)
  defp run_variant("dbg", w, n), do: dbg_counting(w, n)
  defp run_variant("doctor", w, n), do: doctor(w, n)

  # One sample of one variant; tracing is cleared before and after, and a
  # failure is reported as the sample's result instead of stopping the bench.
  defp one(variant, w, n) do
    cleanup()

    try do
      run_variant(variant, w, n)
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
  defp abort(v)
       when v in ["ours", "ours_full", "null", "null_full", "stats", "stats_sampled", "counts"] do
    try do
      apply(scope(), :stop_trace, [])
    catch
      _, _ -> :ok
    end
  end

  defp abort(_), do: :ok

  defp env_list(name, all) do
    wanted = System.get_env(name, Enum.join(all, ",")) |> String.split(",", trim: true)
    Enum.filter(all, &(&1 in wanted))
  end

  def main do
    n = env_int("TRACER_BENCH_N", 500_000)
    samples = env_int("BENCH_SAMPLES", 5)
    wanted = env_list("TRACER_BENCH_VARIANTS", @variants)
    workloads = env_list("TRACER_BENCH_WORKLOADS", @workloads)
    sections = env_list("TRACER_BENCH_SECTIONS", ~w(main floor accuracy))

    IO.puts("# ElixirScope tracer bench — #{Harness.machine()}")

    IO.puts(
      "# logical processors #{:erlang.system_info(:logical_processors)}, " <>
        "OTP #{System.otp_release()} (erts #{:erlang.system_info(:version)}), " <>
        "#{DateTime.utc_now() |> DateTime.truncate(:second)}, load #{load()}"
    )

    IO.puts(
      "# workloads #{Enum.join(workloads, ", ")}: #{n} iterations, #{2 * n} events per " <>
        "sample; #{samples} samples, interleaved\n"
    )

    {skipped, variants} =
      Enum.split_with(wanted, fn v ->
        v in ["ours", "ours_full", "null", "null_full", "stats", "stats_sampled", "counts"] and
          not ours_available?()
      end)

    if skipped != [], do: IO.puts("ours: skipped: ElixirScope.trace/2 not available\n")

    jobs =
      for w <- workloads,
          v <- variants,
          w in ["calls", "calls3"] or v not in @calls_only,
          do: {w, v}

    results =
      if "main" in sections do
        # Warm-up: every job once on a small n (code loaded, dbg started once).
        for {w, v} <- jobs, do: one(v, w, min(n, 10_000))

        for s <- 1..samples, {w, v} <- jobs, reduce: %{} do
          acc ->
            r = one(v, w, n)

            IO.puts(
              "sample #{s} #{String.pad_trailing(w, 8)} #{String.pad_trailing(v, 9)} #{describe(r, w, n)}"
            )

            Map.update(acc, {w, v}, [r], &[r | &1])
        end
      else
        %{}
      end

    if "main" in sections do
      for w <- workloads, do: print_table(w, variants, skipped, results, n, samples)
      print_targets(workloads, results)
    end

    if "floor" in sections, do: floor_section(n, samples)
    if "accuracy" in sections, do: accuracy_section(samples)
    IO.puts("\n# load at the end: #{load()}")
    check_clean()
  end

  defp load do
    case File.read("/proc/loadavg") do
      {:ok, s} -> s |> String.split() |> Enum.take(3) |> Enum.join(" ")
      _ -> "?"
    end
  end

  defp describe(%{error: e}, _w, _n), do: "ERROR #{e}"
  defp describe(%{timeout: true}, _w, _n), do: "TIMEOUT waiting for the tracer to catch up"

  defp describe(r, w, n) do
    "workload #{f1(r.work)} ns/event, processed #{f1(r.total)} ns/event" <>
      if(Map.has_key?(r, :captured), do: ", captured #{r.captured}/#{expected(w, n)}", else: "") <>
      if(Map.get(r, :dropped), do: ", dropped #{r.dropped}", else: "")
  end

  defp ok_samples(results, w, v),
    do: Enum.reject(results[{w, v}] || [], &(&1[:error] || &1[:timeout]))

  defp med(results, w, v, key) do
    case for(r <- ok_samples(results, w, v), is_number(r[key]), do: r[key]) do
      [] -> nil
      xs -> Harness.stats(xs).median
    end
  end

  defp print_table(w, variants, skipped, results, n, samples) do
    null_w = med(results, w, "null", :work)
    ours_w = med(results, w, "ours", :work)
    base_w = med(results, w, "untraced", :work)

    IO.puts(
      "\n## #{w}: cost per event (median of #{samples}; #{expected(w, n)} events per sample)\n"
    )

    IO.puts(
      "| variant | workload ns/event | − dry_run ns | ×dry_run | ×ours | ×untraced | " <>
        "workload CPU ns/event | CPU − dry_run ns | " <>
        "processed ns/event | drain ms | captured / expected | peak tracer mailbox | " <>
        "peak ETS | failed samples |"
    )

    IO.puts("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    null_c = med(results, w, "null", :cpu)

    for v <- @variants,
        v in variants or v in skipped,
        w in ["calls", "calls3"] or v not in @calls_only do
      if v in skipped do
        IO.puts(
          "| #{label(v)} | skipped: ElixirScope.trace/2 not available" <>
            String.duplicate(" |", 13)
        )
      else
        rs = results[{w, v}] || []
        wk = med(results, w, v, :work)
        cpu = med(results, w, v, :cpu)
        drain = med(results, w, v, :drain)

        cols = [
          label(v),
          f1(wk),
          if(wk && null_w, do: signed(wk - null_w), else: "–"),
          ratio(wk, null_w),
          ratio(wk, ours_w),
          ratio(wk, base_w),
          f1(cpu),
          if(cpu && null_c, do: signed(cpu - null_c), else: "–"),
          f1(med(results, w, v, :total)),
          if(drain, do: f1(drain / 1.0e6), else: "–"),
          captured(rs, expected(w, n), v),
          peak(rs, :peak_mq, &to_string/1),
          peak(rs, :peak_ets, &"#{Float.round(&1 / 1_048_576, 1)} MiB"),
          to_string(length(rs) - length(ok_samples(results, w, v)))
        ]

        IO.puts("| " <> Enum.join(cols, " | ") <> " |")
      end
    end

    errors = for v <- variants, r <- results[{w, v}] || [], r[:error], do: {v, r.error}
    Enum.each(Enum.uniq(errors), fn {v, e} -> IO.puts("\n#{v}: #{e}") end)
  end

  # The issue's targets, from the medians above: ours ≤ dry_run + 60 ns
  # (payload: :arity, calls and messages), ours_full ≤ dry_run + 150 ns
  # (calls3: three small arguments), stats ≤ 0.3× dry_run per event.
  defp print_targets(workloads, results) do
    IO.puts("\n## Targets (medians above, same run)\n")

    # ours_full also against the dry run with its own flags: without the
    # :arity flag the VM itself builds every call's argument list.
    checks = [
      {"calls", "ours", "null", 60},
      {"messages", "ours", "null", 60},
      {"calls3", "ours_full", "null", 150},
      {"calls3", "ours_full", "null_full", 150},
      {"calls", "ours_full", "null_full", 150},
      {"messages", "ours_full", "null_full", 150}
    ]

    for {w, v, base, limit} <- checks, w in workloads, key <- [:work, :cpu] do
      case {med(results, w, v, key), med(results, w, base, key)} do
        {x, d} when is_number(x) and is_number(d) ->
          IO.puts(
            "* #{w}, #{label(v)}, #{if key == :work, do: "wall", else: "CPU"}: " <>
              "#{signed(x - d)} ns/event over #{label(base)} " <>
              "(#{f1(x)} vs #{f1(d)}; target ≤ +#{limit}): #{verdict(x - d <= limit)}"
          )

        _ ->
          :ok
      end
    end

    for w <- ["calls", "calls3"],
        w in workloads,
        v <- ["stats", "stats_sampled", "counts"],
        key <- [:work, :cpu] do
      case {med(results, w, v, key), med(results, w, "null", key)} do
        {x, d} when is_number(x) and is_number(d) ->
          # x is per event-equivalent (per call / 2); per call it is 2x.
          IO.puts(
            "* #{w}, #{label(v)}, #{if key == :work, do: "wall", else: "CPU"}: " <>
              "#{f1(2 * x)} ns per traced call = " <>
              "#{ratio(2 * x, d)} dry_run's cost per event (#{f1(d)} ns; target ≤ 0.3×: " <>
              "#{verdict(2 * x <= 0.3 * d)}), #{ratio(x, d)} its cost per call " <>
              "(call + return events, #{f1(2 * d)} ns)"
          )

        _ ->
          :ok
      end
    end

    IO.puts(
      "\nworkload: the traced process's wall time / 2n; workload CPU: the CPU time of the " <>
        "scheduler thread it is bound to, over the same interval, / 2n (not counting the " <>
        "time the OS gave that core to other programs). processed: workload start → " <>
        "every event handled / 2n (ours: stop_trace + flush_trace returned; dbg: handler " <>
        "counted them all; doctor: 2n rows in ETS; stats: stop_trace returned). drain: " <>
        "processed − workload, in ms. Mailbox and ETS peaks are sampled every 10 ms (ETS " <>
        "also at the end). stats/counts make no events: their captured figure is 2 × the " <>
        "calls the VM counted."
    )
  end

  defp verdict(true), do: "met"
  defp verdict(false), do: "MISSED"

  defp signed(x) when x >= 0, do: "+" <> f1(x)
  defp signed(x), do: f1(x)

  defp label("untraced"), do: "untraced"
  defp label("ours"), do: "ours (ElixirScope.trace, payload: :arity)"
  defp label("ours_full"), do: "ours (ElixirScope.trace, payload: :full)"
  defp label("null"), do: "NIF tracer keeping nothing (dry_run: VM cost)"
  defp label("null_full"), do: "dry_run with payload: :full's flags (no :arity flag)"
  defp label("stats"), do: "ours, mode: :stats (call_time counters)"

  defp label("stats_sampled"),
    do: "ours, mode: :stats, sample: 0.1 (call_count + call_time 1 ms in 10; 10n calls)"

  defp label("counts"), do: "ours, mode: :counts (call_count counters)"
  defp label("dbg"), do: ":dbg (fun handler counting)"
  defp label("doctor"), do: "doctor-style (process → ETS ordered_set)"

  defp captured(rs, expected, v) do
    counts = for r <- rs, c = r[:captured], is_integer(c), do: c
    # A variant running a longer workload says how many it expected.
    expected = Enum.find_value(rs, expected, & &1[:expected])

    case counts do
      [] ->
        "–"

      cs ->
        {lo, hi} = Enum.min_max(cs)
        range = if lo == hi, do: "#{lo}", else: "#{lo}..#{hi}"
        # mode: :counts counts every process's calls: at least the worker's.
        ok? = lo == expected and hi == expected
        ok? = ok? or (v == "counts" and lo >= expected)
        mark = if ok?, do: "", else: " (MISSING)"
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

  # ---- floor parts ------------------------------------------------------------------

  # The dry-run floor taken apart, on the calls workload (and step3/3 for
  # the argument list), with raw trace flags and patterns: a NIF tracer
  # keeping nothing (ElixirScope.Native.tracer_new with record: false; its
  # enabled/3 answers trace), or one whose enabled/3 discards every event
  # (tracer_discard). Per traced call and per event the VM delivered.
  @floor [
    {"call events only (match spec true)", "calls", [:call], true, :null},
    {"call + return_trace", "calls", [:call], [{:_, [], [{:return_trace}]}], :null},
    {"call + exception_trace (ElixirScope's default)", "calls", [:call],
     [{:_, [], [{:exception_trace}]}], :null},
    {"call + exception_trace, :arity flag (payload: :arity)", "calls", [:call, :arity],
     [{:_, [], [{:exception_trace}]}], :null},
    {"call + exception_trace, monotonic_timestamp flag", "calls",
     [:call, :arity, :monotonic_timestamp], [{:_, [], [{:exception_trace}]}], :null},
    {"call + exception_trace, enabled/3 discards every event", "calls", [:call, :arity],
     [{:_, [], [{:exception_trace}]}], :discard},
    {"step3/3: call + exception_trace, argument list", "calls3", [:call],
     [{:_, [], [{:exception_trace}]}], :null},
    {"step3/3: call + exception_trace, :arity flag", "calls3", [:call, :arity],
     [{:_, [], [{:exception_trace}]}], :null},
    {"call_time counter (mode: :stats), call flag, discarding tracer", "calls", [:call],
     :call_time, :discard},
    {"call_count counter (mode: :counts), no process flag", "calls", [], :call_count, :none}
  ]

  defp floor_section(n, samples) do
    native = ElixirScope.Native
    {:ok, ring} = ElixirScope.Capture.RingBuffer.new(size: 1024)
    rows = [{"untraced", "calls", [], nil, :none} | @floor]
    huge = Bitwise.bsl(1, 60)

    run = fn {_label, w, flags, ms, kind}, n ->
      cleanup()
      mfa = mfa(w)
      {pid, _} = worker = spawn_worker(run_fun(w), n)

      tracer =
        case kind do
          :null ->
            native.tracer_new(
              ring.ref,
              self(),
              true,
              false,
              64,
              64,
              huge,
              huge,
              3_600_000,
              [],
              nil
            )

          :discard ->
            native.tracer_discard(self())

          :none ->
            nil
        end

      case ms do
        nil ->
          :ok

        counter when counter in [:call_time, :call_count] ->
          :erlang.trace_pattern(mfa, true, [counter])

        spec ->
          :erlang.trace_pattern(mfa, spec, [:local])
      end

      if flags != [], do: :erlang.trace(pid, true, [{:tracer, native, tracer} | flags])
      {t0, t1} = run_worker(worker)
      cleanup()
      offered = if kind == :null, do: native.tracer_stats(tracer).offered, else: nil
      if tracer, do: native.tracer_stop(tracer, :stopped)
      cpu = Process.get(:last_cpu)
      %{per_call: (t1 - t0) / n, cpu: cpu && cpu / n, events: offered && offered / n}
    end

    for r <- rows, do: run.(r, min(n, 10_000))

    res =
      for _ <- 1..samples, r <- rows, reduce: %{} do
        acc ->
          x = run.(r, n)
          Map.update(acc, elem(r, 0), [x], &[x | &1])
      end

    m = fn label, key ->
      case for(x <- res[label], is_number(x[key]), do: x[key]) do
        [] -> nil
        vs -> Harness.stats(vs).median
      end
    end

    default = "call + exception_trace, :arity flag (payload: :arity)"

    IO.puts(
      "\n## The dry-run floor, part by part (calls workload, #{n} calls per sample, " <>
        "median of #{samples}, interleaved; load #{load()})\n"
    )

    IO.puts(
      "| configuration | ns per call | CPU ns per call | events per call | CPU ns per event | " <>
        "CPU ns per call − ElixirScope's default (payload: :arity) |"
    )

    IO.puts("|---|---:|---:|---:|---:|---:|")
    d = m.(default, :cpu)

    for {label, _, _, _, _} <- rows do
      pc = m.(label, :cpu)
      ev = m.(label, :events)

      IO.puts(
        "| #{label} | #{f1(m.(label, :per_call))} | #{f1(pc)} | #{if ev, do: f1(ev), else: "–"} | " <>
          "#{if pc && ev && ev > 0, do: f1(pc / ev), else: "–"} | " <>
          "#{if pc && d, do: signed(pc - d), else: "–"} |"
      )
    end

    # The comparisons below are on CPU time (wall time where it is missing).
    pc = &(m.(&1, :cpu) || m.(&1, :per_call))
    call_only = pc.("call events only (match spec true)")
    rt = pc.("call + return_trace")
    et = pc.("call + exception_trace (ElixirScope's default)")
    ar = pc.(default)
    ts = pc.("call + exception_trace, monotonic_timestamp flag")
    disc = pc.("call + exception_trace, enabled/3 discards every event")
    a3 = pc.("step3/3: call + exception_trace, argument list")
    a3a = pc.("step3/3: call + exception_trace, :arity flag")

    IO.puts("""

    * a call event: #{f1(call_only)} ns; adding its return: +#{f1(rt - call_only)} ns with return_trace, +#{f1(et - call_only)} ns with exception_trace (exception_trace − return_trace: #{signed(et - rt)} ns per call; it also reports exceptions)
    * the :arity flag (no argument list in the trace term): #{signed(ar - et)} ns per call on step/1, #{signed(a3a - a3)} ns on step3/3
    * the monotonic_timestamp flag (the VM stamps every event): #{signed(ts - ar)} ns per call
    * enabled/3 answering discard (the VM builds and delivers nothing): #{f1(disc)} ns per call, so delivering the two events to trace/5 costs #{f1(ar - disc)} ns per call
    """)
  end

  # ---- stats accuracy ------------------------------------------------------------------

  # call_stat/1 of busy/1 and busy_long/1 after a full trace (payload:
  # :arity) and after mode: :stats (exact and sampled) and :counts,
  # interleaved: counts must match exactly, own times within 10% of the
  # full trace's, per function (each sample's own time / its count, the
  # median over samples).
  defp accuracy_section(samples) do
    k = env_int("TRACER_BENCH_ACCURACY_CALLS", 500)
    fns = [{Work, :busy, 1}, {Work, :busy_long, 1}]

    run = fn variant ->
      cleanup()
      {pid, _} = worker = spawn_worker(&Work.heavy/1, k)

      opts =
        case variant do
          "full trace" -> [pids: [pid], events: [:calls, :returns], payload: :arity]
          "mode: :stats" -> [mode: :stats, pids: [pid]]
          "mode: :stats, sample: 0.1" -> [mode: :stats, sample: 0.1, pids: :all]
          "mode: :stats, pids: :all" -> [mode: :stats, pids: :all]
          "mode: :counts" -> [mode: :counts]
        end

      {:ok, _} = ElixirScope.trace(fns, opts)
      {t0, t1} = run_worker(worker)
      {:ok, _} = ElixirScope.stop_trace()
      stats = ElixirScope.Analysis.call_stat()
      cleanup()

      work = (t1 - t0) / k

      for mfa <- fns, into: %{work: work} do
        row = Enum.find(stats, &(&1.key == mfa))
        own = row && row.own_ns && row.own_ns / row.count
        {mfa, %{count: row && row.count, own: own, share: own && own / work}}
      end
    end

    variants = [
      "full trace",
      "mode: :stats",
      "mode: :stats, sample: 0.1",
      "mode: :stats, pids: :all",
      "mode: :counts"
    ]

    for v <- variants, do: run.(v)

    res =
      for _ <- 1..samples, v <- variants, reduce: %{} do
        acc ->
          x = run.(v)
          Map.update(acc, v, [x], &[x | &1])
      end

    med = fn xs ->
      case Enum.filter(xs, &is_number/1) do
        [] -> nil
        vs -> Harness.stats(vs).median
      end
    end

    own = fn v, mfa -> med.(for x <- res[v], do: x[mfa].own) end
    share = fn v, mfa -> med.(for x <- res[v], do: x[mfa].share) end

    IO.puts(
      "\n## call_stat/1 from the counters vs a full trace (#{k} calls each of busy/1 and " <>
        "busy_long/1 per sample, median of #{samples}, interleaved; load #{load()})\n"
    )

    IO.puts(
      "| session | function | calls counted (all samples) | own µs per call | own ×full trace | " <>
        "own / iteration time | that ×full trace |"
    )

    IO.puts("|---|---|---|---:|---:|---:|---:|")

    for v <- variants, {m, f, a} = mfa <- fns do
      counts =
        res[v] |> Enum.map(& &1[mfa].count) |> Enum.uniq() |> Enum.map_join(", ", &inspect/1)

      o = own.(v, mfa)

      IO.puts(
        "| #{v} | #{inspect(m)}.#{f}/#{a} | #{counts} (expected #{k}) | " <>
          "#{if o, do: :erlang.float_to_binary(o / 1000, decimals: 2), else: "–"} | " <>
          "#{ratio(o, own.("full trace", mfa))} | #{ratio(share.(v, mfa), 1)} | " <>
          "#{ratio(share.(v, mfa), share.("full trace", mfa))} |"
      )
    end

    IO.puts(
      "\nworkload (busy + busy_long) µs per iteration: " <>
        Enum.map_join(variants, ", ", fn v ->
          "#{v} #{f1(med.(for x <- res[v], do: x.work) / 1000)}"
        end)
    )

    exact? =
      Enum.all?(Map.values(res), fn xs ->
        Enum.all?(xs, fn x -> Enum.all?(fns, &(x[&1].count == k)) end)
      end)

    for v <- ["mode: :stats", "mode: :stats, sample: 0.1", "mode: :stats, pids: :all"],
        mfa <- fns do
      {st, full} = {own.(v, mfa), own.("full trace", mfa)}
      {sh, full_sh} = {share.(v, mfa), share.("full trace", mfa)}

      if st && full && sh && full_sh do
        {_, f, a} = mfa

        IO.puts(
          "* #{v}, #{f}/#{a}: own time #{ratio(st, full)} the full trace's, " <>
            "as a share of its own run's iteration time #{ratio(sh, full_sh)} " <>
            "(target within 10%: #{verdict(abs(st / full - 1) <= 0.1)} / " <>
            "#{verdict(abs(sh / full_sh - 1) <= 0.1)})"
        )
      end
    end

    IO.puts(
      "\nown times are wall time in the call (the VM's call_time and the trace's " <>
        "timestamps alike): other programs taking the core inflate them, and the load " <>
        "moves between samples; the share (own time per call / that sample's time per " <>
        "iteration of busy + busy_long) takes that drift out."
    )

    IO.puts("* counts exact in every session and sample: #{verdict(exact?)}")
  end

  # After the last variant: nothing is traced any more.
  defp check_clean do
    {:traced, local} = :erlang.trace_info({Work, :step, 1}, :traced)
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

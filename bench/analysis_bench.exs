# ElixirScope.Analysis over a real trace of ~2M events: how long each query
# takes, next to the targets and to Erlang Doctor's figures on a trace of
# the same size; then the memory of a trace of two busy processes over time.
#
#   mix run bench/analysis_bench.exs
#
# Part 1 traces AnalysisBench.Work (a non-tail recursive chain of depth 32
# ending in a binary call tree of depth 6; 320 calls, 640 events per
# run/1) in one spawned process with ElixirScope.trace/2 (calls + returns,
# payload: :full) until about ANALYSIS_BENCH_EVENTS events are stored, picks
# its query subjects from the middle of the trace and times each query with
# the house harness (per-operation time: min, median, p99 over the samples;
# samples interleaved across the queries of a group).
#
# Part 2 traces two processes running a tight call loop concurrently for
# ANALYSIS_BENCH_BUSY_S seconds (payload: :arity, max_stored 1_000_000,
# default ring) and samples memory every 250 ms.
#
# Environment: ANALYSIS_BENCH_EVENTS (default 2_000_000), BENCH_SAMPLES
# (samples of the quick queries, default 15), ANALYSIS_BENCH_SLOW_SAMPLES
# (samples of the whole-trace queries, default 5), ANALYSIS_BENCH_BUSY_S
# (default 5), ANALYSIS_BENCH_PARTS (default "queries,memory").
Code.require_file("support/harness.exs", __DIR__)

defmodule AnalysisBench.Work do
  @moduledoc false
  # The traced module. run/1: chain/2 recurses (not a tail call) 32 levels,
  # calling leaf/1 on each, and at the bottom builds tree(6): a binary
  # recursion calling leaf/1 at every node. Calls per run/1:
  # 1 + 33 chain + 32 leaf + (2^8 - 2) tree and leaf = 320; events: 640.

  @chain 32
  @tree 6

  def chain_depth, do: @chain
  def tree_depth, do: @tree

  def run(i), do: chain(@chain, i)

  def chain(0, i), do: tree(@tree) + i
  def chain(d, i), do: leaf(d) + chain(d - 1, i) + 1

  def tree(0), do: leaf(0)
  def tree(d), do: leaf(d) + tree(d - 1) + tree(d - 1)

  def leaf(x), do: x * 2 + 1

  # Calls, and events, in one run/1.
  def calls_per_run, do: 1 + (@chain + 1) + @chain + (Integer.pow(2, @tree + 2) - 2)
  def events_per_run, do: 2 * calls_per_run()
end

defmodule AnalysisBench.Driver do
  @moduledoc false
  # Untraced: the loop lives here so that tracing Work does not trace it
  # (a traced tail-recursive loop would keep a frame per iteration).
  def loop(i, n) when i > n, do: :ok

  def loop(i, n) do
    AnalysisBench.Work.run(i)
    loop(i + 1, n)
  end
end

defmodule AnalysisBench.Busy do
  @moduledoc false
  # Part 2: step/1 is the traced function; spin/1 (untraced) calls it in a
  # tight loop until the deadline, checking the clock every 1000 calls.
  def step(x), do: x + 1

  def spin(deadline), do: spin(deadline, 0)

  defp spin(deadline, acc) do
    acc = steps(1000, acc)

    if System.monotonic_time(:millisecond) < deadline,
      do: spin(deadline, acc),
      else: acc
  end

  defp steps(0, acc), do: acc
  defp steps(n, acc), do: steps(n - 1, step(acc))
end

defmodule AnalysisBench do
  @moduledoc false
  alias AnalysisBench.{Busy, Driver, Work}
  alias ElixirScope.Analysis
  alias ElixirScope.Bench.Harness
  alias ElixirScope.Capture.PipelineManager

  # Erlang Doctor on a 2M-event trace, same machine class (ns/op).
  @doctor %{
    traceback: 1.7e9,
    range: 1.2e9,
    call_stat: 0.9e9,
    top_call_trees: 4.6e9,
    step: 1.8e3
  }

  def env_int(name, default) do
    case System.get_env(name) do
      nil -> default
      v -> v |> String.replace("_", "") |> String.to_integer()
    end
  end

  # ---- part 1: build the trace ----------------------------------------------------

  defp build_trace(target_events) do
    runs = max(div(target_events, Work.events_per_run()), 1)
    parent = self()

    pid =
      spawn(fn ->
        receive do
          :go -> :ok
        end

        t0 = System.monotonic_time(:nanosecond)
        Driver.loop(1, runs)
        send(parent, {:done, self(), System.monotonic_time(:nanosecond) - t0})
      end)

    {:ok, _info} =
      ElixirScope.trace(Work,
        pids: [pid],
        events: [:calls, :returns],
        payload: :full,
        max_events: 3_000_000,
        max_rate: 100_000_000,
        max_stored: 2_100_000,
        duration: 600_000
      )

    t0 = System.monotonic_time(:nanosecond)
    send(pid, :go)

    work_ns =
      receive do
        {:done, ^pid, ns} -> ns
      end

    {:ok, summary} = ElixirScope.stop_trace()
    # stop_trace/0 waits up to 5 s for the store; make sure of the rest.
    flush = ElixirScope.flush_trace(120_000)
    total_ns = System.monotonic_time(:nanosecond) - t0
    metrics = PipelineManager.get_metrics(ElixirScope.trace_pipeline())
    acc = metrics.accounting

    IO.puts(
      "## Trace: #{inspect(Work)}.run/1 × #{runs} in one process " <>
        "(#{Work.events_per_run()} events per run, expected #{runs * Work.events_per_run()})\n"
    )

    IO.puts(
      "workload #{ms(work_ns)} traced; until stored and queryable #{ms(total_ns)} " <>
        "(flush_trace: #{inspect(flush)})"
    )

    IO.puts(
      "stop summary: reason #{inspect(summary.reason)}, traced #{summary.traced}, " <>
        "dropped #{summary.dropped}, over_limit #{summary.over_limit}, truncated #{summary.truncated}"
    )

    IO.puts("stored #{acc.stored} (store memory #{mib(metrics.memory_bytes)})")
    IO.puts("accounting: #{PipelineManager.accounting_line(ElixirScope.trace_pipeline())}")

    if summary.dropped != 0 or acc.stored != runs * Work.events_per_run() do
      IO.puts(
        "WARNING: events missing: dropped #{summary.dropped}, stored #{acc.stored} " <>
          "of #{runs * Work.events_per_run()}"
      )
    end

    %{stored: acc.stored, runs: runs, pid: pid}
  end

  # ---- part 1: the query subjects -------------------------------------------------

  # Deterministic, from the middle of the trace: the window of timestamps
  # from the middle event on. Ids increase by one per event in capture order
  # (a trace's ids need not start at 1: they go on from the previous
  # trace's).
  defp subjects(%{stored: stored}) do
    [first] = Analysis.select(limit: 1)
    mid = Analysis.get(first.id + div(stored, 2))
    t_mid = mid.timestamp
    window_ns = 200_000

    # The deepest call among the first 100 calls from the middle on.
    calls = Analysis.select(from: t_mid, to: t_mid + window_ns, types: [:call], limit: 100)
    deep = Enum.max_by(calls, &length(Analysis.traceback(&1)))

    # The first run/1 call from the middle on: its range is a whole run.
    [run_call] =
      Analysis.select(from: t_mid, module: Work, function: :run, types: [:call], limit: 1)

    # A narrow select: the tree/1 calls of Work during that run/1 call (its
    # return's timestamp ends the window).
    run_return = List.last(Analysis.range(run_call))

    narrow = [
      module: Work,
      function: :tree,
      types: [:call],
      from: run_call.timestamp,
      to: run_return.timestamp
    ]

    %{mid: mid, deep: deep, run_call: run_call, narrow: narrow}
  end

  # ---- part 1: the queries ----------------------------------------------------------

  defp queries(trace) do
    s = subjects(trace)
    store = ElixirScope.trace_store()
    quick_samples = env_int("BENCH_SAMPLES", 15)
    slow_samples = env_int("ANALYSIS_BENCH_SLOW_SAMPLES", 5)

    deep_tb = Analysis.traceback(s.deep)
    run_range = Analysis.range(s.run_call)
    tree = Analysis.call_tree(s.run_call)
    narrow_hits = Analysis.select(s.narrow)
    stats = Analysis.call_stat()
    tops = Analysis.top_call_trees()
    flows = Analysis.messages()

    IO.puts(
      "\nsubjects: deep event id #{s.deep.id} (#{inspect(s.deep.type)} " <>
        "#{inspect(s.deep.module)}.#{s.deep.function}/#{s.deep.arity}, traceback depth " <>
        "#{length(deep_tb)}); run/1 call id #{s.run_call.id} (range #{length(run_range)} " <>
        "events, tree of #{count_calls(tree)} calls); narrow select: module Work, " <>
        "function :tree, types [:call], the #{ms(s.narrow[:to] - s.narrow[:from])} window " <>
        "of that run/1 call (#{length(narrow_hits)} hits)"
    )

    IO.puts(
      "call_stat: #{length(stats)} keys, #{Enum.sum(Enum.map(stats, & &1.count))} calls; " <>
        "top_call_trees: #{length(tops)} trees, largest #{inspect(tops |> Enum.map(&{&1.count, &1.size}) |> Enum.take(3))} " <>
        "({count, calls}); messages: #{length(flows)} flows"
    )

    check_results!(s, deep_tb, run_range, tree, stats, narrow_hits)

    walk = 1000

    step_job = fn name, fun, opts ->
      %{
        name: name,
        n: walk,
        run: fn _ -> walk_steps(fun, s.deep, walk, opts) end
      }
    end

    quick = [
      %{
        name: "traceback",
        n: 200,
        run: fn _ -> repeat(200, fn -> Analysis.traceback(s.deep) end) end
      },
      %{name: "range", n: 20, run: fn _ -> repeat(20, fn -> Analysis.range(s.run_call) end) end},
      %{
        name: "call_tree",
        n: 20,
        run: fn _ -> repeat(20, fn -> Analysis.call_tree(s.run_call) end) end
      },
      step_job.("next :process", &Analysis.next/2, scope: :process),
      step_job.("prev :process", &Analysis.prev/2, scope: :process),
      step_job.("next :global", &Analysis.next/2, scope: :global),
      step_job.("prev :global", &Analysis.prev/2, scope: :global),
      step_job.("next :process, store:", &Analysis.next/2, scope: :process, store: store),
      step_job.("prev :process, store:", &Analysis.prev/2, scope: :process, store: store),
      step_job.("next :global, store:", &Analysis.next/2, scope: :global, store: store),
      step_job.("prev :global, store:", &Analysis.prev/2, scope: :global, store: store),
      %{name: "get", n: walk, run: fn _ -> repeat(walk, fn -> Analysis.get(s.deep) end) end},
      %{
        name: "select narrow",
        n: 5,
        run: fn _ -> repeat(5, fn -> Analysis.select(s.narrow) end) end
      }
    ]

    slow = [
      %{name: "call_stat", n: 1, run: fn _ -> Analysis.call_stat() end},
      %{name: "top_call_trees", n: 1, run: fn _ -> Analysis.top_call_trees() end},
      %{name: "messages", n: 1, run: fn _ -> Analysis.messages() end}
    ]

    IO.puts(
      "\ntiming: #{quick_samples} samples of the quick queries, #{slow_samples} of the whole-trace ones ..."
    )

    r1 = Harness.run(quick, samples: quick_samples, warmup: 2)
    r2 = Harness.run(slow, samples: slow_samples, warmup: 1)
    results = Map.merge(r1, r2)

    rows = [
      {"traceback (depth #{length(deep_tb)})", "traceback", 1.0e6, @doctor.traceback},
      {"range (#{length(run_range)} events)", "range", 1.0e6, @doctor.range},
      {"call_tree (#{count_calls(tree)} calls)", "call_tree", nil, nil},
      {"call_stat (all #{trace.stored} events)", "call_stat", 100.0e6, @doctor.call_stat},
      {"top_call_trees (all events)", "top_call_trees", nil, @doctor.top_call_trees},
      {"next, scope :process", "next :process", 10.0e3, @doctor.step},
      {"prev, scope :process", "prev :process", 10.0e3, @doctor.step},
      {"next, scope :global", "next :global", 10.0e3, @doctor.step},
      {"prev, scope :global", "prev :global", 10.0e3, @doctor.step},
      {"next, :process, store: given", "next :process, store:", 10.0e3, @doctor.step},
      {"prev, :process, store: given", "prev :process, store:", 10.0e3, @doctor.step},
      {"next, :global, store: given", "next :global, store:", 10.0e3, @doctor.step},
      {"prev, :global, store: given", "prev :global, store:", 10.0e3, @doctor.step},
      {"get (one event)", "get", nil, nil},
      {"select narrow (#{length(narrow_hits)} hits)", "select narrow", nil, nil},
      {"messages (#{length(flows)} sends in this trace)", "messages", nil, nil}
    ]

    IO.puts("\n## Analysis queries on #{trace.stored} stored events\n")
    IO.puts("| query | median | p99 | min | target | met? | Erlang Doctor | Doctor ÷ ours |")
    IO.puts("|---|---:|---:|---:|---:|---|---:|---:|")

    for {label, name, target, doctor} <- rows do
      %{median: md, p99: p, min: mn} = Map.fetch!(results, name)

      met =
        cond do
          target == nil -> "–"
          md <= target -> "met"
          true -> "MISSED"
        end

      IO.puts(
        "| #{label} | #{dur(md)} | #{dur(p)} | #{dur(mn)} | " <>
          "#{if target, do: "≤ " <> dur(target), else: "–"} | #{met} | " <>
          "#{if doctor, do: dur(doctor), else: "–"} | #{if doctor, do: speedup(doctor / md), else: "–"} |"
      )
    end

    IO.puts(
      "\nPer operation: each sample times a batch of calls (traceback ×200, range and " <>
        "call_tree ×20, next/prev: a walk of #{walk} steps from the deep event, each step " <>
        "from the previous result, get ×#{walk}, select ×5, whole-trace queries ×1) and " <>
        "divides; median / p99 / min over the samples. Without store:, each call looks " <>
        "the store up with ElixirScope.trace_store/0 (a :persistent_term read)."
    )
  end

  defp repeat(0, _f), do: :ok

  defp repeat(n, f) do
    f.()
    repeat(n - 1, f)
  end

  defp walk_steps(_fun, e, 0, _opts), do: e

  defp walk_steps(fun, e, n, opts) do
    case fun.(e, opts) do
      nil -> raise "walked off the trace after #{n} steps short"
      next -> walk_steps(fun, next, n - 1, opts)
    end
  end

  defp count_calls(nil), do: 0

  defp count_calls(%{children: children}) do
    1 + Enum.sum(for %{call: _} = c <- children, do: count_calls(c))
  end

  # The results the timings are about are what they should be.
  defp check_results!(s, deep_tb, run_range, tree, stats, narrow_hits) do
    depth = 1 + (Work.chain_depth() + 1) + (Work.tree_depth() + 1) + 1
    calls = Work.calls_per_run()
    trees = Integer.pow(2, Work.tree_depth() + 1) - 1

    problems =
      [
        {length(deep_tb) == depth, "traceback depth #{length(deep_tb)}, expected #{depth}"},
        {hd(deep_tb).id == s.deep.call_id, "traceback does not start at the event's call"},
        {length(run_range) == 2 * calls,
         "range #{length(run_range)} events, expected #{2 * calls}"},
        {count_calls(tree) == calls, "call_tree #{count_calls(tree)} calls, expected #{calls}"},
        {tree && tree.result && tree.result.type == :return, "call_tree has no return"},
        {Enum.any?(stats, &(&1.key == {Work, :run, 1})), "call_stat has no run/1"},
        {length(narrow_hits) == trees,
         "narrow select #{length(narrow_hits)} hits, expected #{trees}"}
      ]
      |> Enum.reject(&elem(&1, 0))
      |> Enum.map(&elem(&1, 1))

    if problems != [], do: IO.puts("RESULT CHECK FAILED: " <> Enum.join(problems, "; "))
  end

  # ---- part 2: memory under two busy traced processes -----------------------------

  defp memory(busy_s) do
    deadline_ms = busy_s * 1000
    parent = self()

    pids =
      for _ <- 1..2 do
        spawn(fn ->
          receive do
            {:go, deadline} -> send(parent, {:busy_done, self(), Busy.spin(deadline)})
          end
        end)
      end

    {:ok, _} =
      ElixirScope.trace({Busy, :step, 1},
        pids: pids,
        events: [:calls, :returns],
        payload: :arity,
        max_events: 1_000_000_000_000,
        max_rate: 1_000_000_000_000,
        max_stored: 1_000_000,
        duration: deadline_ms + 600_000
      )

    pm = ElixirScope.trace_pipeline()

    IO.puts(
      "\n## Memory under two busy traced processes (#{busy_s} s, payload: :arity, " <>
        "max_stored 1_000_000, ring_size default)\n"
    )

    IO.puts(
      "| t s | erlang total | BEAM RSS | stored | evicted | buffer_full | store memory | " <>
        "traced | dropped | in flight |"
    )

    IO.puts("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")

    t0 = System.monotonic_time(:millisecond)
    sample_row(pm, 0)
    deadline = t0 + deadline_ms
    for p <- pids, do: send(p, {:go, deadline})
    sample_loop(pm, t0, t0 + 250, deadline)

    for p <- pids do
      receive do
        {:busy_done, ^p, _} -> :ok
      end
    end

    sample_row(pm, System.monotonic_time(:millisecond) - t0)
    {:ok, summary} = ElixirScope.stop_trace()
    sample_row(pm, System.monotonic_time(:millisecond) - t0, "after stop_trace")

    IO.puts(
      "\nstop summary: reason #{inspect(summary.reason)}, traced #{summary.traced}, " <>
        "dropped (ring full) #{summary.dropped}, offered #{summary.offered}"
    )

    IO.puts("accounting: #{PipelineManager.accounting_line(pm)}")

    IO.puts(
      "\nerlang total: :erlang.memory(:total); BEAM RSS: VmRSS of /proc/self/status; " <>
        "stored / evicted / buffer_full / in flight: the pipeline's accounting; store " <>
        "memory: the store's own count (native, outside erlang total); traced / dropped: " <>
        "trace_status/0 (dropped = refused by a full ring, never blocking the process)."
    )
  end

  defp sample_loop(pm, t0, next_at, deadline) do
    now = System.monotonic_time(:millisecond)

    if now < deadline do
      Process.sleep(max(next_at - now, 0))
      sample_row(pm, System.monotonic_time(:millisecond) - t0)
      sample_loop(pm, t0, next_at + 250, deadline)
    end
  end

  defp sample_row(pm, t_ms, note \\ nil) do
    m = PipelineManager.get_metrics(pm)
    st = ElixirScope.trace_status()
    acc = m.accounting

    t = if note, do: "#{f2(t_ms / 1000)} (#{note})", else: f2(t_ms / 1000)

    IO.puts(
      "| #{t} | #{mib(:erlang.memory(:total))} | #{mib(rss_bytes())} | #{acc.stored} | " <>
        "#{acc.evicted} | #{acc.buffer_full} | #{mib(m.memory_bytes)} | #{st.traced} | " <>
        "#{st.dropped} | #{acc.in_flight} |"
    )
  end

  defp rss_bytes do
    "/proc/self/status"
    |> File.read!()
    |> String.split("\n")
    |> Enum.find_value(0, fn
      "VmRSS:" <> rest ->
        [kb, "kB"] = String.split(rest)
        String.to_integer(kb) * 1024

      _ ->
        nil
    end)
  end

  # ---- formatting ---------------------------------------------------------------

  defp dur(ns) when ns < 1.0e3, do: "#{f1(ns)} ns"
  defp dur(ns) when ns < 1.0e6, do: "#{f1(ns / 1.0e3)} µs"
  defp dur(ns) when ns < 1.0e9, do: "#{f1(ns / 1.0e6)} ms"
  defp dur(ns), do: "#{f2(ns / 1.0e9)} s"

  defp speedup(x) when x >= 10, do: "#{round(x)}×"
  defp speedup(x), do: "#{f2(x)}×"

  defp ms(ns), do: "#{f1(ns / 1.0e6)} ms"
  defp mib(bytes), do: "#{f1(bytes / 1_048_576)} MiB"
  defp f1(x), do: :erlang.float_to_binary(x / 1, decimals: 1)
  defp f2(x), do: :erlang.float_to_binary(x / 1, decimals: 2)

  # ---- main ---------------------------------------------------------------------

  def main do
    parts = System.get_env("ANALYSIS_BENCH_PARTS", "queries,memory") |> String.split(",")
    t0 = System.monotonic_time(:millisecond)

    IO.puts("# ElixirScope analysis bench — #{Harness.machine()}")

    IO.puts(
      "# logical processors #{:erlang.system_info(:logical_processors)}, " <>
        "OTP #{System.otp_release()} (erts #{:erlang.system_info(:version)}), " <>
        "#{DateTime.utc_now() |> DateTime.truncate(:second)}\n"
    )

    if "queries" in parts do
      trace = build_trace(env_int("ANALYSIS_BENCH_EVENTS", 2_000_000))
      queries(trace)
    end

    if "memory" in parts, do: memory(env_int("ANALYSIS_BENCH_BUSY_S", 5))

    IO.puts("\nbench wall time #{f1((System.monotonic_time(:millisecond) - t0) / 1000)} s")
  end
end

unless System.get_env("BENCH_NO_MAIN"), do: AnalysisBench.main()

# EventCorrelator.correlate_batch throughput from Elixir structs, on a
# realistic mix: 8 processes making nested calls and returns (half of the
# returns carry the call's correlation id) and sending each other messages
# that are received later, beside an Elixir baseline measured in the same
# run.
#
# Each sample runs in a fresh worker process that already holds the events
# (delivered and garbage-collected in the harness's untimed setup), as a
# pipeline worker would. Building a 100k-element result list means
# large-heap garbage collections whoever builds it, and they dominate and
# scatter the figures; so the main jobs are run twice: with a natural heap
# (GC included) and, marked "no GC", with a heap preallocated so that the
# timed run does not collect (the correlation work alone). The Elixir
# baseline builds the same result list in both settings. (Timing in the
# harness's own process, whose heap grows with every job's results, made
# even the baseline 3-6x slower and erratic.)
#
# A second section ("id shapes") runs the same trace with the ids (and the
# correlation ids) as integers, as strings like the original's ("id-42-c")
# and as tuples ({:id, 42, :c}), each beside a minimal pure-Elixir
# correlator (bench/baseline/minimal_correlator.ex: a map of per-pid
# stacks and a map of message FIFOs, returning tuples) run on the same
# events in the same way: batches of 1,000 and the whole list in one call.
#
#   mix run bench/correlator_bench.exs        # BENCH_N=100000 BENCH_SAMPLES=15
#   BENCH_SECTION=ids mix run bench/correlator_bench.exs   # only "id shapes"
#   BENCH_SECTION=main ...                                 # only the first
#
Code.require_file("support/harness.exs", __DIR__)
Code.require_file("baseline/minimal_correlator.ex", __DIR__)

defmodule ElixirScope.Bench.Correlator do
  alias ElixirScope.Bench.{Harness, MinimalCorrelator}
  alias ElixirScope.Capture.EventCorrelator
  alias ElixirScope.Capture.EventCorrelator.CorrelatedEvent
  alias ElixirScope.Events.{FunctionExecution, MessageEvent}
  alias ElixirScope.Native

  @procs 8
  @no_gc_jobs [
    "correlate_batch (whole trace, 1 call)",
    "correlate_batch (1,000 per call)",
    "baseline: Enum.map building %CorrelatedEvent{}"
  ]

  @doc """
  A trace of about `n` events that leaves no open call and no unreceived
  message, so it can be correlated again and again in a steady state.
  """
  def trace(n) do
    :rand.seed(:exsss, {7, 11, 13})
    pids = for _ <- 1..@procs, do: spawn(fn -> Process.sleep(:infinity) end)
    st = %{next: 1, stacks: Map.new(pids, &{&1, []}), inbox: Map.new(pids, &{&1, []}), out: []}
    st = Enum.reduce(1..n, st, fn _, st -> step(st, Enum.random(pids), pids) end)
    # Unwind and drain.
    st =
      Enum.reduce(pids, st, fn pid, st ->
        st = Enum.reduce(st.stacks[pid], st, fn _, st -> ret(st, pid) end)
        Enum.reduce(st.inbox[pid], st, fn _, st -> recv(st, pid) end)
      end)

    {Enum.reverse(st.out), pids}
  end

  defp step(st, pid, pids) do
    depth = length(Map.fetch!(st.stacks, pid))
    inbox? = Map.fetch!(st.inbox, pid) != []

    case :rand.uniform(100) do
      r when r <= 35 and depth < 12 -> call(st, pid)
      r when r <= 70 and depth > 0 -> ret(st, pid)
      r when r <= 85 -> send_msg(st, pid, Enum.random(pids))
      _ when inbox? -> recv(st, pid)
      _ when depth > 0 -> ret(st, pid)
      _ -> call(st, pid)
    end
  end

  defp emit(st, ev), do: %{st | next: st.next + 1, out: [ev | st.out]}

  defp call(st, pid) do
    id = st.next

    ev = %FunctionExecution{
      id: id,
      timestamp: id,
      module: MyApp.Worker,
      function: :handle,
      arity: 2,
      args: [id, :x],
      caller_pid: pid,
      correlation_id: id,
      event_type: :call
    }

    st = emit(st, ev)
    %{st | stacks: Map.update!(st.stacks, pid, &[id | &1])}
  end

  defp ret(st, pid) do
    [cid | rest] = st.stacks[pid]
    id = st.next

    ev = %FunctionExecution{
      id: id,
      timestamp: id,
      return_value: :ok,
      duration_ns: 10,
      caller_pid: pid,
      correlation_id: if(rem(id, 2) == 0, do: cid),
      event_type: :return
    }

    st = emit(st, ev)
    %{st | stacks: Map.put(st.stacks, pid, rest)}
  end

  defp send_msg(st, from, to) do
    id = st.next
    msg = {:work, rem(id, 50)}

    ev = %MessageEvent{
      id: id,
      timestamp: id,
      from_pid: from,
      to_pid: to,
      message: msg,
      event_type: :send
    }

    st = emit(st, ev)
    %{st | inbox: Map.update!(st.inbox, to, &(&1 ++ [msg]))}
  end

  defp recv(st, pid) do
    [msg | rest] = st.inbox[pid]
    id = st.next

    ev = %MessageEvent{
      id: id,
      timestamp: id,
      from_pid: nil,
      to_pid: pid,
      message: msg,
      event_type: :receive
    }

    st = emit(st, ev)
    %{st | inbox: Map.put(st.inbox, pid, rest)}
  end

  # Normal schedulers only: 1,000 events per NIF call, chunk results
  # joined in Elixir.
  defp normal_loop(_ref, [], acc), do: acc |> :lists.reverse() |> :lists.append()

  defp normal_loop(ref, events, acc) do
    {chunk, rest} = split(events, 1000, [])

    case Native.corr_batch(ref, chunk) do
      results when is_list(results) -> normal_loop(ref, rest, [results | acc])
      # Out of time slice: the rest of the chunk goes in the next call.
      {results, left} -> normal_loop(ref, left ++ rest, [results | acc])
    end
  end

  defp split(rest, 0, acc), do: {:lists.reverse(acc), rest}
  defp split([], _, acc), do: {:lists.reverse(acc), []}
  defp split([e | rest], k, acc), do: split(rest, k - 1, [e | acc])

  defp event_loop(c, events) do
    Enum.reduce(events, 0, fn e, k ->
      _ = EventCorrelator.correlate_event(c, e)
      k + 1
    end)
  end

  # A worker holding `events`, garbage-collected and waiting for :go. With
  # `heap_words`, its heap is preallocated so the timed run does not GC.
  defp worker(events, fun, heap_words) do
    parent = self()
    opts = if heap_words, do: [:link, min_heap_size: heap_words], else: [:link]

    pid =
      :erlang.spawn_opt(
        fn ->
          receive do
            {:events, evs} ->
              :erlang.garbage_collect()
              send(parent, {:ready, self()})

              receive do
                :go -> send(parent, {:done, self(), fun.(evs)})
              end
          end
        end,
        opts
      )

    send(pid, {:events, events})

    receive do
      {:ready, ^pid} -> pid
    end
  end

  defp go(pid) do
    send(pid, :go)

    receive do
      {:done, ^pid, result} -> result
    end
  end

  def run do
    n = String.to_integer(System.get_env("BENCH_N", "100000"))
    {events, _pids} = trace(n)
    IO.puts("# EventCorrelator bench — #{Harness.machine()}")
    section = System.get_env("BENCH_SECTION", "all")
    if section in ["all", "main"], do: main(events)
    if section in ["all", "ids"], do: id_shapes(events)
  end

  def main(events) do
    n = length(events)

    counts =
      Enum.frequencies_by(
        events,
        &{&1.__struct__ |> Module.split() |> List.last(), &1.event_type}
      )

    IO.puts("n = #{n} events per sample: #{inspect(counts)}")
    IO.puts("each sample runs in a fresh process holding the events (see the header)")

    {:ok, c} = EventCorrelator.start_link()
    {:ok, d} = EventCorrelator.start_link()
    {:ok, e} = EventCorrelator.start_link()
    ref = EventCorrelator.get_state(d).ref

    # Sanity check before timing: every return completes a call and every
    # receive is matched.
    out = EventCorrelator.correlate_batch(c, events)
    true = length(out) == n
    m = EventCorrelator.get_metrics(c)
    0 = m.unmatched_returns
    true = m.matched_receives == m.receives
    0 = m.active_correlations
    IO.puts("sanity: #{m.calls} calls, #{m.returns} returns, #{m.receives} receives all matched")

    # Each job: {name, fun of the worker's events}; the result's length is
    # returned so nothing is optimised away.
    specs = [
      {"correlate_batch (whole trace, 1 call)",
       fn evs -> length(EventCorrelator.correlate_batch(c, evs)) end},
      {"correlate_batch (1,000 per call)",
       fn evs ->
         evs
         |> Enum.chunk_every(1000)
         |> Enum.reduce(0, &(&2 + length(EventCorrelator.correlate_batch(c, &1))))
       end},
      {"normal schedulers only (1,000 per NIF call, joined)",
       fn evs -> length(normal_loop(ref, evs, [])) end},
      {"dirty scheduler only (1 NIF call)",
       fn evs -> length(Native.corr_batch_dirty(ref, evs)) end},
      {"correlate_event (one per call)", fn evs -> event_loop(e, evs) end},
      {"baseline: Enum.map building %CorrelatedEvent{}",
       fn evs ->
         evs
         |> Enum.map(fn ev ->
           %CorrelatedEvent{event: ev, correlation_id: ev.id, correlation_type: :unknown}
         end)
         |> length()
       end}
    ]

    # Room for the events, a 100k-element result list and garbage.
    big_heap = 16 * 1024 * 1024

    jobs =
      for {name, fun} <- specs do
        %{name: name, n: n, setup: fn -> worker(events, fun, nil) end, run: &go/1}
      end ++
        for {name, fun} <- specs, name in @no_gc_jobs do
          %{
            name: "no GC: " <> name,
            n: n,
            setup: fn -> worker(events, fun, big_heap) end,
            run: &go/1
          }
        end

    results = Harness.run(jobs)

    extra = fn name ->
      "#{Harness.fmt(1.0e3 / results[name].median)} M events/s"
    end

    Harness.print_table(
      "EventCorrelator (ns per event)",
      results,
      Enum.map(jobs, & &1.name),
      extra
    )

    b = results["correlate_batch (whole trace, 1 call)"].median
    k = results["correlate_batch (1,000 per call)"].median
    IO.puts("\nTargets (medians):")
    check = fn label, ok? -> IO.puts("  #{if ok?, do: "MET ", else: "MISS"} #{label}") end
    check.("correlate_batch whole trace ≥ 1 M events/s (#{Harness.fmt(1.0e3 / b)})", b <= 1000)
    check.("correlate_batch 1,000 per call ≥ 1 M events/s (#{Harness.fmt(1.0e3 / k)})", k <= 1000)

    m = EventCorrelator.get_metrics(c)

    IO.puts(
      "\ncorrelator after the run: #{inspect(Map.take(m, [:events_correlated, :active_correlations, :metadata_entries, :unmatched_returns, :average_correlation_time_ns]))}"
    )

    Enum.each([c, d, e], &EventCorrelator.stop/1)
  end

  # ---- id shapes ---------------------------------------------------------------

  @kinds [
    int: "integer ids",
    string: ~s[string ids ("id-42-c")],
    tuple: "tuple ids ({:id, 42, :c})"
  ]

  defp reshape(events, :int), do: events
  defp reshape(events, kind), do: Enum.map(events, &reid(&1, kind))

  defp reid(%{correlation_id: c} = ev, kind),
    do: %{ev | id: to_kind(ev.id, kind), correlation_id: to_kind(c, kind)}

  defp reid(ev, kind), do: %{ev | id: to_kind(ev.id, kind)}

  defp to_kind(nil, _), do: nil
  defp to_kind(i, :string), do: "id-#{i}-c"
  defp to_kind(i, :tuple), do: {:id, i, :c}

  # The 1, 5 and 15 minute load averages (other work on the machine skews
  # every figure; report them beside the figures).
  defp load do
    case File.read("/proc/loadavg") do
      {:ok, s} -> s |> String.split() |> Enum.take(3) |> Enum.join(" ")
      _ -> "unknown"
    end
  end

  # The minimal Elixir correlator over the worker's events, its state
  # carried from chunk to chunk.
  defp minimal_chunks(evs, size) do
    evs
    |> Enum.chunk_every(size)
    |> Enum.reduce({MinimalCorrelator.new(), 0}, fn chunk, {st, k} ->
      {out, st} = MinimalCorrelator.correlate(st, chunk)
      {st, k + length(out)}
    end)
    |> elem(1)
  end

  defp ours_chunks(c, evs, size) do
    evs
    |> Enum.chunk_every(size)
    |> Enum.reduce(0, &(&2 + length(EventCorrelator.correlate_batch(c, &1))))
  end

  def id_shapes(events) do
    n = length(events)
    IO.puts("\n# id shapes: the same #{n}-event trace with integer, string and tuple ids")
    IO.puts("each sample runs in a fresh process holding the events (natural heap, GC included)")
    IO.puts("load average at the start: #{load()}")

    per_kind =
      for {kind, _} <- @kinds do
        evs = reshape(events, kind)
        {:ok, c} = EventCorrelator.start_link()
        {:ok, d} = EventCorrelator.start_link()

        # Sanity: our links agree with the minimal correlator's on every
        # event, and the ids come back as given.
        ours = EventCorrelator.correlate_batch(c, evs)
        {theirs, _} = MinimalCorrelator.correlate(MinimalCorrelator.new(), evs)

        for {o, t} <- Enum.zip(ours, theirs) do
          mine =
            if tuple_size(t) == 4,
              do: {o.correlation_type, o.correlation_id, o.parent_id, o.root_id},
              else: {o.correlation_type, o.correlation_id}

          if mine != t do
            raise "#{kind}: native #{inspect(mine)} but minimal #{inspect(t)}"
          end
        end

        jobs = [
          {"#{kind}: correlate_batch (1,000 per call)", fn e -> ours_chunks(c, e, 1000) end},
          {"#{kind}: correlate_batch (whole list, 1 call)",
           fn e -> length(EventCorrelator.correlate_batch(d, e)) end},
          {"#{kind}: minimal Elixir (1,000 per call)", fn e -> minimal_chunks(e, 1000) end},
          {"#{kind}: minimal Elixir (whole list, 1 call)",
           fn e -> length(elem(MinimalCorrelator.correlate(MinimalCorrelator.new(), e), 0)) end}
        ]

        {kind, evs, jobs, [c, d]}
      end

    IO.puts("sanity: native and minimal agree on every event for every id shape")

    jobs =
      for {_kind, evs, specs, _} <- per_kind, {name, fun} <- specs do
        %{name: name, n: n, setup: fn -> worker(evs, fun, nil) end, run: &go/1}
      end

    results = Harness.run(jobs)

    Harness.print_table(
      "id shapes (ns per event)",
      results,
      Enum.map(jobs, & &1.name),
      fn name -> "#{Harness.fmt(1.0e3 / results[name].median)} M events/s" end
    )

    rate = fn name -> Harness.fmt(1.0e3 / results[name].median) end
    med = fn name -> results[name].median end
    ratio = &:erlang.float_to_binary(&1, decimals: 2)

    IO.puts("\n## id shapes: M events/s (medians); ours / minimal Elixir time")
    IO.puts("(load average at the end: #{load()})\n")

    IO.puts(
      "| ids | ours, 1,000/call | minimal, 1,000/call | ratio | ours, 100k list | minimal, 100k list | ratio |"
    )

    IO.puts("|---|---:|---:|---:|---:|---:|---:|")

    checks =
      for {kind, label} <- @kinds do
        a = "#{kind}: correlate_batch (1,000 per call)"
        b = "#{kind}: minimal Elixir (1,000 per call)"
        x = "#{kind}: correlate_batch (whole list, 1 call)"
        y = "#{kind}: minimal Elixir (whole list, 1 call)"
        r1 = med.(a) / med.(b)
        r2 = med.(x) / med.(y)

        IO.puts(
          "| #{label} | #{rate.(a)} | #{rate.(b)} | #{ratio.(r1)}× | #{rate.(x)} | #{rate.(y)} | #{ratio.(r2)}× |"
        )

        {label, med.(a), med.(x), r1, r2}
      end

    IO.puts("\nTargets (medians):")
    check = fn label, ok? -> IO.puts("  #{if ok?, do: "MET ", else: "MISS"} #{label}") end

    for {label, a, x, r1, r2} <- checks do
      check.("#{label}: 1,000/call ≥ 1 M events/s (#{Harness.fmt(1.0e3 / a)})", a <= 1000)
      check.("#{label}: 100k list ≥ 1 M events/s (#{Harness.fmt(1.0e3 / x)})", x <= 1000)
      check.("#{label}: 1,000/call ≤ 1.5× minimal Elixir (#{ratio.(r1)}×)", r1 <= 1.5)
      check.("#{label}: 100k list ≤ 1.5× minimal Elixir (#{ratio.(r2)}×)", r2 <= 1.5)
    end

    for {_, _, _, cs} <- per_kind, c <- cs, do: EventCorrelator.stop(c)
  end
end

ElixirScope.Bench.Correlator.run()

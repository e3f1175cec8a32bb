# Ring buffer and Ingestor write/read costs beside :ets and send/2 baselines,
# measured in the same run.
#
#   mix run bench/ring_bench.exs              # BENCH_N=100000 BENCH_SAMPLES=15
#
# Besides the tail-recursive loops, the write and the ets insert are timed
# in a plain `for` comprehension as a new user would write them (compiled
# in this module, and evaluated by `Code.eval_string` as typed in iex), and
# the Ingestor's call NIF is timed beside the same NIF behind rustler's own
# generated wrapper (how it was called before #15), all in the same run.
Code.require_file("support/harness.exs", __DIR__)

defmodule ElixirScope.Bench.Ring do
  alias ElixirScope.Bench.Harness
  alias ElixirScope.Capture.{Ingestor, RingBuffer}
  alias ElixirScope.Events.FunctionExecution
  alias ElixirScope.Native

  def event do
    %FunctionExecution{
      id: 123,
      timestamp: System.monotonic_time(:nanosecond),
      wall_time: System.system_time(:nanosecond),
      module: MyApp.Worker,
      function: :handle,
      arity: 3,
      args: [1, :two, "three"],
      caller_pid: self(),
      correlation_id: 42,
      event_type: :call
    }
  end

  def write_loop(_buf, _ev, 0), do: :ok

  def write_loop(buf, ev, k) do
    RingBuffer.write(buf, ev)
    write_loop(buf, ev, k - 1)
  end

  def batch_loop(_buf, _list, 0), do: :ok

  def batch_loop(buf, list, k) do
    RingBuffer.write_batch(buf, list)
    batch_loop(buf, list, k - 1)
  end

  def read_loop(_buf, pos, 0), do: pos

  def read_loop(buf, pos, k) do
    {events, pos} = RingBuffer.read_batch(buf, pos, 1000)
    read_loop(buf, pos, k - length(events))
  end

  def ingest_loop(_buf, 0), do: :ok

  def ingest_loop(buf, k) do
    Ingestor.ingest_function_call(buf, MyApp.Worker, :handle, [1, :two, "three"], self(), k)
    ingest_loop(buf, k - 1)
  end

  def native_ingest_loop(_ref, _fun, 0), do: :ok

  def native_ingest_loop(ref, fun, k) do
    fun.(ref, MyApp.Worker, :handle, [1, :two, "three"], self(), k)
    native_ingest_loop(ref, fun, k - 1)
  end

  def comp_write(buf, ev, n), do: for(_ <- 1..n, do: RingBuffer.write(buf, ev))
  def comp_ets(tab, ev, n), do: for(i <- 1..n, do: :ets.insert(tab, {i, ev}))

  def ets_loop(_tab, _ev, 0), do: :ok

  def ets_loop(tab, ev, k) do
    :ets.insert(tab, {k, ev})
    ets_loop(tab, ev, k - 1)
  end

  def send_loop(_pid, _ev, 0), do: :ok

  def send_loop(pid, ev, k) do
    send(pid, ev)
    send_loop(pid, ev, k - 1)
  end

  def drain do
    receive do
      {:sync, from, ref} ->
        send(from, {ref, :synced})
        drain()

      _ ->
        drain()
    end
  end

  def sync(pid) do
    ref = make_ref()
    send(pid, {:sync, self(), ref})

    receive do
      {^ref, :synced} -> :ok
    end
  end

  def run do
    n = String.to_integer(System.get_env("BENCH_N", "100000"))
    ev = event()
    IO.puts("# Ring buffer bench — #{Harness.machine()}, clock: #{Harness.clock()}")

    IO.puts(
      "n = #{n} operations per sample; ns per event; event = %FunctionExecution{} with 3 small args"
    )

    {:ok, wbuf} = RingBuffer.new(size: 65_536, overflow_strategy: :drop_oldest)
    {:ok, rbuf} = RingBuffer.new(size: 262_144, overflow_strategy: :drop_newest)
    tab = :ets.new(:bench, [:ordered_set, :public])
    drainer = spawn_link(&drain/0)
    list = List.duplicate(ev, 1000)
    batches = max(div(n, 1000), 1)

    jobs = [
      %{name: "RingBuffer.write", n: n, run: fn _ -> write_loop(wbuf, ev, n) end},
      %{
        name: "RingBuffer.write_batch (1,000/call)",
        n: batches * 1000,
        run: fn _ -> batch_loop(wbuf, list, batches) end
      },
      %{name: "Ingestor.ingest_function_call", n: n, run: fn _ -> ingest_loop(wbuf, n) end},
      %{
        name: "RingBuffer.read_batch (1,000/call)",
        n: n,
        setup: fn ->
          RingBuffer.clear(rbuf)
          {:ok, _} = RingBuffer.write_batch(rbuf, List.duplicate(ev, n))
          RingBuffer.stats(rbuf).read_position
        end,
        run: fn pos -> read_loop(rbuf, pos, n) end
      },
      %{
        name: "baseline :ets.insert (ordered_set)",
        n: n,
        setup: fn -> :ets.delete_all_objects(tab) end,
        run: fn _ -> ets_loop(tab, ev, n) end
      },
      %{
        name: "Native.ing_function_call (lean NIF entry)",
        n: n,
        run: fn _ -> native_ingest_loop(wbuf.ref, &Native.ing_function_call/6, n) end
      },
      %{
        name: "the same behind rustler's wrapper (before #15)",
        n: n,
        run: fn _ ->
          native_ingest_loop(wbuf.ref, &Native.debug_ing_function_call_wrapped/6, n)
        end
      },
      %{
        name: "for comprehension: RingBuffer.write",
        n: n,
        run: fn _ -> comp_write(wbuf, ev, n) end
      },
      %{
        name: "for comprehension: :ets.insert (ordered_set)",
        n: n,
        setup: fn -> :ets.delete_all_objects(tab) end,
        run: fn _ -> comp_ets(tab, ev, n) end
      },
      %{
        name: "evaluated comprehension: RingBuffer.write",
        n: n,
        run: fn _ ->
          Code.eval_string(
            "for _ <- 1..n, do: RingBuffer.write(buf, ev)",
            [buf: wbuf, ev: ev, n: n],
            __ENV__
          )
        end
      },
      %{
        name: "evaluated comprehension: :ets.insert",
        n: n,
        setup: fn -> :ets.delete_all_objects(tab) end,
        run: fn _ ->
          Code.eval_string(
            "for i <- 1..n, do: :ets.insert(tab, {i, ev})",
            [tab: tab, ev: ev, n: n],
            __ENV__
          )
        end
      },
      %{
        name: "baseline send/2 to a draining process",
        n: n,
        run: fn _ ->
          send_loop(drainer, ev, n)
          sync(drainer)
        end
      }
    ]

    results = Harness.run(jobs)
    ets = results["baseline :ets.insert (ordered_set)"].median
    snd = results["baseline send/2 to a draining process"].median

    extra = fn name ->
      m = results[name].median

      case name do
        "RingBuffer.read_batch" <> _ ->
          "#{Harness.fmt(1.0e3 / m)} M events/s"

        "baseline" <> _ ->
          ""

        "for comprehension: RingBuffer" <> _ ->
          "#{Harness.fmt(m / results["for comprehension: :ets.insert (ordered_set)"].median)}× the comprehension's ets"

        "evaluated comprehension: RingBuffer" <> _ ->
          "#{Harness.fmt(m / results["evaluated comprehension: :ets.insert"].median)}× the evaluated ets"

        "for comprehension" <> _ ->
          ""

        "evaluated" <> _ ->
          ""

        _ ->
          "#{Harness.fmt(m / ets)}× ets, #{Harness.fmt(m / snd)}× send"
      end
    end

    Harness.print_table("Ring buffer (ns per event)", results, Enum.map(jobs, & &1.name), extra)

    check = fn label, ok? -> IO.puts("  #{if ok?, do: "MET ", else: "MISS"} #{label}") end
    w = results["RingBuffer.write"].median
    IO.puts("\nTargets (medians):")
    check.("write ≤ 300 ns (#{Harness.fmt(w)})", w <= 300)
    check.("write ≤ 0.5× ets (#{Harness.fmt(w / ets)}×)", w / ets <= 0.5)
    b = results["RingBuffer.write_batch (1,000/call)"].median
    check.("batch write ≤ 150 ns (#{Harness.fmt(b)})", b <= 150)
    i = results["Ingestor.ingest_function_call"].median
    check.("ingest_function_call ≤ 180 ns (#{Harness.fmt(i)})", i <= 180)
    cw = results["for comprehension: RingBuffer.write"].median
    ce = results["for comprehension: :ets.insert (ordered_set)"].median
    check.("write ≤ 0.45× ets in a for comprehension (#{Harness.fmt(cw / ce)}×)", cw / ce <= 0.45)
    lean = results["Native.ing_function_call (lean NIF entry)"].median
    wrapped = results["the same behind rustler's wrapper (before #15)"].median

    IO.puts(
      "  lean NIF entry vs rustler's wrapper: #{Harness.fmt(lean)} vs #{Harness.fmt(wrapped)} ns"
    )

    r = results["RingBuffer.read_batch (1,000/call)"].median
    check.("read_batch ≥ 3 M events/s (#{Harness.fmt(1.0e3 / r)})", 1.0e3 / r >= 3.0)
    stats = RingBuffer.stats(wbuf)

    IO.puts(
      "\nwrite ring after the run: #{inspect(Map.take(stats, [:total_writes, :dropped_events, :truncated_events]))}"
    )
  end
end

ElixirScope.Bench.Ring.run()

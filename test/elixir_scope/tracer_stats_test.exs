defmodule ElixirScope.TracerStatsTest.Target do
  @moduledoc false
  # Traced code with known call counts.

  def fib(0), do: 0
  def fib(1), do: 1
  def fib(n), do: fib(n - 1) + fib(n - 2)

  def outer(x), do: middle(x) + 1
  def middle(x), do: inner(x) * 2
  def inner(x), do: :lists.sum(:lists.seq(1, x))
end

defmodule ElixirScope.TracerStatsTest do
  # Stats sessions (mode: :stats / :counts): the VM's call counters behind
  # ElixirScope.trace/2 and Analysis.call_stat/1. Counts are exact; times
  # are only checked to be there (no timing assertions).
  use ExUnit.Case, async: false

  alias ElixirScope.Analysis
  alias ElixirScope.TracerStatsTest.Target

  @fib {Target, :fib, 1}

  setup do
    on_exit(fn -> ElixirScope.stop_trace() end)
    :ok
  end

  # fib(n) makes this many calls of fib/1.
  defp fib_calls(n) when n < 2, do: 1
  defp fib_calls(n), do: 1 + fib_calls(n - 1) + fib_calls(n - 2)

  # Runs `fun` in a fresh process (waiting for :go) and returns its pid
  # once it finished.
  defp worker(fun) do
    test = self()
    pid = spawn(fn -> receive(do: (:go -> send(test, {:done, self(), fun.()}))) end)
    {pid, fn -> run(pid) end}
  end

  defp run(pid) do
    send(pid, :go)
    receive(do: ({:done, ^pid, r} -> r))
  end

  defp by_key(stats), do: Map.new(stats, &{&1.key, &1})

  test "mode: :stats counts every call of the traced processes, exactly, with own times" do
    {pid, go} =
      worker(fn ->
        Target.fib(15)
        for _ <- 1..50, do: Target.outer(200)
      end)

    {other, go_other} = worker(fn -> Target.fib(10) end)

    assert {:ok, info} = ElixirScope.trace(Target, mode: :stats, pids: [pid])
    assert info.mode == :stats
    assert info.functions >= 4
    go.()
    go_other.()

    # Read live while the session runs.
    live = by_key(Analysis.call_stat())
    assert live[@fib].count == fib_calls(15)
    assert %{state: :tracing, mode: :stats, calls: calls} = ElixirScope.trace_status()
    assert calls == fib_calls(15) + 150

    assert {:ok, summary} = ElixirScope.stop_trace()
    assert summary.state == :stopped and summary.reason == :stopped
    assert summary.calls == fib_calls(15) + 150
    assert summary.rows_dropped == 0
    assert {:error, :not_tracing} = ElixirScope.stop_trace()

    stats = by_key(Analysis.call_stat())
    assert stats[@fib].count == fib_calls(15)

    for f <- [:outer, :middle, :inner] do
      row = stats[{Target, f, 1}]
      assert row.count == 50
      assert is_integer(row.own_ns) and row.own_ns >= 0
      assert row.acc_ns == nil
    end

    # Sorted by own time, largest first.
    owns = Enum.map(Analysis.call_stat(), & &1.own_ns)
    assert owns == Enum.sort(owns, :desc)

    # Per process: only the traced one counted (the other ran fib(10)).
    assert [%{key: ^pid, count: n}] = Analysis.call_stat(by: :process)
    assert n == fib_calls(15) + 150
    refute Enum.any?(Analysis.call_stat(by: :process), &(&1.key == other))

    pf = by_key(Analysis.call_stat(by: :process_function))
    assert pf[{pid, @fib}].count == fib_calls(15)

    assert [%{key: Target, count: m}] = Analysis.call_stat(by: :module)
    assert m == fib_calls(15) + 150

    assert Analysis.call_stat(modules: [String]) == []
    assert length(Analysis.call_stat(modules: [Target])) == 4

    # Nothing left behind: no counters, no trace flags.
    assert :erlang.trace_info(@fib, :call_time) == {:call_time, false}
    assert :erlang.trace_info(pid, :flags) in [{:flags, []}, :undefined]
  end

  test "pids: :all counts the calls of processes started after the session" do
    assert {:ok, _} = ElixirScope.trace(@fib, mode: :stats)
    {_pid, go} = worker(fn -> Target.fib(12) end)
    go.()
    {_pid, go} = worker(fn -> Target.fib(8) end)
    go.()
    {:ok, summary} = ElixirScope.stop_trace()
    assert summary.calls == fib_calls(12) + fib_calls(8)
    assert [%{key: @fib, count: n}] = Analysis.call_stat()
    assert n == fib_calls(12) + fib_calls(8)
    assert length(Analysis.call_stat(by: :process)) == 2
  end

  test "mode: :counts counts every process's calls of a function (call_count)" do
    assert {:ok, %{mode: :counts, flags: []}} = ElixirScope.trace(Target, mode: :counts)
    {_pid, go} = worker(fn -> Target.fib(11) end)
    go.()
    Target.fib(9)
    {:ok, summary} = ElixirScope.stop_trace()
    assert summary.mode == :counts
    assert summary.calls == fib_calls(11) + fib_calls(9)

    assert [%{key: @fib, count: n, own_ns: nil, acc_ns: nil}] = Analysis.call_stat()
    assert n == fib_calls(11) + fib_calls(9)
    assert [%{key: Target, count: ^n}] = Analysis.call_stat(by: :module)

    assert_raise ArgumentError, ~r/needs per-process counters/, fn ->
      Analysis.call_stat(by: :process)
    end

    assert :erlang.trace_info(@fib, :call_count) == {:call_count, false}
  end

  test "max_rows bounds the per-process rows; the per-function totals stay exact" do
    {a, go_a} = worker(fn -> Target.fib(7) end)
    {b, go_b} = worker(fn -> Target.fib(6) end)
    assert {:ok, _} = ElixirScope.trace(@fib, mode: :stats, pids: [a, b], max_rows: 1)
    go_a.()
    go_b.()
    {:ok, summary} = ElixirScope.stop_trace()
    assert summary.rows == 1 and summary.rows_dropped == 1
    assert [%{count: n}] = Analysis.call_stat()
    assert n == fib_calls(7) + fib_calls(6)
    assert [%{count: c}] = Analysis.call_stat(by: :process)
    assert c in [fib_calls(7), fib_calls(6)]
  end

  test "duration stops the session and keeps what it counted" do
    # A loaded machine may pass the duration before fib/1 runs: retry
    # with a longer one (no timing is asserted).
    assert Enum.any?([100, 1_000, 10_000], &duration_run/1)
  end

  defp duration_run(ms) do
    assert {:ok, _} = ElixirScope.trace(@fib, mode: :stats, duration: ms)
    Target.fib(5)

    if ElixirScope.trace_status().state == :tracing do
      wait_stopped(ms + 30_000)
      st = ElixirScope.trace_status()
      assert st.reason == :duration
      assert st.calls == fib_calls(5)
      # Counting stopped with the session.
      Target.fib(5)
      assert [%{count: n}] = Analysis.call_stat()
      assert n == fib_calls(5)
      assert :erlang.trace_info(@fib, :call_time) == {:call_time, false}
      true
    else
      false
    end
  end

  defp wait_stopped(ms) when ms <= 0, do: flunk("the stats session did not stop")

  defp wait_stopped(ms) do
    if ElixirScope.trace_status().state == :stopped do
      :ok
    else
      Process.sleep(10)
      wait_stopped(ms - 10)
    end
  end

  test "one session at a time, and an events trace after a stats session reads its store" do
    assert {:ok, _} = ElixirScope.trace(@fib, mode: :stats)
    assert {:error, :already_tracing} = ElixirScope.trace(@fib, pids: :all)
    assert {:error, :already_tracing} = ElixirScope.trace(@fib, mode: :counts)
    assert ElixirScope.flush_trace(100) == :ok
    assert ElixirScope.trace_store() == nil
    assert ElixirScope.trace_pipeline() == nil
    {:ok, _} = ElixirScope.stop_trace()

    {pid, go} = worker(fn -> Target.fib(6) end)
    assert {:ok, _} = ElixirScope.trace(@fib, pids: [pid], events: [:calls, :returns])
    go.()
    {:ok, _} = ElixirScope.stop_trace()
    assert [%{key: @fib, count: n, acc_ns: acc}] = Analysis.call_stat()
    assert n == fib_calls(6)
    assert is_integer(acc)
  end

  test "options that make no sense in a stats session raise ArgumentError" do
    for opt <- [
          payload: :full,
          max_events: 10,
          max_rate: 10,
          events: [:calls],
          ring_size: 1024,
          max_stored: 10,
          state: false,
          pipeline: :p,
          max_payload_bytes: 128
        ] do
      assert_raise ArgumentError, ~r/make no sense in mode: :stats/, fn ->
        ElixirScope.trace(@fib, [{:mode, :stats}, opt])
      end
    end

    assert_raise ArgumentError, ~r/nodes: is not supported/, fn ->
      ElixirScope.trace(@fib, mode: :stats, nodes: [node()])
    end

    assert_raise ArgumentError, ~r/mode must be/, fn -> ElixirScope.trace(@fib, mode: :bogus) end
    assert_raise ArgumentError, ~r/unknown/, fn -> ElixirScope.trace(@fib, mode: :stats, x: 1) end

    assert_raise ArgumentError, ~r/pids must be :all/, fn ->
      ElixirScope.trace(@fib, mode: :counts, pids: [self()])
    end

    for {k, v} <- [duration: 0, duration: :x, max_rows: -1, pids: :nope, pids: [:x]] do
      assert_raise ArgumentError, fn -> ElixirScope.trace(@fib, [{:mode, :stats}, {k, v}]) end
    end

    assert_raise ArgumentError, fn -> ElixirScope.trace(42, mode: :stats) end

    assert {:error, {:unknown_module, :no_such_mod}} =
             ElixirScope.trace(:no_such_mod, mode: :stats)

    assert ElixirScope.trace_status().state in [:idle, :stopped]
  end

  test "sample: below 1 keeps counts exact (call_count) and times call_time's windows" do
    {pid, go} =
      worker(fn ->
        # ~200 ms of calls: many 10 ms windows.
        deadline = System.monotonic_time(:millisecond) + 200

        Stream.repeatedly(fn -> Target.outer(300) end)
        |> Enum.take_while(fn _ -> System.monotonic_time(:millisecond) < deadline end)
        |> length()
      end)

    assert {:ok, info} = ElixirScope.trace(Target, mode: :stats, sample: 0.1)
    assert info.mode == :stats
    loops = go.()
    assert is_pid(pid) and loops > 0

    live = by_key(Analysis.call_stat())
    assert live[{Target, :outer, 1}].count >= loops

    assert {:ok, summary} = ElixirScope.stop_trace()
    assert summary.options.sample == 0.1
    # take_while calls outer/1 once more than it keeps.
    stats = by_key(Analysis.call_stat())
    n = stats[{Target, :outer, 1}].count
    assert n in [loops, loops + 1]

    for f <- [:middle, :inner] do
      assert stats[{Target, f, 1}].count == n
    end

    # The windows timed some of the calls, not all of them.
    assert summary.sampled_calls > 0 and summary.sampled_calls < summary.calls
    assert summary.calls == 3 * n

    for f <- [:outer, :middle, :inner] do
      assert is_integer(stats[{Target, f, 1}].own_ns) and stats[{Target, f, 1}].own_ns > 0
    end

    # Per-process rows: the worker's, scaled to the exact counts.
    [row] =
      for r <- Analysis.call_stat(by: :process_function),
          r.key == {pid, {Target, :inner, 1}},
          do: r

    assert row.count > 0 and row.count <= n

    # Nothing is left on.
    assert {:call_count, false} = :erlang.trace_info({Target, :inner, 1}, :call_count)
    assert {:call_time, false} = :erlang.trace_info({Target, :inner, 1}, :call_time)
  end

  test "sample: needs mode: :stats with pids: :all and a fraction in (0, 1]" do
    assert_raise ArgumentError, ~r/needs mode: :stats and pids: :all/, fn ->
      ElixirScope.trace(@fib, mode: :stats, sample: 0.5, pids: [self()])
    end

    assert_raise ArgumentError, ~r/needs mode: :stats and pids: :all/, fn ->
      ElixirScope.trace(@fib, mode: :counts, sample: 0.5)
    end

    for v <- [0, -0.1, 1.5, :x] do
      assert_raise ArgumentError, ~r/sample must be/, fn ->
        ElixirScope.trace(@fib, mode: :stats, sample: v)
      end
    end

    assert ElixirScope.trace_status().state in [:idle, :stopped]
  end
end

defmodule ElixirScope.ExUnitTest.Counter do
  @moduledoc false
  use GenServer

  def start_link(n \\ 0), do: GenServer.start_link(__MODULE__, n)
  def add(pid, k), do: GenServer.call(pid, {:add, k})
  def reset(pid), do: GenServer.cast(pid, :reset)

  @impl true
  def init(n), do: {:ok, %{n: n}}

  @impl true
  def handle_call({:add, k}, _from, s), do: {:reply, bump(s.n, k), %{s | n: bump(s.n, k)}}

  @impl true
  def handle_cast(:reset, s), do: {:noreply, %{s | n: 0}}

  def bump(n, k), do: n + k
end

defmodule ElixirScope.ExUnitTest.Isolation do
  @moduledoc false
  # Shared by the two async modules below: blocks traced at the same time
  # each see only their own processes.
  import ExUnit.Assertions
  import ElixirScope.ExUnit

  alias ElixirScope.Analysis
  alias ElixirScope.ExUnitTest.Counter

  def run(ops) do
    me = self()

    {{counter, n}, trace} =
      trace_block(Counter, fn ->
        {:ok, c} = Counter.start_link()
        n = Enum.reduce(1..ops, 0, fn k, _ -> Counter.add(c, k) end)
        {c, n}
      end)

    assert n == div(ops * (ops + 1), 2)
    pids = Analysis.select(store: trace.store) |> Enum.map(& &1.pid) |> Enum.uniq()
    assert Enum.sort(pids) == Enum.sort([me, counter])
    assert_called(trace, {Counter, :add, 2}, times: ops)
    assert_called(trace, {Counter, :handle_call, [{:add, _}, _, _]}, times: ops)
    assert_state(trace, counter, %{n: ^n})
    assert trace.summary.dropped == 0
    GenServer.stop(counter)
    trace
  end

  def run_parallel(k, ops) do
    traces =
      1..k
      |> Task.async_stream(fn _ -> run(ops) end, max_concurrency: k, timeout: 60_000)
      |> Enum.map(fn {:ok, t} -> t end)

    # They really ran at the same time: some blocks overlap.
    overlaps =
      for a <- traces,
          b <- traces,
          a != b,
          a.started_at < b.stopped_at and b.started_at < a.stopped_at,
          do: 1

    assert overlaps != []
    traces
  end
end

defmodule ElixirScope.ExUnitTest.AsyncA do
  use ElixirScope.Case, async: true

  alias ElixirScope.ExUnitTest.Isolation

  test "blocks in this async module see only their processes" do
    for _ <- 1..5, do: Isolation.run(40)
  end

  test "four blocks at once, each with its own store" do
    traces = Isolation.run_parallel(4, 25)
    assert traces |> Enum.map(& &1.store) |> Enum.uniq() |> length() == 4
  end
end

defmodule ElixirScope.ExUnitTest.AsyncB do
  use ElixirScope.Case, async: true

  alias ElixirScope.ExUnitTest.Isolation

  test "blocks in this other async module see only their processes" do
    for _ <- 1..5, do: Isolation.run(30)
  end

  test "four more blocks at once" do
    Isolation.run_parallel(4, 20)
  end
end

defmodule ElixirScope.ExUnitTest do
  use ElixirScope.Case, async: true

  alias ElixirScope.Analysis
  alias ElixirScope.ExUnitTest.Counter

  setup do
    {:ok, counter} = Counter.start_link(10)
    %{counter: counter}
  end

  describe "passing assertions" do
    test "calls, messages, states and call trees", %{counter: c} do
      me = self()

      {16, trace} =
        trace_block(
          Counter,
          fn ->
            Counter.add(c, 1)
            Counter.add(c, 2)
            Counter.reset(c)
            Counter.add(c, 16)
          end,
          pids: [c]
        )

      assert_called(trace, {Counter, :add, 2})
      assert_called(trace, {Counter, :add, 2}, times: 3)
      assert_called(trace, {Counter, :add, 2}, at_least: 2, at_most: 3)
      assert_called(trace, {Counter, :add, [^c, k]} when k > 10, times: 1)
      assert_called(trace, {Counter, :handle_call, [{:add, 2}, _from, %{n: 11}]})
      assert_called(trace, {Counter, :handle_cast, :_}, times: 1)
      mfa = {Counter, :bump, 2}
      assert assert_called(trace, mfa) == 6
      refute_called(trace, {Counter, :init, :_})
      refute_called(trace, {Counter, :add, [_, 99]})

      assert_message(trace, me, c, {:"$gen_call", {^me, _}, {:add, 16}})
      assert_message(trace, me, :_, {:"$gen_cast", :reset})
      assert_message(trace, c, :_, {_, 16})

      assert_state(trace, c, %{n: 16})
      # The snapshot taken when the block started, and the state at a call.
      st = assert_state(trace, c, %{n: 10}, at: trace.started_at + 1)
      assert st.kind == :snapshot
      [second | _] = Analysis.select(types: [:call], function: :add, store: trace.store) |> tl()
      assert_state(trace, c, %{n: 11}, at: second)

      tree =
        assert_call_tree(trace, {Counter, :handle_call, 3}, [
          {Counter, :bump, 2},
          {{Counter, :bump, 2}, []}
        ])

      assert tree.call.function == :handle_call
      assert_call_tree(trace, {Counter, :add, :_}, [])
    end

    test "processes spawned in the block are traced; the block's errors go on" do
      {_, trace} =
        trace_block(Counter, fn ->
          {:ok, c} = Counter.start_link(1)
          Counter.add(c, 1)
          GenServer.stop(c)
        end)

      [init] = Analysis.select(types: [:return], function: :init, store: trace.store)
      assert_state(trace, init.pid, %{n: 2})

      assert_raise RuntimeError, "inside", fn ->
        trace_block(Counter, fn -> raise "inside" end)
      end

      # The process is free again for the next block.
      assert {:ok, _} =
               trace_block(Counter, fn -> {:ok, :again} end) |> elem(0) |> then(&{:ok, &1})
    end

    test "a block cannot start on a dead pid or with bad options" do
      dead = spawn(fn -> :ok end)
      ref = Process.monitor(dead)
      assert_receive {:DOWN, ^ref, _, _, _}

      assert_raise ArgumentError, ~r/dead_pid/, fn ->
        trace_block(Counter, fn -> :ok end, pids: [dead])
      end

      assert_raise ArgumentError, fn -> trace_block(Counter, fn -> :ok end, bogus: 1) end
      assert_raise ArgumentError, fn -> trace_block(Counter, :not_a_fun) end
      assert_raise ArgumentError, fn -> assert_called(:not_a_trace, {Counter, :add, 2}) end
      assert_raise ArgumentError, fn -> assert_state(%{}, self(), _) end
    end
  end

  describe "failing assertions print what happened" do
    setup %{counter: c} do
      {_, trace} =
        trace_block(
          Counter,
          fn ->
            Counter.add(c, 1)
            Counter.add(c, 2)
          end,
          pids: [c]
        )

      %{trace: trace}
    end

    test "assert_called: the recorded calls and the call trees", %{trace: trace} do
      e =
        assert_raise ExUnit.AssertionError, fn ->
          assert_called(trace, {Counter, :add, [_, 5]})
        end

      assert e.message =~
               "expected at least 1 call(s) of Counter.add(_, 5), got 0 matching call(s) (2 of"

      assert e.message =~ "recorded calls:"
      assert e.message =~ "ElixirScope.ExUnitTest.Counter.add/2(#PID<"
      assert e.message =~ "call trees:"
      assert e.message =~ "→ 1"

      e =
        assert_raise ExUnit.AssertionError, fn ->
          assert_called(trace, {Counter, :add, 2}, times: 3)
        end

      assert e.message =~ "expected exactly 3 call(s) of Counter.add/2, got 2"

      e =
        assert_raise ExUnit.AssertionError, fn ->
          refute_called(trace, {Counter, :handle_call, 3})
        end

      assert e.message =~ "expected no call of Counter.handle_call/3, got 2"
      assert e.message =~ "handle_call/3({:add, 1}"
    end

    test "assert_message: the message flow", %{trace: trace, counter: c} do
      e =
        assert_raise ExUnit.AssertionError, fn ->
          assert_message(trace, self(), c, {:"$gen_call", _, {:add, 7}})
        end

      assert e.message =~ "expected a message {:\"$gen_call\", _, {:add, 7}} from #PID<"
      assert e.message =~ "none was recorded"
      assert e.message =~ "message flow (2 messages of those processes):"
      assert e.message =~ "{:add, 1}"
    end

    test "assert_state: the state history as diffs", %{trace: trace, counter: c} do
      e = assert_raise ExUnit.AssertionError, fn -> assert_state(trace, c, %{n: 99}) end
      assert e.message =~ "expected the state of #PID<"
      assert e.message =~ "to match %{n: 99}, it was:"
      assert e.message =~ "%{n: 13}"
      assert e.message =~ "state history:"
      assert e.message =~ "~ .n 10 → 11"
      assert e.message =~ "~ .n 11 → 13"

      e = assert_raise ExUnit.AssertionError, fn -> assert_state(trace, self(), %{}) end
      assert e.message =~ "but there is none (no_state)"
    end

    test "assert_call_tree: the recorded tree", %{trace: trace} do
      e =
        assert_raise ExUnit.AssertionError, fn ->
          assert_call_tree(trace, {Counter, :handle_call, 3}, [{Counter, :init, 1}])
        end

      assert e.message =~
               "expected a call of ElixirScope.ExUnitTest.Counter.handle_call/3 with the tree"

      assert e.message =~ "ElixirScope.ExUnitTest.Counter.init/1"
      assert e.message =~ "recorded (2 call(s); the first):"
      assert e.message =~ "ElixirScope.ExUnitTest.Counter.bump/2(10, 1) → 11"

      e =
        assert_raise ExUnit.AssertionError, fn ->
          assert_call_tree(trace, {Counter, :reset, 1}, [])
        end

      assert e.message =~ "(no call of ElixirScope.ExUnitTest.Counter.reset/1 recorded)"
    end
  end
end

defmodule ElixirScope.TracerTest.Target do
  @moduledoc false
  # Traced code with known ground truth.

  def fib(0), do: 0
  def fib(1), do: 1
  def fib(n), do: fib(n - 1) + fib(n - 2)

  def outer(x), do: middle(x) + 1
  def middle(x), do: inner(x) * 2
  def inner(x) when x >= 0, do: x + 1
  def inner(x), do: raise(ArgumentError, "negative: #{x}")

  def ping(to, msg) do
    send(to, {:ping, self(), msg})
    :sent
  end

  def loop(0), do: :done
  def loop(n), do: loop(n - 1)

  def spawn_child do
    parent = self()
    pid = spawn_link(fn -> send(parent, {:child, self()}) end)

    receive do
      {:child, ^pid} -> pid
    end
  end
end

defmodule ElixirScope.TracerTest do
  use ExUnit.Case, async: false

  alias ElixirScope.Analysis
  alias ElixirScope.Analysis.Entry
  alias ElixirScope.Capture.PipelineManager
  alias ElixirScope.TracerTest.Target

  setup do
    on_exit(fn -> ElixirScope.stop_trace() end)
    :ok
  end

  # Runs `fun` in a fresh process, traced with `opts`; stops the trace and
  # returns {worker_pid, result, stop_summary}.
  defp traced(targets, opts, fun) do
    test = self()
    worker = spawn(fn -> receive(do: (:go -> send(test, {:result, self(), fun.()}))) end)
    {:ok, _} = ElixirScope.trace(targets, Keyword.put_new(opts, :pids, [worker]))
    send(worker, :go)
    result = receive(do: ({:result, ^worker, r} -> r))

    # A trace a limit stopped is no longer running: its status is the summary.
    summary =
      case ElixirScope.stop_trace() do
        {:ok, summary} -> summary
        {:error, :not_tracing} -> ElixirScope.trace_status()
      end

    {worker, result, summary}
  end

  defp run_shed_workload do
    Target.loop(2000)

    try do
      Target.outer(-1)
    rescue
      ArgumentError -> :caught
    end
  end

  # {fun, arg} trees of a call tree (return values checked separately).
  defp shape(%{call: c, children: kids}) do
    {c.function, c.data, for(%{call: _} = k <- kids, do: shape(k))}
  end

  defp fib_shape(n) when n < 2, do: {:fib, [n], []}
  defp fib_shape(n), do: {:fib, [n], [fib_shape(n - 1), fib_shape(n - 2)]}

  defp fib_calls(n) when n < 2, do: 1
  defp fib_calls(n), do: 1 + fib_calls(n - 1) + fib_calls(n - 2)

  describe "call trees" do
    test "a recursive computation gives the exact tree, values and counts" do
      {pid, 8, summary} = traced(Target, [events: [:calls, :returns]], fn -> Target.fib(6) end)
      n = fib_calls(6)
      assert summary.traced == 2 * n
      assert summary.dropped == 0 and summary.reason == :stopped

      calls = Analysis.select(types: [:call], pid: pid)
      assert length(calls) == n
      [root | _] = calls
      assert %Entry{module: Target, function: :fib, arity: 1, data: [6], parent_id: nil} = root

      tree = Analysis.call_tree(root)
      assert shape(tree) == fib_shape(6)
      assert tree.result.type == :return and tree.result.data == 8
      assert tree.result.duration_ns > 0
      # Every node's result is its fib value.
      check = fn check, %{call: %{data: [k]}, result: r, children: kids} ->
        assert r.data == Target.fib(k)
        Enum.each(kids, &check.(check, &1))
      end

      check.(check, tree)

      # A nested call's range is its subtree; returns point at their calls.
      [_, second | _] = calls
      assert second.data == [5] and second.parent_id == root.id
      range = Analysis.range(second)
      assert length(range) == 2 * fib_calls(5)
      assert Enum.all?(range, &(&1.type in [:call, :return]))

      [%{key: {Target, :fib, 1}, count: ^n} = stat] = Analysis.call_stat()
      assert stat.acc_ns == tree.result.duration_ns
      assert stat.own_ns <= stat.acc_ns

      top = Analysis.top_call_trees(min_size: 3)
      # fib(2) (3 calls) repeats 5 times inside fib(6), fib(3) 3 times...
      assert Enum.any?(top, &(&1.count == 5 and &1.size == 3))
      assert Enum.any?(top, &(&1.count == 3 and &1.size == 5))
    end

    test "payload: :arity records arities, not values" do
      {_pid, 2, _} =
        traced(Target, [events: [:calls, :returns], payload: :arity], fn -> Target.fib(3) end)

      [root | _] = Analysis.select(types: [:call])
      assert root.data == nil and root.arity == 1
      tree = Analysis.call_tree(root)
      assert tree.result.data == nil
      assert length(tree.children) == 2
    end

    test "prev and next, per process and in time" do
      {pid, 3, _} = traced(Target, [events: [:calls, :returns]], fn -> Target.outer(0) end)
      [a, b, c, rc, rb, ra] = Analysis.select(pid: pid)
      assert {a.function, b.function, c.function} == {:outer, :middle, :inner}
      assert {rc.type, rb.type, ra.type} == {:return, :return, :return}
      assert Analysis.next(a).id == b.id
      assert Analysis.next(rc, scope: :global).id == rb.id
      assert Analysis.prev(b).id == a.id
      assert Analysis.prev(a) == nil and Analysis.next(ra) == nil
      assert Analysis.get(b.id) == b
      # A time window walks the time index, in timestamp order.
      assert Analysis.select(from: b.timestamp, to: rc.timestamp) == [b, c, rc]
      assert Analysis.select(from: b.timestamp, types: [:return]) == [rc, rb, ra]
      assert Analysis.select(to: a.timestamp, pid: pid) == [a]
    end
  end

  describe "crashes" do
    test "the traceback at an exception is the call stack, innermost first" do
      {pid, :caught, _} =
        traced(Target, [events: [:calls, :returns]], fn ->
          try do
            Target.outer(-1)
          rescue
            ArgumentError -> :caught
          end
        end)

      [first | _] = exceptions = Analysis.select(types: [:exception], pid: pid)
      # Every frame the exception went through reports it.
      assert Enum.map(exceptions, & &1.function) == [:inner, :middle, :outer]
      assert {:error, %ArgumentError{message: "negative: -1"}} = first.data

      assert [:inner, :middle, :outer] ==
               Enum.map(Analysis.traceback(first), & &1.function)

      tree = Analysis.call_tree(List.last(exceptions))
      assert tree.result.type == :exception

      assert [%{call: %{function: :middle}, children: [%{call: %{function: :inner}}]}] =
               tree.children
    end
  end

  describe "messages and processes" do
    test "a send is linked to its receive and to the call it came from" do
      receiver = spawn(fn -> receive(do: (m -> m)) end)

      {sender, :sent, _} =
        traced(Target, [pids: :all, events: [:calls, :returns, :messages]], fn ->
          # The VM may emit the receive event in the receiver, after the send
          # returned: wait until it has the message before the trace stops.
          ref = Process.monitor(receiver)
          sent = Target.ping(receiver, :hello)
          receive(do: ({:DOWN, ^ref, _, _, _} -> sent))
        end)

      flows = Analysis.messages(pid: sender)
      flow = Enum.find(flows, &match?({:ping, _, :hello}, &1.message))
      assert flow.from == sender and flow.to == receiver
      assert flow.in_call == {Target, :ping, 2}
      assert %Entry{type: :receive, pid: ^receiver} = flow.receive
      assert flow.receive.link_id == flow.send.id
    end

    test "spawns, links and exits are recorded" do
      {parent, child, _} =
        traced(Target, [events: [:calls, :returns, :procs]], fn ->
          Target.spawn_child()
        end)

      Process.sleep(20)
      spawns = Analysis.select(types: [:spawn])
      assert Enum.any?(spawns, &(&1.pid == child and &1.peer == parent))
      assert Enum.any?(Analysis.select(types: [:link], pid: parent), &(&1.peer == child))
    end
  end

  describe "limits" do
    test "max_events stops at exactly the limit and keeps the reason" do
      {_pid, :done, summary} =
        traced(Target, [events: [:calls], max_events: 100], fn -> Target.loop(1000) end)

      assert summary.reason == :max_events
      assert summary.traced == 100
      assert summary.over_limit >= 1
      assert length(Analysis.select()) == 100
      assert ElixirScope.trace_status().reason == :max_events
    end

    test "max_rate stops a burst" do
      {_pid, :done, summary} =
        traced(Target, [events: [:calls], max_rate: 1000], fn -> Target.loop(50_000) end)

      assert summary.reason == :max_rate
      assert summary.traced <= 1000 + 64
      assert summary.traced >= 1000
    end

    test "duration stops an idle trace by itself and switches the VM's tracing off" do
      worker = spawn(fn -> receive(do: (:never -> :ok)) end)
      {:ok, _} = ElixirScope.trace(Target, pids: [worker], duration: 30)
      assert {:flags, [_ | _]} = :erlang.trace_info(worker, :flags)
      Process.sleep(80)
      st = ElixirScope.trace_status()
      assert st.state == :stopped and st.reason == :duration
      assert {:flags, []} = :erlang.trace_info(worker, :flags)
      assert ElixirScope.stop_trace() == {:error, :not_tracing}
    end

    test "a full ring drops and counts, never blocks, and the counters add up" do
      {_pid, :done, s} =
        traced(Target, [events: [:calls, :returns], ring_size: 64], fn -> Target.loop(20_000) end)

      assert s.offered == 2 * 20_001
      assert s.traced + s.dropped + s.over_limit == s.offered
      assert s.dropped > 0

      m = PipelineManager.get_metrics(ElixirScope.trace_pipeline())
      assert m.accounting.accepted == s.traced
      assert m.accounting.unaccounted == 0
      assert length(Analysis.select(limit: 1_000_000)) == s.traced
    end

    test "the trace honours its pipeline's load shedding; exceptions are never shed" do
      test = self()

      worker =
        spawn(fn -> receive(do: (:go -> send(test, {:result, self(), run_shed_workload()}))) end)

      {:ok, _} = ElixirScope.trace(Target, pids: [worker], events: [:calls, :returns])
      pipe = PipelineManager.handles(ElixirScope.trace_pipeline()).pipe
      :ok = ElixirScope.Native.pipe_configure(pipe, :shed_keep_one_in, 4)
      send(worker, :go)
      assert_receive {:result, ^worker, :caught}, 5000
      {:ok, s} = ElixirScope.stop_trace()

      assert s.shed > 0
      assert s.offered == s.traced + s.dropped + s.over_limit + s.shed
      # The three exception frames of outer(-1) all survive the sampling.
      assert length(Analysis.select(types: [:exception])) == 3
      m = PipelineManager.get_metrics(ElixirScope.trace_pipeline())
      assert m.shedding.sampled == s.shed and m.accounting.accepted == s.traced
    end

    test "everything captured before stop_trace/0 is kept and queryable" do
      {_pid, :done, s} =
        traced(Target, [events: [:calls, :returns]], fn -> Target.loop(30_000) end)

      assert s.traced == 2 * 30_001 and s.dropped == 0
      assert length(Analysis.select(limit: 1_000_000)) == s.traced
    end
  end

  describe "sessions and bad input" do
    test "tracing twice and stopping twice are well defined" do
      assert {:error, :not_tracing} = ElixirScope.stop_trace()
      assert {:ok, _} = ElixirScope.trace(Target, pids: :new)
      assert {:error, :already_tracing} = ElixirScope.trace(Target, pids: :new)
      assert {:ok, %{reason: :stopped}} = ElixirScope.stop_trace()
      assert {:error, :not_tracing} = ElixirScope.stop_trace()
      # A new trace starts on a fresh store.
      assert {:ok, _} = ElixirScope.trace(Target, pids: :new)
      assert {:ok, _} = ElixirScope.stop_trace()
    end

    test "unknown modules and applications, dead and remote pids" do
      assert {:error, {:unknown_module, NoSuchModule}} = ElixirScope.trace(NoSuchModule)
      assert {:error, {:unknown_module, NoSuch}} = ElixirScope.trace({NoSuch, :f, 1})

      assert {:error, {:unknown_application, :no_such_app}} =
               ElixirScope.trace({:app, :no_such_app})

      dead = spawn(fn -> :ok end)
      Process.sleep(10)
      assert {:error, {:dead_pid, ^dead}} = ElixirScope.trace(Target, pids: [dead])
      assert ElixirScope.trace_status().state in [:idle, :stopped]
    end

    test "an OTP application's modules" do
      {_pid, "1 + 1 = 2", _} =
        traced({:app, :eex}, [events: [:calls, :returns]], fn ->
          EEx.eval_string("1 + 1 = <%= 1 + 1 %>")
        end)

      calls = Analysis.select(types: [:call])
      assert Enum.any?(calls, &(&1.module == EEx and &1.function == :eval_string))

      assert Enum.all?(
               calls,
               &(&1.module |> Atom.to_string() |> String.starts_with?("Elixir.EEx"))
             )

      assert {:error, {:cannot_trace, ElixirScope.Native}} = ElixirScope.trace(ElixirScope.Native)
    end

    test "malformed options raise ArgumentError" do
      bad = [
        [pids: :some],
        [pids: [self(), :x]],
        [events: []],
        [events: [:calls, :bogus]],
        [payload: :half],
        [max_events: 0],
        [max_rate: -1],
        [duration: :forever],
        [max_payload_bytes: 10],
        [ring_size: 1000],
        [max_stored: 0],
        [unknown: 1],
        :not_a_list
      ]

      for opts <- bad do
        assert_raise ArgumentError, fn -> ElixirScope.trace(Target, opts) end
      end

      assert_raise ArgumentError, fn -> ElixirScope.trace("Target") end
      assert_raise ArgumentError, fn -> ElixirScope.trace({Target, "f", 1}) end
      assert_raise ArgumentError, fn -> ElixirScope.flush_trace(-1) end
      assert ElixirScope.trace_status().state in [:idle, :stopped]
    end

    test "analysis arguments are checked" do
      {_pid, _, _} = traced(Target, [events: [:calls]], fn -> Target.loop(3) end)
      assert_raise ArgumentError, fn -> Analysis.select(types: [:nope]) end
      assert_raise ArgumentError, fn -> Analysis.select(limit: 0) end
      assert_raise ArgumentError, fn -> Analysis.select(pid: :me) end
      assert_raise ArgumentError, fn -> Analysis.traceback(-1) end
      assert_raise ArgumentError, fn -> Analysis.next(1, scope: :galaxy) end
      assert_raise ArgumentError, fn -> Analysis.call_stat(by: :color) end
      assert_raise ArgumentError, fn -> Analysis.call_stat(modules: "x") end
      assert_raise ArgumentError, fn -> Analysis.select(store: :nope) end
      assert Analysis.traceback(10_000_000_000) == nil
      assert Analysis.call_tree(10_000_000_000) == nil
    end
  end

  describe "scoped sessions" do
    alias ElixirScope.Tracer

    # Runs `fun` in a fresh process under its own scoped session.
    defp scoped(targets, opts, fun) do
      test = self()

      spawn(fn ->
        {:ok, sess} = Tracer.start_scoped(targets, self(), opts)
        send(test, {:started, self()})
        receive(do: (:go -> :ok))
        result = fun.()
        {:ok, summary} = Tracer.stop_scoped(sess.id)
        send(test, {:done, self(), sess.store, result, summary})
        receive(do: (:exit -> :ok))
      end)
    end

    test "side by side, each session sees only its processes and its targets" do
      a = scoped(Target, [], fn -> Target.fib(5) end)
      b = scoped({Target, :loop, 1}, [], fn -> {Target.loop(3), Target.fib(2)} end)
      assert_receive {:started, ^a}
      assert_receive {:started, ^b}
      # A global trace cannot start while scoped sessions run.
      assert {:error, :already_tracing} = ElixirScope.trace(Target, pids: :new)
      send(a, :go)
      send(b, :go)
      assert_receive {:done, ^a, store_a, 5, sum_a}, 5000
      assert_receive {:done, ^b, store_b, {:done, 1}, sum_b}, 5000

      calls_a = Analysis.select(types: [:call], store: store_a)
      calls_b = Analysis.select(types: [:call], store: store_b)
      assert length(calls_a) == 15 and Enum.all?(calls_a, &(&1.pid == a and &1.function == :fib))
      # b traced only loop/1: its fib calls are not recorded.
      assert length(calls_b) == 4 and Enum.all?(calls_b, &(&1.pid == b and &1.function == :loop))
      assert sum_a.traced == length(Analysis.select(store: store_a))
      assert sum_b.dropped == 0
      # The patterns are off again once both ended.
      assert :erlang.trace_info({Target, :fib, 1}, :traced) == {:traced, false}
      send(a, :exit)
      send(b, :exit)
    end

    test "a pid already traced by another active session is refused" do
      test = self()
      other = spawn(fn -> receive(do: (:stop -> :ok)) end)

      holder =
        spawn(fn ->
          {:ok, sess} = Tracer.start_scoped(Target, self(), pids: [other])
          send(test, :held)
          receive(do: (:stop -> Tracer.stop_scoped(sess.id)))
          send(test, :released)
        end)

      assert_receive :held

      assert {:error, {:already_traced, ^other}} =
               Tracer.start_scoped(Target, self(), pids: [other])

      send(holder, :stop)
      assert_receive :released
      assert {:ok, sess} = Tracer.start_scoped(Target, self(), pids: [other])
      assert {:ok, _} = Tracer.stop_scoped(sess.id)
      assert {:error, :not_tracing} = Tracer.stop_scoped(sess.id)
      send(other, :stop)
    end

    test "a session whose process dies ends by itself" do
      test = self()

      pid =
        spawn(fn ->
          {:ok, sess} = Tracer.start_scoped(Target, self(), [])
          send(test, {:id, sess.id})
        end)

      assert_receive {:id, id}
      ref = Process.monitor(pid)
      assert_receive {:DOWN, ^ref, _, _, _}
      # The Tracer has handled the DOWN before this call.
      assert {:error, :not_tracing} = Tracer.stop_scoped(id)
    end
  end
end

defmodule ElixirScope.Capture.EventCorrelatorTest do
  use ExUnit.Case, async: true

  import Bitwise, only: [<<<: 2]

  alias ElixirScope.Capture.EventCorrelator
  alias ElixirScope.Capture.EventCorrelator.CorrelatedEvent
  alias ElixirScope.Events

  alias ElixirScope.Events.{
    ErrorEvent,
    FunctionEntry,
    FunctionExecution,
    FunctionExit,
    MessageEvent,
    MessageReceive,
    MessageSend,
    PerformanceMetric,
    ProcessEvent,
    ProcessExit,
    ProcessSpawn,
    StateChange
  }

  doctest EventCorrelator

  # ---------------------------------------------------------------------------
  # Helpers
  # ---------------------------------------------------------------------------

  defp start!(opts \\ []), do: start_supervised!({EventCorrelator, opts}, id: make_ref())

  defp call(id, pid, key \\ nil),
    do: %FunctionExecution{id: id, event_type: :call, caller_pid: pid, correlation_id: key}

  defp ret(id, pid, key \\ nil),
    do: %FunctionExecution{id: id, event_type: :return, caller_pid: pid, correlation_id: key}

  defp snd(id, from, to, msg),
    do: %MessageEvent{id: id, event_type: :send, from_pid: from, to_pid: to, message: msg}

  defp rcv(id, to, msg),
    do: %MessageEvent{id: id, event_type: :receive, to_pid: to, message: msg}

  defp unwrap(%Events{data: data}), do: data
  defp unwrap(event), do: event

  defp pids(n), do: for(_ <- 1..n, do: spawn(fn -> Process.sleep(:infinity) end))

  defp summary(%CorrelatedEvent{} = c),
    do: {c.correlation_type, c.correlation_id, c.parent_id, c.root_id, c.links}

  # ---------------------------------------------------------------------------
  # Lifecycle
  # ---------------------------------------------------------------------------

  describe "start_link/1, get_state/1, stop/1" do
    test "starts with defaults and reports its config" do
      c = start!()
      state = EventCorrelator.get_state(c)

      assert state.config == %{
               cleanup_interval_ms: 60_000,
               correlation_ttl_ms: 300_000,
               max_correlations: 100_000
             }

      assert is_reference(state.ref)
      assert state.cleanups_run == 0 and state.last_cleanup == nil
    end

    test "accepts a map or a keyword list, and a name" do
      name = :"corr_#{System.unique_integer([:positive])}"

      {:ok, pid} =
        EventCorrelator.start_link(%{
          cleanup_interval_ms: 30_000,
          correlation_ttl_ms: 1_000,
          max_correlations: 10,
          name: name
        })

      assert Process.whereis(name) == pid
      assert EventCorrelator.get_state(name).config.max_correlations == 10
      ev = EventCorrelator.correlate_event(name, call(1, self()))
      assert ev.correlation_type == :function_call
      assert EventCorrelator.get_metrics({name, node()}).calls == 1
      assert EventCorrelator.stop(name) == :ok
      refute Process.alive?(pid)
    end

    test "bad options raise ArgumentError naming the option" do
      assert_raise ArgumentError, ~r/unknown EventCorrelator option.*:size/, fn ->
        EventCorrelator.start_link(size: 1)
      end

      for {k, v} <- [
            max_correlations: 0,
            max_correlations: (1 <<< 28) + 1,
            max_correlations: :many,
            correlation_ttl_ms: -1,
            cleanup_interval_ms: 1.5,
            cleanup_interval_ms: nil
          ] do
        assert_raise ArgumentError, ~r/option #{inspect(k)} must be an integer/, fn ->
          EventCorrelator.start_link([{k, v}])
        end
      end

      for bad <- [:opts, [1, 2], %{"max_correlations" => 1}, %URI{}] do
        assert_raise ArgumentError, ~r/EventCorrelator options/, fn ->
          EventCorrelator.start_link(bad)
        end
      end
    end

    test "stop/1 frees the handle: the server is no longer found" do
      {:ok, pid} = EventCorrelator.start_link()
      assert EventCorrelator.stop(pid) == :ok

      assert_raise ArgumentError, ~r/not a running/, fn ->
        EventCorrelator.correlate_event(pid, call(1, self()))
      end
    end

    test "the handle of a killed correlator is forgotten by the next start" do
      {:ok, pid} = EventCorrelator.start_link()
      Process.unlink(pid)
      ref = Process.monitor(pid)
      Process.exit(pid, :kill)
      assert_receive {:DOWN, ^ref, _, _, :killed}
      assert :persistent_term.get({EventCorrelator, pid}, nil) != nil
      _ = start!()
      assert :persistent_term.get({EventCorrelator, pid}, nil) == nil
    end

    test "a correlator linked to a process that exits stops and unpublishes itself" do
      parent = self()

      owner =
        spawn(fn ->
          {:ok, c} = EventCorrelator.start_link()
          send(parent, {:started, c})
          Process.sleep(:infinity)
        end)

      assert_receive {:started, c}
      ref = Process.monitor(c)
      Process.exit(owner, :shutdown)
      assert_receive {:DOWN, ^ref, _, _, :shutdown}
      assert :persistent_term.get({EventCorrelator, c}, nil) == nil
    end
  end

  # ---------------------------------------------------------------------------
  # Function calls
  # ---------------------------------------------------------------------------

  describe "function calls" do
    test "nesting and recursion: parent, root and links" do
      c = start!()
      me = self()
      [f, g1, g2, g3] = EventCorrelator.correlate_batch(c, for(id <- 1..4, do: call(id, me)))

      assert summary(f) == {:function_call, 1, nil, 1, []}
      assert summary(g1) == {:function_call, 2, 1, 1, [called_from: 1]}
      assert summary(g2) == {:function_call, 3, 2, 1, [called_from: 2]}
      assert summary(g3) == {:function_call, 4, 3, 1, [called_from: 3]}
      assert f.correlation_confidence == 1.0
      assert is_integer(f.correlated_at)

      rets = EventCorrelator.correlate_batch(c, for(id <- 5..8, do: ret(id, me)))

      assert Enum.map(rets, &summary/1) == [
               {:function_return, 4, 3, 1, [completes: 4]},
               {:function_return, 3, 2, 1, [completes: 3]},
               {:function_return, 2, 1, 1, [completes: 2]},
               {:function_return, 1, nil, 1, [completes: 1]}
             ]

      assert EventCorrelator.get_correlation_metadata(c, 3).completed_by == 6
      m = EventCorrelator.get_metrics(c)
      assert {m.calls, m.returns, m.unmatched_returns, m.active_correlations} == {4, 4, 0, 0}
    end

    test "stacks are per process" do
      c = start!()
      [p, q] = pids(2)
      a = EventCorrelator.correlate_event(c, call(1, p))
      b = EventCorrelator.correlate_event(c, call(2, q))
      d = EventCorrelator.correlate_event(c, call(3, p))
      assert {a.parent_id, b.parent_id, d.parent_id} == {nil, nil, 1}
      assert EventCorrelator.correlate_event(c, ret(4, q)).correlation_id == 2
      assert EventCorrelator.correlate_event(c, ret(5, p)).correlation_id == 3
    end

    test "a return carrying a call's correlation id pops that frame and unwinds the ones above" do
      c = start!()
      me = self()

      EventCorrelator.correlate_batch(c, [
        call(1, me, :a),
        call(2, me, :b),
        call(3, me, :c),
        call(4, me, :d)
      ])

      r = EventCorrelator.correlate_event(c, ret(5, me, :b))
      assert summary(r) == {:function_return, 2, 1, 1, [completes: 2]}
      assert EventCorrelator.get_metrics(c).unwound_frames == 2
      # Frames 3 and 4 are gone: the next plain return completes 1.
      assert EventCorrelator.correlate_event(c, ret(6, me)).correlation_id == 1
      assert EventCorrelator.get_metrics(c).active_correlations == 0
    end

    test "a return carrying the correlation id this correlator gave the call completes it" do
      c = start!()
      me = self()
      outer = EventCorrelator.correlate_event(c, call("outer", me))
      _inner = EventCorrelator.correlate_event(c, call("inner", me))
      r = EventCorrelator.correlate_event(c, ret("r", me, outer.correlation_id))
      assert summary(r) == {:function_return, "outer", nil, "outer", [completes: "outer"]}
      assert EventCorrelator.get_metrics(c).unwound_frames == 1
    end

    test "an exception completes its call like a return" do
      c = start!()
      me = self()
      EventCorrelator.correlate_batch(c, [call(1, me, :a), call(2, me, :b)])
      exc = %FunctionExecution{id: 3, event_type: :exception, caller_pid: me, correlation_id: :a}
      r = EventCorrelator.correlate_event(c, exc)
      assert summary(r) == {:function_return, 1, nil, 1, [completes: 1]}
      assert EventCorrelator.get_metrics(c).unwound_frames == 1
    end

    test "a return naming no open call completes nothing and leaves the stack alone" do
      c = start!()
      me = self()
      EventCorrelator.correlate_event(c, call(1, me, :a))
      r = EventCorrelator.correlate_event(c, ret(2, me, :nope))
      assert summary(r) == {:function_return, 2, nil, nil, []}
      assert r.correlation_confidence == 0.0
      assert EventCorrelator.get_metrics(c).unmatched_returns == 1
      assert EventCorrelator.correlate_event(c, ret(3, me)).correlation_id == 1
    end

    test "a return without a process (as the Ingestor writes it) is found through its correlation id" do
      c = start!()
      [p, q] = pids(2)
      EventCorrelator.correlate_batch(c, [call(1, p, {:req, 1}), call(2, q, {:req, 2})])
      EventCorrelator.correlate_event(c, call(3, q))
      r = EventCorrelator.correlate_event(c, ret(4, nil, {:req, 2}))
      assert summary(r) == {:function_return, 2, nil, 2, [completes: 2]}
      r = EventCorrelator.correlate_event(c, ret(5, nil, {:req, 1}))
      assert r.correlation_id == 1
      assert EventCorrelator.get_metrics(c).pid_resolved_returns == 2
    end

    test "FunctionEntry / FunctionExit in %Events{} envelopes match by call_id" do
      c = start!()
      entry = Events.function_entry(M, :f, 1, [1])
      inner = Events.function_entry(M, :g, 0, [])
      exit = Events.function_exit(M, :f, 1, entry.data.call_id, :ok, 10, :error)

      [e, i, x] = EventCorrelator.correlate_batch(c, [entry, inner, exit])
      assert summary(e) == {:function_call, entry.event_id, nil, entry.event_id, []}
      assert i.parent_id == entry.event_id

      assert summary(x) ==
               {:function_return, entry.event_id, nil, entry.event_id,
                [completes: entry.event_id]}

      assert EventCorrelator.get_metrics(c).unwound_frames == 1
    end

    test "bare FunctionEntry / FunctionExit structs get fresh ids" do
      c = start!()
      entry = %FunctionEntry{module: M, function: :f, arity: 0, call_id: 77}
      exit = %FunctionExit{module: M, function: :f, arity: 0, call_id: 77, exit_reason: :normal}
      [e, x] = EventCorrelator.correlate_batch(c, [entry, exit])
      assert is_integer(e.correlation_id) and e.correlation_id >= 1 <<< 62
      assert x.correlation_id == e.correlation_id
      assert x.links == [completes: e.correlation_id]
      assert EventCorrelator.get_correlation_metadata(c, e.correlation_id).pid == nil
    end

    test "ids that are not integers are kept and shown as given" do
      c = start!()
      me = self()
      ids = ["call-1", {:call, 2}, -3, 1 <<< 70]
      results = EventCorrelator.correlate_batch(c, for(id <- ids, do: call(id, me)))
      assert Enum.map(results, & &1.correlation_id) == ids
      assert Enum.map(results, & &1.parent_id) == [nil | Enum.drop(ids, -1)]
      assert Enum.all?(results, &(&1.root_id == "call-1"))
      assert List.last(results).links == [called_from: -3]

      meta = EventCorrelator.get_correlation_metadata(c, {:call, 2})
      assert {meta.correlation_id, meta.parent_id, meta.pid} == {{:call, 2}, "call-1", me}

      assert Enum.map(EventCorrelator.get_correlation_chain(c, 1 <<< 70), & &1.correlation_id) ==
               ids
    end

    test "string, tuple and ref ids come back as the caller's terms across batches" do
      c = start!()
      me = self()
      [s, t, r] = ids = ["id-1-c", {:id, 2, :c}, make_ref()]
      calls = EventCorrelator.correlate_batch(c, for(id <- ids, do: call(id, me)))
      assert Enum.map(calls, & &1.correlation_id) === ids
      assert Enum.map(calls, & &1.root_id) === [s, s, s]

      # The returns come in later batches: the ids are no longer in the
      # caller's batch and come from the correlator's kept copies.
      [r3] = EventCorrelator.correlate_batch(c, [ret("ret-3", me)])
      assert {r3.correlation_id, r3.parent_id, r3.root_id, r3.links} === {r, t, s, [completes: r]}
      [r2, r1] = EventCorrelator.correlate_batch(c, [ret({:ret, 2}, me, t), ret("ret-1", me, s)])
      assert {r2.correlation_id, r2.parent_id, r2.root_id, r2.links} === {t, s, s, [completes: t]}

      assert {r1.correlation_id, r1.parent_id, r1.root_id, r1.links} ===
               {s, nil, s, [completes: s]}

      meta = EventCorrelator.get_correlation_metadata(c, r)

      assert {meta.correlation_id, meta.parent_id, meta.root_id, meta.completed_by} ===
               {r, t, s, "ret-3"}

      assert Enum.map(EventCorrelator.get_correlation_chain(c, r), & &1.correlation_id) === ids

      # A send and its receive in different batches.
      [a, b] = pids(2)
      [_] = EventCorrelator.correlate_batch(c, [snd({:send, "x"}, a, b, :hello)])
      [rcv1] = EventCorrelator.correlate_batch(c, [rcv(make_ref(), b, :hello)])
      assert {rcv1.correlation_id, rcv1.links} === {{:send, "x"}, [receives: {:send, "x"}]}
    end

    test "ids of any shape are returned exactly as given, in later batches too" do
      c = start!()
      me = self()
      big = :binary.copy("0123456789", 100)

      ids = [
        1.5,
        -0.0,
        %{a: [1, 2]},
        [1, 2 | 3],
        ~c"charlist",
        <<1::3>>,
        {{{{{{{{{{:deep, "x"}}}}}}}}}},
        {1.5, make_ref(), self(), "s"},
        1 <<< 80,
        -(1 <<< 80),
        -5,
        :atom,
        String.duplicate("x", 100),
        binary_part(big, 10, 20),
        fn -> :ok end
      ]

      for id <- ids do
        [cl] = EventCorrelator.correlate_batch(c, [call(id, me)])
        assert cl.correlation_id === id
        [rt] = EventCorrelator.correlate_batch(c, [ret(make_ref(), me)])
        assert {rt.correlation_id, rt.root_id, rt.links} === {id, id, [completes: id]}
        assert EventCorrelator.get_correlation_metadata(c, id).correlation_id === id
      end
    end

    test "integer ids beyond small integers (bignums) link as integers" do
      c = start!()
      me = self()

      for id <- [1 <<< 60, (1 <<< 63) - 1, 1 <<< 59] do
        [cl, rt] = EventCorrelator.correlate_batch(c, [call(id, me, id), ret(id + 1, me, id)])
        assert {cl.correlation_id, cl.root_id} === {id, id}
        assert {rt.correlation_id, rt.links} === {id, [completes: id]}
        assert EventCorrelator.get_correlation_metadata(c, id).completed_by === id + 1
      end
    end

    test "an id every newer event refers to stays as given past max_correlations newer ids" do
      c = start!(max_correlations: 8)
      me = self()
      [root] = EventCorrelator.correlate_batch(c, [call("root", me)])
      assert root.root_id == "root"

      for i <- 1..100 do
        [cl, rt] = EventCorrelator.correlate_batch(c, [call("c-#{i}", me), ret("r-#{i}", me)])
        assert {cl.parent_id, cl.root_id, cl.links} === {"root", "root", [called_from: "root"]}
        assert {rt.correlation_id, rt.parent_id, rt.root_id} === {"c-#{i}", "root", "root"}
      end

      [done] = EventCorrelator.correlate_batch(c, [ret("root-ret", me)])
      assert {done.correlation_id, done.links} === {"root", [completes: "root"]}
    end

    test "an id over 4 KiB is shown as given in its batch and as its integer key later" do
      c = start!()
      me = self()
      huge = {:id, :binary.copy("x", 5000)}
      [cl, inner] = EventCorrelator.correlate_batch(c, [call(huge, me), call(7, me)])
      assert cl.correlation_id === huge
      assert {inner.parent_id, inner.root_id} === {huge, huge}
      [_, rt] = EventCorrelator.correlate_batch(c, [ret(8, me), ret(9, me)])
      assert is_integer(rt.correlation_id) and rt.correlation_id >= 1 <<< 63
      assert rt.links == [completes: rt.correlation_id]
    end
  end

  # ---------------------------------------------------------------------------
  # Messages
  # ---------------------------------------------------------------------------

  describe "messages" do
    test "a receive is linked to its send" do
      c = start!()
      [a, b] = pids(2)
      s = EventCorrelator.correlate_event(c, snd(1, a, b, {:hello, :world}))
      r = EventCorrelator.correlate_event(c, rcv(2, b, {:hello, :world}))
      assert summary(s) == {:message_send, 1, nil, nil, []}
      assert summary(r) == {:message_receive, 1, nil, nil, [receives: 1]}
      assert r.correlation_confidence == 1.0
      assert EventCorrelator.get_correlation_metadata(c, 1).received_by == 2
    end

    test "identical repeated messages are matched first in, first out" do
      c = start!()
      [a, b] = pids(2)

      results =
        EventCorrelator.correlate_batch(c, [
          snd(1, a, b, :tick),
          snd(2, a, b, :tick),
          snd(3, a, b, :tock),
          rcv(4, b, :tick),
          rcv(5, b, :tock),
          rcv(6, b, :tick)
        ])

      assert results |> Enum.drop(3) |> Enum.map(& &1.links) == [
               [receives: 1],
               [receives: 3],
               [receives: 2]
             ]

      assert Enum.all?(results, &(&1.correlation_confidence == 1.0))
    end

    test "identical messages from two senders halve the confidence" do
      c = start!()
      [a, b, x] = pids(3)
      EventCorrelator.correlate_batch(c, [snd(1, a, x, :ping), snd(2, b, x, :ping)])
      r = EventCorrelator.correlate_event(c, rcv(3, x, :ping))
      assert r.links == [receives: 1]
      assert r.correlation_confidence == 0.5
      # One sender left: certain again.
      assert EventCorrelator.correlate_event(c, rcv(4, x, :ping)).correlation_confidence == 1.0
    end

    test "messages to another receiver do not match" do
      c = start!()
      [a, b, x] = pids(3)
      EventCorrelator.correlate_event(c, snd(1, a, b, :m))
      r = EventCorrelator.correlate_event(c, rcv(2, x, :m))
      assert {r.links, r.correlation_id, r.correlation_confidence} == {[], 2, 0.0}
    end

    test "a receive seen before its send is linked late, in the metadata" do
      c = start!()
      [a, b] = pids(2)
      EventCorrelator.correlate_event(c, call(10, b))
      r = EventCorrelator.correlate_event(c, rcv(1, b, {:late, 1}))
      assert summary(r) == {:message_receive, 1, 10, 10, []}
      assert r.correlation_confidence == 0.0
      meta = EventCorrelator.get_correlation_metadata(c, 1)
      assert {meta.type, meta.links, meta.confidence} == {:message_receive, [], 0.0}

      s = EventCorrelator.correlate_event(c, snd(2, a, b, {:late, 1}))
      assert summary(s) == {:message_send, 2, nil, nil, []}

      meta = EventCorrelator.get_correlation_metadata(c, 1)
      assert {meta.links, meta.confidence, meta.parent_id} == {[receives: 2], 1.0, 10}
      assert EventCorrelator.get_correlation_metadata(c, 2).received_by == 1
      m = EventCorrelator.get_metrics(c)
      assert {m.late_links, m.matched_receives, m.pending_messages} == {1, 1, 0}
    end

    test "MessageSend / MessageReceive structs and %Events{} wrappers" do
      c = start!()
      [a, b] = pids(2)
      send_ev = Events.message_send(a, b, {:call, 1}, :call, pid: a)
      recv_ev = %MessageReceive{receiver_pid: b, sender_pid: a, message: {:call, 1}}
      [s, r] = EventCorrelator.correlate_batch(c, [send_ev, recv_ev])
      assert s.correlation_id == send_ev.event_id
      assert r.links == [receives: send_ev.event_id]

      s2 = %MessageSend{sender_pid: a, receiver_pid: b, message: :x}
      r2 = Events.new_event(:message_receive, %{message: :x}, pid: b)
      [s2c, r2c] = EventCorrelator.correlate_batch(c, [s2, r2])
      assert r2c.links == [receives: s2c.correlation_id]
      assert r2c.correlation_id == s2c.correlation_id
    end
  end

  # ---------------------------------------------------------------------------
  # Processes and state
  # ---------------------------------------------------------------------------

  describe "processes and state" do
    test "spawn links the parent; exit orphans open calls" do
      c = start!()
      [parent, child] = pids(2)

      spawn_ev = %ProcessEvent{id: 1, event_type: :spawn, pid: child, parent_pid: parent}
      s = EventCorrelator.correlate_event(c, spawn_ev)
      assert summary(s) == {:process_spawn, 1, nil, nil, [spawned_by: parent]}
      assert EventCorrelator.get_correlation_metadata(c, 1).peer == child

      EventCorrelator.correlate_batch(c, [call(2, child), call(3, child)])
      x = EventCorrelator.correlate_event(c, %ProcessEvent{id: 4, event_type: :exit, pid: child})
      assert summary(x) == {:process_exit, 4, nil, nil, [spawned_by: parent]}
      m = EventCorrelator.get_metrics(c)
      assert {m.orphaned_calls, m.active_correlations} == {2, 0}
      # The child's stack is gone.
      assert EventCorrelator.correlate_event(c, ret(5, child)).links == []
    end

    test "ProcessSpawn / ProcessExit structs" do
      c = start!()
      [parent, child] = pids(2)
      s = %ProcessSpawn{spawned_pid: child, parent_pid: parent, spawn_module: M}
      x = %ProcessExit{exited_pid: child, exit_reason: :normal}
      [sc, xc] = EventCorrelator.correlate_batch(c, [s, x])
      assert {sc.correlation_type, sc.links} == {:process_spawn, [spawned_by: parent]}
      assert {xc.correlation_type, xc.links} == {:process_exit, [spawned_by: parent]}
    end

    test "a state change is linked to the call in progress" do
      c = start!()
      me = self()
      EventCorrelator.correlate_batch(c, [call(1, me), call(2, me)])
      st = %StateChange{id: 3, server_pid: me, callback: :handle_call, old_state: 0, new_state: 1}
      r = EventCorrelator.correlate_event(c, st)
      assert summary(r) == {:state_change, 3, 2, 1, [state_in: 2]}

      wrapped = Events.state_change(me, :handle_cast, 1, 2)
      r = EventCorrelator.correlate_event(c, wrapped)
      assert {r.correlation_id, r.links} == {wrapped.event_id, [state_in: 2]}

      EventCorrelator.correlate_batch(c, [ret(4, me), ret(5, me)])
      r = EventCorrelator.correlate_event(c, %StateChange{id: 6, server_pid: me})
      assert summary(r) == {:state_change, 6, nil, nil, []}
    end
  end

  # ---------------------------------------------------------------------------
  # Unknown events and batches
  # ---------------------------------------------------------------------------

  describe "unknown events" do
    test "anything else is :unknown with confidence 0.0" do
      c = start!()

      for ev <- [%{}, :atom, 42, "text", {:a, 1}, [1, 2], make_ref(), self(), fn -> :ok end] do
        r = EventCorrelator.correlate_event(c, ev)
        assert r.event === ev

        assert {r.correlation_type, r.correlation_id, r.correlation_confidence} ==
                 {:unknown, nil, 0.0}

        assert r.links == [] and r.parent_id == nil
      end

      metric = %PerformanceMetric{id: 9, metric_name: :memory, value: 1}
      assert EventCorrelator.correlate_event(c, metric).correlation_id == 9
      assert EventCorrelator.correlate_event(c, %ErrorEvent{id: "e1"}).correlation_id == "e1"
      wrapped = Events.new_event(:custom, %{a: 1})
      assert EventCorrelator.correlate_event(c, wrapped).correlation_id == wrapped.event_id
      # Known structs with an unknown event_type.
      assert EventCorrelator.correlate_event(c, %FunctionExecution{id: 1}).correlation_type ==
               :unknown

      assert EventCorrelator.correlate_event(c, %ProcessEvent{id: 2, event_type: :link}).correlation_type ==
               :unknown

      m = EventCorrelator.get_metrics(c)
      assert m.unknown_events == 14
      assert m.total_correlations_created == 0
      assert EventCorrelator.get_correlation_metadata(c, 9) == nil
    end
  end

  describe "correlate_batch/2" do
    test "[] gives []" do
      assert EventCorrelator.correlate_batch(start!(), []) == []
    end

    test "gives the same results, in order, as correlating one event at a time" do
      {events, expected} = random_trace(3_000, 7)
      a = start!()
      b = start!()
      batched = EventCorrelator.correlate_batch(a, events)
      single = Enum.map(events, &EventCorrelator.correlate_event(b, &1))
      assert length(batched) == length(events)
      assert Enum.map(batched, & &1.event) == events
      strip = fn r -> %{r | correlated_at: nil} end
      assert Enum.map(batched, strip) == Enum.map(single, strip)
      assert Enum.map(batched, &summary/1) == expected
    end

    test "a 1,000-event batch with costly ids (likely past one call's time budget) gives the one-at-a-time results" do
      # Ids that take the slow path (phash2 and a copy through the external
      # format): the batch is then usually correlated in several NIF calls
      # on the normal scheduler, the rest of the chunk continuing each time.
      ps = pids(4)
      big = fn i -> %{id: i, pad: Enum.to_list(1..150)} end

      events =
        for i <- 1..250, p = Enum.at(ps, rem(i, 4)), k <- [:call, :call, :return, :return] do
          id = big.({i, k, :erlang.unique_integer()})
          %FunctionExecution{id: id, event_type: k, caller_pid: p}
        end

      assert length(events) == 1000
      a = start!()
      b = start!()
      batched = EventCorrelator.correlate_batch(a, events)
      single = Enum.map(events, &EventCorrelator.correlate_event(b, &1))
      strip = fn r -> %{r | correlated_at: nil} end
      assert Enum.map(batched, strip) == Enum.map(single, strip)
      assert Enum.map(batched, & &1.event) == events
      assert EventCorrelator.get_metrics(a).unmatched_returns == 0
    end

    test "an improper list raises ArgumentError before anything is correlated" do
      c = start!()
      me = self()

      for bad <- [[call(1, me) | :tail], Enum.map(1..2_500, &call(&1, me)) ++ [call(0, me) | :t]] do
        assert_raise ArgumentError, ~r/events must be a proper list/, fn ->
          EventCorrelator.correlate_batch(c, bad)
        end
      end

      assert EventCorrelator.get_metrics(c).events_correlated == 0
    end

    test "a non-list raises ArgumentError" do
      c = start!()

      for bad <- [:x, %{}, {1, 2}, "events"] do
        assert_raise ArgumentError, ~r/events must be a list/, fn ->
          EventCorrelator.correlate_batch(c, bad)
        end
      end
    end
  end

  # ---------------------------------------------------------------------------
  # Queries
  # ---------------------------------------------------------------------------

  describe "get_correlation_metadata/2 and get_correlation_chain/2" do
    test "metadata of a call" do
      c = start!()
      me = self()
      t0 = System.monotonic_time(:nanosecond)
      EventCorrelator.correlate_batch(c, [call(1, me), call(2, me)])
      meta = EventCorrelator.get_correlation_metadata(c, 2)

      assert %{
               correlation_id: 2,
               type: :function_call,
               pid: ^me,
               parent_id: 1,
               root_id: 1,
               links: [called_from: 1],
               confidence: 1.0,
               completed_by: nil,
               received_by: nil,
               peer: nil
             } = meta

      assert meta.created_at >= t0 and meta.created_at <= System.monotonic_time(:nanosecond)
      assert EventCorrelator.get_correlation_metadata(c, 999) == nil
      assert EventCorrelator.get_correlation_metadata(c, nil) == nil
      assert EventCorrelator.get_correlation_metadata(c, "nope") == nil
    end

    test "a call's metadata has the called :module and :function, as the original's" do
      c = start!()
      me = self()
      [other] = pids(1)

      EventCorrelator.correlate_batch(c, [
        %FunctionExecution{
          id: 1,
          event_type: :call,
          caller_pid: me,
          module: MyApp.Worker,
          function: :handle
        },
        %FunctionExecution{id: 2, event_type: :call, caller_pid: me},
        %FunctionExecution{id: 3, event_type: :return, caller_pid: me, module: Ignored},
        %Events{
          event_id: "entry",
          pid: other,
          data: %FunctionEntry{module: :lists, function: :map, call_id: 7}
        },
        # Odd terms (not atoms) are kept and come back as given, in a later call too.
        %FunctionExecution{
          id: 4,
          event_type: :call,
          caller_pid: me,
          module: {:mod, "x"},
          function: "fun"
        },
        snd(5, me, other, :m)
      ])

      EventCorrelator.correlate_batch(c, [snd(6, me, other, :n)])

      assert %{module: MyApp.Worker, function: :handle, type: :function_call, pid: ^me} =
               EventCorrelator.get_correlation_metadata(c, 1)

      assert %{module: nil, function: nil, type: :function_call} =
               EventCorrelator.get_correlation_metadata(c, 2)

      assert %{module: :lists, function: :map, pid: ^other} =
               EventCorrelator.get_correlation_metadata(c, "entry")

      assert %{module: {:mod, "x"}, function: "fun"} =
               EventCorrelator.get_correlation_metadata(c, 4)

      # Other correlations have the keys too, nil.
      assert %{module: nil, function: nil, type: :message_send} =
               EventCorrelator.get_correlation_metadata(c, 5)

      assert [%{module: MyApp.Worker}, %{module: nil, function: nil}, %{module: {:mod, "x"}}] =
               Enum.map([1, 2, 4], &EventCorrelator.get_correlation_metadata(c, &1))

      assert Enum.map(EventCorrelator.get_correlation_chain(c, 2), & &1.module) == [
               MyApp.Worker,
               nil
             ]
    end

    test "the chain of a send inside nested calls, root first" do
      c = start!()
      [a, b] = pids(2)
      EventCorrelator.correlate_batch(c, [call(1, a), call(2, a), call(3, a), snd(4, a, b, :m)])

      assert Enum.map(EventCorrelator.get_correlation_chain(c, 4), &{&1.correlation_id, &1.type}) ==
               [{1, :function_call}, {2, :function_call}, {3, :function_call}, {4, :message_send}]

      assert Enum.map(EventCorrelator.get_correlation_chain(c, 2), & &1.correlation_id) == [1, 2]
      assert EventCorrelator.get_correlation_chain(c, 42) == []
      assert EventCorrelator.get_correlation_chain(c, nil) == []
    end
  end

  # ---------------------------------------------------------------------------
  # TTL and bounds
  # ---------------------------------------------------------------------------

  describe "cleanup and bounds" do
    test "cleanup_expired_correlations/1 removes what is older than the TTL and counts it" do
      c = start!(cleanup_interval_ms: 3_600_000, correlation_ttl_ms: 50)
      [a, b] = pids(2)
      EventCorrelator.correlate_batch(c, for(id <- 1..5, do: call(id, a)))
      EventCorrelator.correlate_event(c, snd(6, a, b, :unanswered))
      assert EventCorrelator.cleanup_expired_correlations(c) == {:ok, 0}
      Process.sleep(80)
      EventCorrelator.correlate_event(c, snd(7, b, a, :fresh))

      assert EventCorrelator.cleanup_expired_correlations(c) == {:ok, 6}
      assert EventCorrelator.get_correlation_metadata(c, 1) == nil
      assert EventCorrelator.get_correlation_metadata(c, 7) != nil
      m = EventCorrelator.get_metrics(c)
      # The unanswered send's queue entry expired; the fresh one did not.
      assert {m.expired, m.metadata_expired, m.pending_messages} == {1, 6, 1}
      # Open calls are not swept: their returns still complete them.
      assert EventCorrelator.correlate_event(c, ret(8, a)).links == [completes: 5]
      state = EventCorrelator.get_state(c)
      assert state.cleanups_run == 2
      assert %{removed: 6, expired_messages: 1} = state.last_cleanup
    end

    test "the periodic sweep runs every cleanup_interval_ms" do
      c = start!(cleanup_interval_ms: 20, correlation_ttl_ms: 10)
      EventCorrelator.correlate_event(c, call(1, self()))
      assert EventCorrelator.get_correlation_metadata(c, 1) != nil
      Process.sleep(120)
      assert EventCorrelator.get_correlation_metadata(c, 1) == nil
      assert EventCorrelator.get_state(c).cleanups_run >= 2
      assert EventCorrelator.get_metrics(c).sweeps >= 2
    end

    test "max_correlations bounds tracked state and metadata" do
      c = start!(max_correlations: 10)
      [a, b] = pids(2)
      EventCorrelator.correlate_batch(c, for(id <- 1..100, do: snd(id, a, b, {:m, id})))
      m = EventCorrelator.get_metrics(c)
      assert m.active_correlations == 10
      assert m.evicted == 90
      assert m.metadata_entries == 10
      assert m.metadata_evicted == 90
      assert EventCorrelator.get_correlation_metadata(c, 90) == nil
      assert EventCorrelator.get_correlation_metadata(c, 91) != nil
      # The oldest unmatched sends were evicted: their receives find nothing.
      assert EventCorrelator.correlate_event(c, rcv(101, b, {:m, 1})).links == []
      assert EventCorrelator.correlate_event(c, rcv(102, b, {:m, 100})).links == [receives: 100]
      assert EventCorrelator.health_check(c).status in [:healthy, :degraded]

      # All live frames: further calls are refused (not tracked); the calls
      # made under an untracked one have an unknown parent (confidence 0).
      d = start!(max_correlations: 5)
      results = EventCorrelator.correlate_batch(d, for(id <- 1..8, do: call(id, a)))

      assert Enum.map(results, & &1.correlation_confidence) ==
               [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]

      assert Enum.at(results, 5).parent_id == 5
      assert Enum.at(results, 6).parent_id == nil
      m = EventCorrelator.get_metrics(d)
      assert {m.active_correlations, m.refused} == {5, 3}
      assert EventCorrelator.health_check(d).status == :degraded
    end
  end

  # ---------------------------------------------------------------------------
  # Metrics and health
  # ---------------------------------------------------------------------------

  describe "get_metrics/1 and health_check/1" do
    test "counters" do
      c = start!()
      {events, _} = random_trace(500, 3)
      EventCorrelator.correlate_batch(c, events)
      m = EventCorrelator.get_metrics(c)

      for k <- [
            :total_correlations_created,
            :active_correlations,
            :function_correlations,
            :message_correlations,
            :average_correlation_time_ns,
            :orphaned_calls,
            :expired,
            :evicted,
            :unmatched_returns,
            :unwound_frames,
            :refused,
            :memory_bytes
          ] do
        assert Map.has_key?(m, k), "missing #{k}"
      end

      calls = Enum.count(events, &(unwrap(&1).event_type == :call))
      assert m.function_correlations == calls
      assert m.message_correlations == 0
      assert m.total_correlations_created == calls
      assert m.events_correlated == length(events)
      assert is_float(m.average_correlation_time_ns) and m.average_correlation_time_ns > 0
    end

    test "health" do
      c = start!()
      h = EventCorrelator.health_check(c)
      assert %{status: :healthy, active_correlations: 0, correlation_rate: 1.0} = h
      assert is_integer(h.memory_usage_bytes) and h.memory_usage_bytes > 0
      assert is_integer(h.uptime_ms) and h.uptime_ms >= 0

      EventCorrelator.correlate_batch(c, [call(1, self()), ret(2, self()), ret(3, self()), :junk])
      assert EventCorrelator.health_check(c).correlation_rate == 0.5
    end
  end

  # ---------------------------------------------------------------------------
  # Concurrency
  # ---------------------------------------------------------------------------

  describe "concurrency" do
    test "many processes correlating at once lose nothing" do
      c = start!(cleanup_interval_ms: 1)

      tasks =
        for t <- 1..8 do
          Task.async(fn ->
            me = self()
            base = t * 1_000_000

            for round <- 0..19 do
              ids = for k <- 1..50, do: base + round * 100 + k
              calls = Enum.map(ids, &call(&1, me))
              rets = for id <- Enum.reverse(ids), do: ret(id + 50, me)
              results = EventCorrelator.correlate_batch(c, calls ++ rets)
              completed = results |> Enum.drop(50) |> Enum.map(& &1.correlation_id)
              assert completed == Enum.reverse(ids)
            end
          end)
        end

      Task.await_many(tasks, 60_000)
      m = EventCorrelator.get_metrics(c)

      assert {m.calls, m.returns, m.unmatched_returns, m.active_correlations} ==
               {8000, 8000, 0, 0}
    end
  end

  # ---------------------------------------------------------------------------
  # Property: random interleavings against a reference model
  # ---------------------------------------------------------------------------

  # A random trace of calls and returns over several processes, with the
  # results a simple model (a stack per process) expects. Returns carry no
  # correlation id (pop the top), the key of an open call (unwind to it),
  # the id of an open call, or a key of no open call; some have no process.
  defp random_trace(n, seed) do
    :rand.seed(:exsss, {seed, seed * 7, seed * 13})
    procs = pids(4)
    init = %{stacks: Map.new(procs, &{&1, []}), out: [], next: 1}

    st =
      Enum.reduce(1..n, init, fn _, st ->
        pid = Enum.random(procs)
        stack = st.stacks[pid]
        id = if rem(st.next, 5) == 0, do: "id-#{st.next}", else: st.next
        st = %{st | next: st.next + 1}

        if stack == [] or :rand.uniform(100) <= 50 do
          key = if :rand.uniform(2) == 1, do: {:key, st.next}
          event = maybe_wrap(call(id, pid, key), pid)

          {parent, root} =
            if stack == [], do: {nil, id}, else: {hd(stack).id, List.last(stack).id}

          links = if parent, do: [called_from: parent], else: []
          expect = {:function_call, id, parent, root, links}
          frame = %{id: id, key: key, parent: parent, root: root}

          %{
            st
            | stacks: Map.put(st.stacks, pid, [frame | stack]),
              out: [{event, expect} | st.out]
          }
        else
          {corr, target} = pick_return(stack)
          ev_pid = if corr != nil and :rand.uniform(4) == 1, do: nil, else: pid
          event = maybe_wrap(ret(id, ev_pid, corr), pid)

          case target do
            nil ->
              %{st | out: [{event, {:function_return, id, nil, nil, []}} | st.out]}

            depth ->
              f = Enum.at(stack, depth)
              expect = {:function_return, f.id, f.parent, f.root, [completes: f.id]}
              stacks = Map.put(st.stacks, pid, Enum.drop(stack, depth + 1))
              %{st | stacks: stacks, out: [{event, expect} | st.out]}
          end
        end
      end)

    Enum.unzip(Enum.reverse(st.out))
  end

  # {correlation id to put on the return, depth of the frame it completes}.
  defp pick_return([]), do: {nil, nil}

  defp pick_return(stack) do
    depth = :rand.uniform(length(stack)) - 1
    f = Enum.at(stack, depth)

    case :rand.uniform(6) do
      n when n <= 3 -> {nil, 0}
      4 when f.key != nil -> {f.key, depth}
      5 -> {f.id, depth}
      6 -> {{:no_such_call, :rand.uniform(1000)}, nil}
      _ -> {nil, 0}
    end
  end

  # A quarter of the events come wrapped in an %Events{} envelope.
  defp maybe_wrap(%FunctionExecution{} = e, pid) do
    if :rand.uniform(4) == 1 do
      Events.new_event(:function_execution, %{e | id: nil},
        event_id: e.id,
        pid: pid,
        correlation_id: nil
      )
    else
      e
    end
  end

  describe "property" do
    test "random interleavings of calls and returns match a stack-per-process model" do
      for seed <- 1..12 do
        {events, expected} = random_trace(1_500, seed)
        c = start_supervised!({EventCorrelator, []}, id: {:prop, seed})
        # Mixed batch sizes, some above one chunk, some single events.
        results = correlate_in_random_batches(c, events)
        got = Enum.map(results, &summary/1)

        for {{g, e}, i} <- Enum.with_index(Enum.zip(got, expected)), g != e do
          flunk(
            "seed #{seed}, event #{i}: #{inspect(Enum.at(events, i))}\n" <>
              "  got      #{inspect(g)}\n  expected #{inspect(e)}"
          )
        end

        m = EventCorrelator.get_metrics(c)
        unmatched = Enum.count(expected, &match?({:function_return, _, nil, nil, []}, &1))
        assert m.unmatched_returns == unmatched
        stop_supervised!({:prop, seed})
      end
    end
  end

  defp correlate_in_random_batches(_c, []), do: []

  defp correlate_in_random_batches(c, events) do
    size = Enum.random([1, 7, 100, 1_200])
    {batch, rest} = Enum.split(events, size)

    results =
      if size == 1,
        do: Enum.map(batch, &EventCorrelator.correlate_event(c, &1)),
        else: EventCorrelator.correlate_batch(c, batch)

    results ++ correlate_in_random_batches(c, rest)
  end

  # ---------------------------------------------------------------------------
  # Bad input
  # ---------------------------------------------------------------------------

  describe "bad input" do
    test "a server argument that is not a running correlator raises ArgumentError" do
      c = start!()
      other = spawn(fn -> Process.sleep(:infinity) end)

      for bad <- [
            self(),
            other,
            :no_such_name,
            nil,
            42,
            "c",
            {:a, :b},
            {:global, :nope},
            make_ref()
          ] do
        for f <- [
              fn -> EventCorrelator.correlate_event(bad, call(1, self())) end,
              fn -> EventCorrelator.correlate_batch(bad, [call(1, self())]) end,
              fn -> EventCorrelator.correlate_batch(bad, :not_a_list) end,
              fn -> EventCorrelator.get_correlation_metadata(bad, 1) end,
              fn -> EventCorrelator.get_correlation_chain(bad, 1) end,
              fn -> EventCorrelator.cleanup_expired_correlations(bad) end,
              fn -> EventCorrelator.get_metrics(bad) end,
              fn -> EventCorrelator.health_check(bad) end,
              fn -> EventCorrelator.get_state(bad) end,
              fn -> EventCorrelator.stop(bad) end
            ] do
          assert_raise ArgumentError, f
        end
      end

      assert Process.alive?(other)
      assert EventCorrelator.health_check(c).status == :healthy
    end

    test "malformed fields of known structs do not crash" do
      c = start!()

      weird = [
        %FunctionExecution{
          id: 1,
          event_type: :call,
          caller_pid: "not a pid",
          correlation_id: [1]
        },
        %FunctionExecution{id: 2, event_type: :return, caller_pid: 3.5, correlation_id: %{}},
        %MessageEvent{id: 3, event_type: :send, from_pid: :x, to_pid: {:a, :b}, message: nil},
        %MessageEvent{id: 4, event_type: :receive, to_pid: {:a, :b}, message: nil},
        %ProcessEvent{id: 5, event_type: :spawn, parent_pid: 1, pid: 2},
        %ProcessEvent{id: 6, event_type: :exit, pid: 2},
        %Events{event_id: 7, event_type: :function_entry, data: :not_a_map},
        %Events{event_id: 8, event_type: 123, data: nil},
        %Events{event_id: 9, event_type: :message_send, data: %{to_pid: self(), message: 1}},
        %StateChange{id: 10, server_pid: self()}
      ]

      results = EventCorrelator.correlate_batch(c, weird)

      assert Enum.map(results, & &1.correlation_type) ==
               [
                 :function_call,
                 :function_return,
                 :message_send,
                 :message_receive,
                 :process_spawn,
                 :process_exit,
                 :function_call,
                 :unknown,
                 :message_send,
                 :state_change
               ]

      # The pid-like terms come back as given.
      assert Enum.at(results, 3).links == [receives: 3]
      assert Enum.at(results, 4).links == [spawned_by: 1]
      assert Enum.at(results, 5).links == [spawned_by: 1]
      assert EventCorrelator.get_correlation_metadata(c, 1).pid == "not a pid"
    end
  end
end

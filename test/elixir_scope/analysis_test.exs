defmodule ElixirScope.AnalysisTest.Account do
  @moduledoc false
  # A GenServer with a known sequence of states.
  use GenServer

  def start_link(balance), do: GenServer.start_link(__MODULE__, balance)
  def start(balance), do: GenServer.start(__MODULE__, balance)
  def deposit(pid, n), do: GenServer.call(pid, {:deposit, n})
  def withdraw(pid, n), do: GenServer.call(pid, {:withdraw, n})
  def note(pid, text), do: GenServer.cast(pid, {:note, text})
  def tick(pid), do: send(pid, :tick)
  def grow(pid, bytes), do: GenServer.call(pid, {:grow, bytes})
  def later(pid), do: GenServer.call(pid, :later)

  @impl true
  def init(balance), do: {:ok, %{balance: balance, notes: [], ticks: 0, blob: nil}}

  @impl true
  def handle_call({:deposit, n}, _from, s),
    do: {:reply, s.balance + n, %{s | balance: s.balance + n}}

  def handle_call({:withdraw, n}, _from, s) when n <= s.balance,
    do: {:reply, s.balance - n, %{s | balance: s.balance - n}}

  def handle_call({:withdraw, n}, _from, s),
    do: raise("overdrawn: #{s.balance} < #{n} #{inspect(s.notes)}")

  def handle_call({:grow, bytes}, _from, s),
    do: {:reply, :ok, %{s | blob: :binary.copy("x", bytes)}}

  # Reply now, then continue: the continue is triggered by this state.
  def handle_call(:later, _from, s), do: {:reply, :ok, s, {:continue, :bump}}

  @impl true
  def handle_cast({:note, text}, s), do: {:noreply, %{s | notes: [text | s.notes]}}

  @impl true
  def handle_info(:tick, s), do: {:noreply, %{s | ticks: s.ticks + 1}}

  @impl true
  def handle_continue(:bump, s), do: {:noreply, %{s | ticks: s.ticks + 100}}
end

defmodule ElixirScope.AnalysisTest.Door do
  @moduledoc false
  # A gen_statem with state functions: locked <-> open.
  @behaviour :gen_statem

  def start(code), do: :gen_statem.start(__MODULE__, code, [])
  def push(pid, digit), do: :gen_statem.call(pid, {:push, digit})
  def lock(pid), do: :gen_statem.cast(pid, :lock)
  def peek(pid), do: :gen_statem.call(pid, :peek)

  @impl true
  def callback_mode, do: :state_functions

  @impl true
  def init(code), do: {:ok, :locked, %{code: code, input: []}}

  def locked({:call, from}, {:push, d}, data) do
    input = data.input ++ [d]

    if input == data.code,
      do: {:next_state, :open, %{data | input: []}, [{:reply, from, :opened}]},
      else: {:keep_state, %{data | input: input}, [{:reply, from, :locked}]}
  end

  def locked({:call, from}, :peek, _data), do: {:keep_state_and_data, [{:reply, from, :locked}]}

  def open(:cast, :lock, data), do: {:next_state, :locked, data}
  def open({:call, from}, :peek, _data), do: {:keep_state_and_data, [{:reply, from, :open}]}

  @impl true
  def terminate(_reason, _state, _data), do: :ok
end

defmodule ElixirScope.AnalysisTest.Light do
  @moduledoc false
  # A gen_statem with handle_event/4.
  @behaviour :gen_statem

  def start, do: :gen_statem.start(__MODULE__, :ok, [])
  def flip(pid), do: :gen_statem.call(pid, :flip)

  @impl true
  def callback_mode, do: :handle_event_function

  @impl true
  def init(:ok), do: {:ok, :off, 0}

  @impl true
  def handle_event({:call, from}, :flip, :off, n),
    do: {:next_state, :on, n + 1, [{:reply, from, :on}]}

  def handle_event({:call, from}, :flip, :on, n),
    do: {:next_state, :off, n + 1, [{:reply, from, :off}]}
end

defmodule ElixirScope.AnalysisTest.Front do
  @moduledoc false
  # A GenServer that forwards a deposit to an Account from its handle_call:
  # a state of the Account is caused by a call on a third process.
  use GenServer

  def start(account), do: GenServer.start(__MODULE__, account)
  def forward(pid, n), do: GenServer.call(pid, {:forward, n})

  @impl true
  def init(account), do: {:ok, %{account: account, forwarded: 0}}

  @impl true
  def handle_call({:forward, n}, _from, s) do
    balance = ElixirScope.AnalysisTest.Account.deposit(s.account, n)
    {:reply, balance, %{s | forwarded: s.forwarded + 1}}
  end
end

defmodule ElixirScope.AnalysisTest.Pure do
  @moduledoc false
  def double(x), do: x * 2
  def boom(x), do: raise(ArgumentError, "boom #{x}")
end

defmodule ElixirScope.AnalysisTest do
  use ExUnit.Case, async: false

  # The crash tests make GenServers log their crash reports.
  @moduletag :capture_log

  alias ElixirScope.Analysis
  alias ElixirScope.Analysis.{Entry, Format, State}
  alias ElixirScope.AnalysisTest.{Account, Door, Front, Light, Pure}
  alias ElixirScope.Capture.{Ingestor, PipelineManager, RingBuffer}
  alias ElixirScope.Events.StateSnapshot

  setup do
    on_exit(fn -> ElixirScope.stop_trace() end)
    :ok
  end

  # The state in force at `t`, or the error.
  defp at(pid, t) do
    case Analysis.state_at(pid, t) do
      {:ok, %State{state: s, name: nil}} -> s
      {:ok, %State{state: s, name: n}} -> {n, s}
      {:error, reason} -> {:error, reason}
    end
  end

  # Checks state_at at every instant around and between consecutive
  # records: at each record, just after, half way, and just before the
  # next one.
  defp assert_exact_between(pid, history, expected) do
    assert length(history) == length(expected)
    pairs = Enum.zip(history, expected)

    pairs
    |> Enum.chunk_every(2, 1, [:last])
    |> Enum.each(fn
      [{st, want}, {next, _}] ->
        for t <- [
              st.timestamp,
              st.timestamp + 1,
              div(st.timestamp + next.timestamp, 2),
              next.timestamp - 1
            ],
            t >= st.timestamp,
            t < next.timestamp do
          assert at(pid, t) == want, "state at #{t} (record #{st.id})"
        end

      [{st, want}, :last] ->
        assert at(pid, st.timestamp) == want
    end)
  end

  describe "state capture and state_at" do
    test "a GenServer's states are exact at every instant, from the snapshot, across a crash and restart" do
      Process.flag(:trap_exit, false)
      {:ok, sup} = Supervisor.start_link([{Account, 10}], strategy: :one_for_one)
      Process.unlink(sup)
      [{_, pid, _, _}] = Supervisor.which_children(sup)

      {:ok, info} = ElixirScope.trace(Account, pids: :all)
      assert info.states
      assert info.snapshots.taken >= 1
      me = self()

      assert Account.deposit(pid, 5) == 15
      assert Account.withdraw(pid, 3) == 12
      Account.note(pid, "hello")
      Account.tick(pid)
      assert Account.later(pid) == :ok
      assert Account.deposit(pid, 1) == 13
      catch_exit(Account.withdraw(pid, 1_000))
      new = wait_restart(sup, pid)
      assert Account.deposit(new, 2) == 12
      {:ok, summary} = ElixirScope.stop_trace()
      assert summary.dropped == 0

      base = %{balance: 10, notes: [], ticks: 0, blob: nil}

      expected = [
        base,
        %{base | balance: 15},
        %{base | balance: 12},
        %{base | balance: 12, notes: ["hello"]},
        %{base | balance: 12, notes: ["hello"], ticks: 1},
        %{base | balance: 12, notes: ["hello"], ticks: 1},
        %{base | balance: 12, notes: ["hello"], ticks: 101},
        %{base | balance: 13, notes: ["hello"], ticks: 101},
        # terminate/2 after the crash keeps the state
        %{base | balance: 13, notes: ["hello"], ticks: 101}
      ]

      history = Analysis.state_history(pid)
      assert Enum.map(history, & &1.state) == expected

      assert Enum.map(history, & &1.kind) ==
               [:snapshot | List.duplicate(:callback, length(expected) - 1)]

      assert Enum.map(tl(history), &elem(&1.callback, 1)) ==
               [
                 :handle_call,
                 :handle_call,
                 :handle_cast,
                 :handle_info,
                 :handle_call,
                 :handle_continue,
                 :handle_call,
                 :terminate
               ]

      assert Enum.at(history, 1).reply == 15
      assert {:"$gen_call", {^me, _}, {:deposit, 5}} = Enum.at(history, 1).trigger
      assert {:"$gen_cast", {:note, "hello"}} = Enum.at(history, 3).trigger
      assert Enum.at(history, 4).trigger == :tick
      # The continue: triggered by the state that asked for it.
      assert Enum.at(history, 5).actions == {:continue, :bump}
      assert Enum.at(history, 6).trigger_id == Enum.at(history, 5).id
      assert List.last(history).kept
      assert List.last(history).source_id == Enum.at(history, 7).id

      assert_exact_between(pid, history, expected)

      # Before the snapshot: no state yet.
      first = hd(history)
      [earliest | _] = Analysis.select(limit: 1)

      if earliest.timestamp < first.timestamp,
        do: assert(at(pid, first.timestamp - 1) == {:error, :before_first_state})

      # After the crash: the old process exited; the new one starts from init.
      [exit] = Analysis.select(types: [:exit], pid: pid)
      assert at(pid, exit.timestamp + 1) == {:error, :exited}
      [init, dep] = Analysis.state_history(new)
      assert init.callback == {Account, :init, 1}
      assert init.state == %{base | balance: 10}
      assert at(new, init.timestamp) == %{base | balance: 10}
      assert at(new, dep.timestamp - 1) == %{base | balance: 10}
      assert at(new, dep.timestamp) == %{base | balance: 12}

      # state_at of any event: the state when it happened.
      [crash | _] = Analysis.select(types: [:exception], pid: pid)
      assert {:ok, %State{state: %{balance: 13}}} = Analysis.state_at(crash)

      Supervisor.stop(sup)
    end

    test "gen_statem: state name and data are both tracked (state functions and handle_event)" do
      {:ok, door} = Door.start([1, 2])
      {:ok, light} = Light.start()
      {:ok, _} = ElixirScope.trace([Door, Light], pids: [self(), door, light])

      assert Door.push(door, 1) == :locked
      assert Door.peek(door) == :locked
      assert Door.push(door, 2) == :opened
      Door.lock(door)
      assert Door.peek(door) == :locked
      assert Light.flip(light) == :on
      assert Light.flip(light) == :off
      {:ok, _} = ElixirScope.stop_trace()

      history = Analysis.state_history(door)

      assert Enum.map(history, &{&1.name, &1.state}) == [
               {:locked, %{code: [1, 2], input: []}},
               {:locked, %{code: [1, 2], input: [1]}},
               {:locked, %{code: [1, 2], input: [1]}},
               {:open, %{code: [1, 2], input: []}},
               {:locked, %{code: [1, 2], input: []}},
               {:locked, %{code: [1, 2], input: []}}
             ]

      assert Enum.map(history, & &1.returned) ==
               [
                 nil,
                 :keep_state,
                 :keep_state_and_data,
                 :next_state,
                 :next_state,
                 :keep_state_and_data
               ]

      assert Enum.map(history, & &1.kept) == [false, false, true, false, false, true]
      assert Enum.at(history, 2).source_id == Enum.at(history, 1).id

      assert Enum.at(history, 3).actions == [
               {:reply, Enum.at(history, 3).trigger |> elem(1), :opened}
             ]

      assert {:open, %{code: [1, 2], input: []}} == at(door, Enum.at(history, 3).timestamp + 1)
      assert Enum.at(history, 1).callback == {Door, :locked, 3}

      # A changed state name is part of the diff.
      assert [{:changed, [:state_name], :locked, :open} | _] =
               Analysis.state_diff(Enum.at(history, 2), Enum.at(history, 3))

      light_h = Analysis.state_history(light)
      assert Enum.map(light_h, &{&1.name, &1.state}) == [{:off, 0}, {:on, 1}, {:off, 2}]
      assert Enum.at(light_h, 1).callback == {Light, :handle_event, 4}
      :gen_statem.stop(door)
      :gen_statem.stop(light)
    end

    test "a state bigger than max_state_bytes is reported as cut, never as another value" do
      {:ok, pid} = Account.start(1)
      {:ok, _} = ElixirScope.trace(Account, pids: [self(), pid], max_state_bytes: 4096)
      :ok = Account.grow(pid, 100_000)
      assert Account.deposit(pid, 1) == 2
      {:ok, _} = ElixirScope.stop_trace()

      [snap, grow, dep] = Analysis.state_history(pid)
      refute snap.truncated
      assert grow.truncated
      # The rest of the state is exact; the big part is a marker, not a value.
      assert %{balance: 1, notes: [], ticks: 0, blob: {:truncated, n, :binary}} = grow.state
      assert n >= 100_000
      assert dep.truncated
      assert dep.state.balance == 2
      assert Analysis.state_diff(snap, grow) == [{:cut, [:blob]}]
      assert Analysis.state_diff(grow, dep) == [{:changed, [:balance], 1, 2}, {:cut, [:blob]}]
      assert Format.format_state_history([snap, grow, dep]) =~ "cut at the state cap"
      GenServer.stop(pid)
    end

    test "state records dropped by a full ring make those times unknown, never another state" do
      {:ok, pid} = Account.start(0)
      {history, s} = drop_some_states(pid, 5)
      assert s.states_dropped > 0 and s.dropped >= s.states_dropped
      ticks = for st <- history, st.callback == {Account, :handle_info, 2}, do: st.state.ticks
      # The ticks recorded are in order (the dropped ones are missing).
      assert ticks == Enum.sort(ticks) and length(Enum.uniq(ticks)) == length(ticks)

      pairs = Enum.chunk_every(tl(history), 2, 1, :discard)
      gaps = Enum.filter(pairs, fn [a, b] -> b.state.ticks > a.state.ticks + 1 end)
      assert gaps != []

      # Just before a record that follows dropped ones, the state in force
      # was a dropped one: unknown, not the state before the gap.
      for [_a, b] <- gaps do
        assert Analysis.state_at(pid, b.timestamp - 1) == {:error, :evicted}
      end

      # At every record: its own state, or unknown.
      for st <- tl(history) do
        case Analysis.state_at(pid, st.timestamp) do
          {:ok, %State{state: %{ticks: t}}} -> assert t == st.state.ticks
          other -> assert other == {:error, :evicted}
        end
      end

      # After the last drop the states are known again: when the final
      # deposit was recorded with no drop just before it, its state.
      last = List.last(history)

      if last.callback == {Account, :handle_call, 3} and List.last(pairs) not in gaps do
        assert {:ok, %State{id: id, state: state}} = Analysis.state_at(pid, last.timestamp)
        assert id == last.id and state == :sys.get_state(pid)
      end

      GenServer.stop(pid)
    end

    test "exception values and exit reasons have the state cap, not the payload cap" do
      {:ok, pid} = Account.start(0)
      {:ok, _} = ElixirScope.trace(Account, pids: [self(), pid], max_payload_bytes: 64)
      long = String.duplicate("a", 600)
      Account.note(pid, long)
      catch_exit(Account.withdraw(pid, 1))
      {:ok, _} = ElixirScope.stop_trace()

      # The client call's arguments were cut at the payload cap ...
      [cast] = Analysis.select(types: [:call], function: :note)
      assert {:truncated, _, :list} = cast.data
      assert cast.truncated
      # ... the exception and the exit reason were not.
      [exc | _] = Analysis.select(types: [:exception], pid: pid)
      assert {:error, %RuntimeError{message: msg}} = exc.data
      assert msg == "overdrawn: 0 < 1 #{inspect([long])}"
      refute exc.truncated
      [exit] = Analysis.select(types: [:exit], pid: pid)
      assert {%RuntimeError{}, [_ | _]} = exit.data
      refute exit.truncated
    end

    test "why links a state to the client's call on another process" do
      {:ok, pid} = Account.start(0)
      client = self()
      {:ok, _} = ElixirScope.trace(Account, pids: [client, pid])
      assert Account.deposit(pid, 7) == 7
      {:ok, _} = ElixirScope.stop_trace()

      [_snap, st] = Analysis.state_history(pid)
      chain = Analysis.why(st)
      roles = Enum.map(chain, &elem(&1, 0))
      assert roles == [:state, :callback, :received, :sent, :call]
      {:call, root} = List.last(chain)
      assert %Entry{pid: ^client, module: Account, function: :deposit, data: [^pid, 7]} = root
      {:sent, sent} = Enum.at(chain, 3)
      assert sent.pid == client and sent.peer == pid
      {:callback, cb} = Enum.at(chain, 1)
      assert cb.pid == pid and cb.link_id == elem(Enum.at(chain, 2), 1).id
      text = Format.format_why(chain)
      assert text =~ "Account.deposit/2"
      assert text =~ "←  received"
      assert Analysis.why(123_456_789_012) == nil
      GenServer.stop(pid)
    end

    test "why follows a chain over three processes back to the root call" do
      {:ok, account} = Account.start(0)
      {:ok, front} = Front.start(account)
      client = self()
      {:ok, _} = ElixirScope.trace([Account, Front], pids: [client, front, account])
      assert Front.forward(front, 9) == 9
      {:ok, _} = ElixirScope.stop_trace()

      [_snap, st] = Analysis.state_history(account)
      assert st.state.balance == 9
      chain = Analysis.why(st)

      assert Enum.map(chain, &elem(&1, 0)) ==
               [:state, :callback, :received, :sent, :call, :callback, :received, :sent, :call]

      assert Enum.map(chain, &elem(&1, 1).pid) ==
               [account, account, account, front, front, front, front, client, client]

      # The Account's deposit was called by the Front's handle_call ...
      {:call, dep} = Enum.at(chain, 4)
      assert {dep.module, dep.function, dep.data} == {Account, :deposit, [account, 9]}
      {:callback, fcb} = Enum.at(chain, 5)
      assert {fcb.module, fcb.function, fcb.arity} == {Front, :handle_call, 3}
      assert dep.parent_id == fcb.id
      # ... whose message came from the client's Front.forward/2.
      {:call, root} = List.last(chain)
      assert %Entry{module: Front, function: :forward, data: [^front, 9]} = root
      # The Front's own state: one forward, from the same root.
      [_, fst] = Analysis.state_history(front)
      assert fst.state.forwarded == 1
      assert {:call, root} == List.last(Analysis.why(fst))
      GenServer.stop(front)
      GenServer.stop(account)
    end

    test "state: false records no state; payload: :arity still captures states" do
      {:ok, pid} = Account.start(0)
      {:ok, info} = ElixirScope.trace(Account, pids: [self(), pid], state: false)
      refute info.states
      Account.deposit(pid, 1)
      {:ok, _} = ElixirScope.stop_trace()
      assert Analysis.state_history(pid) == {:error, :no_state}

      {:ok, _} = ElixirScope.trace(Account, pids: [self(), pid], payload: :arity)
      Account.deposit(pid, 1)
      {:ok, _} = ElixirScope.stop_trace()
      [snap, st] = Analysis.state_history(pid)
      assert snap.state.balance == 1
      assert st.state.balance == 2
      assert {:"$gen_call", _, {:deposit, 1}} = st.trigger
      # Other calls keep their arity only.
      [call] = Analysis.select(types: [:call], function: :deposit)
      assert call.data == nil and call.arity == 2
      GenServer.stop(pid)
    end

    test "snapshots leave no system messages in the trace" do
      {:ok, pid} = Account.start(3)
      {:ok, info} = ElixirScope.trace(Account, pids: [pid])
      assert info.snapshots == %{taken: 1, failed: 0}
      {:ok, _} = ElixirScope.stop_trace()
      assert [%Entry{type: :state_snapshot, data: %{balance: 3}}] = Analysis.select(pid: pid)
      GenServer.stop(pid)
    end
  end

  describe "trace files" do
    @tag :tmp_dir
    test "state records survive a save and load, also merged with id shifts", %{tmp_dir: dir} do
      {:ok, pid} = Account.start(0)
      {:ok, _} = ElixirScope.trace(Account, pids: [self(), pid])
      Account.deposit(pid, 4)
      Account.later(pid)
      {:ok, _} = ElixirScope.stop_trace()
      before = Analysis.state_history(pid)
      why_before = Analysis.why(List.last(before)) |> Enum.map(fn {r, e} -> {r, e.type} end)
      path = Path.join(dir, "t.estrace")
      assert {:ok, _} = ElixirScope.TraceFile.save(:trace, path)

      key = fn h -> Enum.map(h, &{&1.kind, &1.callback, &1.state, &1.kept, &1.trigger}) end

      {:ok, one} = ElixirScope.TraceFile.load(path)
      after_one = Analysis.state_history(pid, store: one)
      assert key.(after_one) == key.(before)
      assert Enum.map(after_one, & &1.trigger_id) == Enum.map(before, & &1.trigger_id)

      # Loaded twice: the second copy's ids are shifted, its triggers too.
      {:ok, two} = ElixirScope.TraceFile.load([path, path])
      both = Analysis.state_history(pid, store: two)
      assert key.(both) |> Enum.uniq() |> Enum.sort() == key.(before) |> Enum.sort()

      for st <- both do
        chain = Analysis.why(st, store: two)
        ids = Enum.map(chain, &elem(&1, 1).id)
        # Each chain stays within one copy: its ids are on one side of the shift.
        assert Enum.all?(ids, &(&1 > st.id - 1_000_000 and &1 <= st.id))
      end

      last = Enum.max_by(both, & &1.id)

      assert Analysis.why(last, store: two) |> Enum.map(fn {r, e} -> {r, e.type} end) ==
               why_before

      GenServer.stop(pid)
    end
  end

  describe "state records from the Ingestor and StateSnapshot events" do
    test "ingest_state_change, ingest_state_snapshot and a written %StateSnapshot{} are state records" do
      {:ok, pm} = PipelineManager.start_link(name: nil)
      buf = PipelineManager.ring_buffer(pm)
      me = self()
      :ok = Ingestor.ingest_state_snapshot(buf, me, %{n: 0}, :start)
      :ok = Ingestor.ingest_state_change(buf, me, %{n: 0}, %{n: 1})

      snap = %StateSnapshot{
        server_pid: me,
        state: %{n: 5},
        snapshot_reason: :manual,
        sequence_number: 3
      }

      :ok = RingBuffer.write(buf, snap)
      :ok = PipelineManager.flush(pm)
      store = PipelineManager.data_access(pm)

      history = Analysis.state_history(me, store: store)

      assert Enum.map(history, &{&1.kind, &1.state}) ==
               [{:snapshot, %{n: 0}}, {:state_change, %{n: 1}}, {:snapshot, %{n: 5}}]

      assert {:ok, %State{state: %{n: 1}}} =
               Analysis.state_at(me, Enum.at(history, 1).timestamp, store: store)

      assert Analysis.state_processes(store: store) == [{me, 3}]
      PipelineManager.shutdown(pm)

      # A plain ring gives the struct back as written.
      {:ok, ring} = RingBuffer.new(size: 8)
      :ok = RingBuffer.write(ring, snap)
      assert {:ok, 1} = RingBuffer.write_batch(ring, [snap])
      assert {[^snap, ^snap], 2} = RingBuffer.read_batch(ring, 0, 10)
    end
  end

  describe "replay" do
    test "a pure function matches; a changed one reports the difference" do
      {:ok, _} = ElixirScope.trace(Pure, pids: [self()])
      assert Pure.double(21) == 42
      assert_raise ArgumentError, fn -> Pure.boom(1) end
      {:ok, _} = ElixirScope.stop_trace()

      [call] = Analysis.select(types: [:call], function: :double)
      assert {:ok, r} = Analysis.replay(call)
      assert r.match == true
      assert r.recorded == {:return, 42}
      assert r.replayed == {:return, 42}
      assert r.diff == []

      [boom] = Analysis.select(types: [:call], function: :boom)

      assert {:ok, %{match: true, replayed: {:exception, {:error, %ArgumentError{}}}}} =
               Analysis.replay(boom)

      # The same call in changed code.
      redefine(Pure, """
      defmodule ElixirScope.AnalysisTest.Pure do
        @moduledoc false
        def double(x), do: %{value: x * 3}
        def boom(x), do: x
      end
      """)

      try do
        assert {:ok, r} = Analysis.replay(call)
        assert r.match == false
        assert r.replayed == {:return, %{value: 63}}
        assert r.diff == [{:changed, [{:elem, 1}], 42, %{value: 63}}]
        assert {:ok, %{match: false, replayed: {:return, 1}}} = Analysis.replay(boom)
      after
        redefine(Pure, """
        defmodule ElixirScope.AnalysisTest.Pure do
          @moduledoc false
          def double(x), do: x * 2
          def boom(x), do: raise(ArgumentError, "boom \#{x}")
        end
        """)
      end
    end

    test "what cannot be replayed says why" do
      {:ok, pid} = Account.start(0)
      {:ok, _} = ElixirScope.trace(Account, pids: [self(), pid], payload: :arity)
      Account.deposit(pid, 1)
      {:ok, _} = ElixirScope.stop_trace()
      [call] = Analysis.select(types: [:call], function: :deposit)
      assert Analysis.replay(call) == {:error, :no_arguments}
      [send | _] = Analysis.select(types: [:send])
      assert Analysis.replay(send) == {:error, :not_a_call}
      assert Analysis.replay(999_999_999_999) == {:error, :not_found}
      GenServer.stop(pid)
    end
  end

  describe "bad input" do
    setup do
      {:ok, pid} = Account.start(0)
      {:ok, _} = ElixirScope.trace(Account, pids: [self(), pid])
      Account.deposit(pid, 1)
      {:ok, _} = ElixirScope.stop_trace()
      on_exit(fn -> Process.exit(pid, :kill) end)
      %{server: pid}
    end

    test "dead, untraced and non-OTP processes, times outside the trace", %{server: server} do
      [last] = Analysis.select(types: [:return], function: :handle_call)
      dead = spawn(fn -> :ok end)
      ref = Process.monitor(dead)
      assert_receive {:DOWN, ^ref, _, _, _}
      assert Analysis.state_at(dead, last.timestamp) == {:error, :not_traced}
      assert Analysis.state_history(dead) == {:error, :not_traced}
      # Alive, an OTP process, but never traced.
      {:ok, other} = Account.start(0)
      assert Analysis.state_at(other, last.timestamp) == {:error, :not_traced}
      assert Analysis.state_history(other) == {:error, :not_traced}
      GenServer.stop(other)
      # A non-OTP process: the client is traced but runs no callbacks.
      assert Analysis.state_at(self(), last.timestamp) == {:error, :no_state}
      assert Analysis.state_history(self()) == {:error, :no_state}
      assert Analysis.state_at(server, last.timestamp + 1_000_000_000) == {:error, :outside_trace}
      assert Analysis.state_at(server, -1) == {:error, :outside_trace}

      assert {:ok, _} =
               Analysis.state_at(server, DateTime.utc_now() |> DateTime.add(-3600))
               |> ok_or_outside()

      assert Analysis.state_history(server, from: last.timestamp + 1) == []
      assert [_] = Analysis.state_history(server, limit: 1)
    end

    test "malformed arguments raise ArgumentError" do
      assert_raise ArgumentError, ~r/pid/, fn -> Analysis.state_at(:nope, 1) end
      assert_raise ArgumentError, ~r/time/, fn -> Analysis.state_at(self(), :now) end
      assert_raise ArgumentError, ~r/pid/, fn -> Analysis.state_history("x") end
      assert_raise ArgumentError, fn -> Analysis.state_history(self(), limit: 0) end
      assert_raise ArgumentError, fn -> Analysis.state_history(self(), bogus: 1) end
      assert_raise ArgumentError, ~r/time/, fn -> Analysis.state_history(self(), from: "x") end
      assert_raise ArgumentError, fn -> Analysis.state_at(:not_an_event) end
      assert_raise ArgumentError, fn -> Analysis.why(:x) end
      assert_raise ArgumentError, fn -> Analysis.replay(:x) end
      assert_raise ArgumentError, fn -> Analysis.replay(1, timeout: 0) end
      assert_raise ArgumentError, fn -> Analysis.state_at(self(), 1, store: :x) end

      assert_raise ArgumentError, ~r/state/, fn ->
        ElixirScope.trace(Account, state: :sometimes)
      end

      assert_raise ArgumentError, ~r/max_state_bytes/, fn ->
        ElixirScope.trace(Account, max_state_bytes: 10)
      end
    end
  end

  describe "state_diff" do
    test "a state history as diffs (Diff is tested in analysis/diff_test.exs)" do
      a = %{user: %URI{host: "a", port: 1}, opts: [x: 1, y: 2], log: [3, 2, 1], pair: {1, 2}}

      b = %{
        user: %URI{host: "b", port: 1},
        opts: [x: 1, z: 3],
        log: [4, 3, 2, 1],
        pair: {1, 3},
        new: 0
      }

      changes = Analysis.state_diff(a, b)

      assert changes == [
               {:added, [:log, {:at, 0}], 4},
               {:added, [:new], 0},
               {:removed, [:opts, :y], 2},
               {:added, [:opts, :z], 3},
               {:changed, [:pair, {:elem, 1}], 2, 3},
               {:changed, [:user, :host], "a", "b"}
             ]

      text = Format.format_diff(changes)
      assert text =~ "+ .log[0] 4"
      assert text =~ "~ .user.host \"a\" → \"b\""
      assert text =~ "- .opts.y 2"
      assert Format.format_diff([]) == "(no differences)"
    end
  end

  # Traces a burst of ticks into a tiny ring until some of the server's
  # state records are dropped (at most `tries` bursts); the server's state
  # history and the stop summary.
  defp drop_some_states(pid, tries) do
    {:ok, _} = ElixirScope.trace(Account, pids: [self(), pid], ring_size: 64)
    for _ <- 1..20_000, do: Account.tick(pid)
    # A call: every tick before it has been handled.
    Account.deposit(pid, 0)
    {:ok, s} = ElixirScope.stop_trace()

    cond do
      s.states_dropped > 0 or tries == 1 -> {Analysis.state_history(pid, limit: 100_000), s}
      true -> drop_some_states(pid, tries - 1)
    end
  end

  # Waits until the supervisor has restarted its child (a new pid).
  defp wait_restart(sup, old, n \\ 500) do
    case Supervisor.which_children(sup) do
      [{_, pid, _, _}] when is_pid(pid) and pid != old ->
        pid

      _ when n > 0 ->
        Process.sleep(2)
        wait_restart(sup, old, n - 1)
    end
  end

  defp ok_or_outside({:ok, _} = ok), do: ok
  defp ok_or_outside({:error, :outside_trace}), do: {:ok, :outside}

  defp redefine(module, source) do
    :code.purge(module)
    :code.delete(module)
    Code.compiler_options(ignore_module_conflict: true)

    try do
      Code.compile_string(source)
    after
      Code.compiler_options(ignore_module_conflict: false)
    end
  end
end

defmodule ElixirScope.Capture.TemporalBridgeTraceTest.Counter do
  @moduledoc false
  # A GenServer with a known sequence of states.
  use GenServer

  def start(n), do: GenServer.start(__MODULE__, n)
  def add(pid, k), do: GenServer.call(pid, {:add, k})
  def label(pid, l), do: GenServer.cast(pid, {:label, l})

  @impl true
  def init(n), do: {:ok, %{n: n, label: nil}}

  @impl true
  def handle_call({:add, k}, _from, s), do: {:reply, s.n + k, %{s | n: s.n + k}}

  @impl true
  def handle_cast({:label, l}, s), do: {:noreply, %{s | label: l}}
end

defmodule ElixirScope.Capture.TemporalBridgeTraceTest do
  # TemporalBridge.reconstruct_state_at/2 over a trace: the time-travel
  # answer for traced processes. Not async: traces are node-wide.
  use ExUnit.Case, async: false

  alias ElixirScope.Analysis
  alias ElixirScope.Capture.TemporalBridge
  alias ElixirScope.Capture.TemporalBridgeTraceTest.Counter

  setup do
    on_exit(fn -> ElixirScope.stop_trace() end)
    {:ok, pid} = Counter.start(10)
    {:ok, _} = ElixirScope.trace(Counter, pids: [pid])
    assert Counter.add(pid, 5) == 15
    Counter.label(pid, "x")
    assert Counter.add(pid, 2) == 17
    {:ok, _} = ElixirScope.stop_trace()
    on_exit(fn -> Process.exit(pid, :kill) end)
    history = Analysis.state_history(pid)
    # The snapshot at the start of the trace, then one per callback.
    assert Enum.map(history, & &1.state) == [
             %{n: 10, label: nil},
             %{n: 15, label: nil},
             %{n: 15, label: "x"},
             %{n: 17, label: "x"}
           ]

    %{pid: pid, history: history, store: ElixirScope.trace_store()}
  end

  test "a bridge fed from a trace answers the traced GenServer's state at any time", ctx do
    {:ok, b} = TemporalBridge.start_link(flush_interval: 60_000)
    calls = Analysis.select(types: [:call, :return, :exception])
    assert {:ok, n} = TemporalBridge.feed_trace(b)
    assert n == length(calls) and n > 0
    {:ok, stats} = TemporalBridge.get_stats(b)
    assert stats.events_stored == n and stats.events_buffered == 0

    for st <- ctx.history do
      assert {:ok, state} = TemporalBridge.reconstruct_state_at(b, st.timestamp)
      assert state[ctx.pid] == st.state
      assert TemporalBridge.process_state_at(b, ctx.pid, st.timestamp) == {:ok, st}

      assert TemporalBridge.process_state_at(b, ctx.pid, st.timestamp) ==
               Analysis.state_at(ctx.pid, st.timestamp)
    end

    # Between two records: the earlier one is in force.
    [_, second, third | _] = ctx.history
    t = div(second.timestamp + third.timestamp, 2)
    assert {:ok, %{} = state} = TemporalBridge.reconstruct_state_at(b, t)
    if t < third.timestamp, do: assert(state[ctx.pid] == second.state)

    # The replayed calls are there too, as in the original's answer: the
    # callbacks that returned are completed, with the call's id.
    last = List.last(ctx.history)
    {:ok, state} = TemporalBridge.reconstruct_state_at(b, last.timestamp + 1_000_000_000)
    key = "#{Counter}.handle_call"
    assert %{status: :completed, correlation_id: cid} = state[key]
    assert {:ok, [entry | _]} = TemporalBridge.get_events_for_correlation(b, cid)
    assert entry.data.event_type == :function_entry and entry.data.pid == ctx.pid

    # Before the first state record the process has no key.
    first = hd(ctx.history)
    {:ok, before} = TemporalBridge.reconstruct_state_at(b, first.timestamp - 1)
    refute Map.has_key?(before, ctx.pid)
  end

  test ":store, :pipeline and :trace give the bridge a trace without feeding it", ctx do
    last = List.last(ctx.history)

    {:ok, b1} = TemporalBridge.start_link(store: ctx.store, flush_interval: 60_000)
    {:ok, b2} = TemporalBridge.start_link(store: :trace, flush_interval: 60_000)

    {:ok, b3} =
      TemporalBridge.start_link(pipeline: ElixirScope.trace_pipeline(), flush_interval: 60_000)

    for b <- [b1, b2, b3] do
      # The bridge's own events stay in the answer, beside the process.
      :ok =
        TemporalBridge.correlate_event(b, %{
          timestamp: last.timestamp,
          event_type: :state_change,
          pid: ctx.pid,
          data: %{state: %{seen: true}}
        })

      assert {:ok, state} = TemporalBridge.reconstruct_state_at(b, last.timestamp)
      assert state[ctx.pid] == last.state
      assert state.seen == true
      assert {:ok, ^last} = TemporalBridge.process_state_at(b, ctx.pid, last.timestamp)
    end

    # A store given at start is kept when a trace is fed.
    {:ok, other} = ElixirScope.Storage.DataAccess.new(max_events: 16)
    {:ok, 0} = TemporalBridge.feed_trace(b1, store: other)
    assert {:ok, ^last} = TemporalBridge.process_state_at(b1, ctx.pid, last.timestamp)
  end

  test "without a trace store the answer is the original's replay alone", ctx do
    last = List.last(ctx.history)
    {:ok, b} = TemporalBridge.start_link(flush_interval: 60_000)
    :ok = TemporalBridge.correlate_event(b, %{timestamp: last.timestamp, pid: ctx.pid})
    assert {:ok, state} = TemporalBridge.reconstruct_state_at(b, last.timestamp)
    assert state == %{}

    assert TemporalBridge.process_state_at(b, ctx.pid, last.timestamp) ==
             {:error, :no_trace_store}

    # A process the trace does not know: state_at's answer.
    {:ok, b} = TemporalBridge.start_link(store: ctx.store)

    assert TemporalBridge.process_state_at(b, self(), last.timestamp) ==
             Analysis.state_at(self(), last.timestamp, store: ctx.store)
  end

  test "bad options and arguments raise ArgumentError", ctx do
    for opts <- [
          [store: :nope],
          [store: %{}],
          [pipeline: :no_such_pipeline],
          [store: ctx.store, pipeline: ElixirScope.trace_pipeline()]
        ] do
      assert_raise ArgumentError, fn -> TemporalBridge.start_link(opts) end
    end

    {:ok, b} = TemporalBridge.start_link()
    assert_raise ArgumentError, fn -> TemporalBridge.feed_trace(b, store: :x) end
    assert_raise ArgumentError, fn -> TemporalBridge.feed_trace(b, nope: 1) end
    assert_raise ArgumentError, fn -> TemporalBridge.feed_trace(b, :bad) end
    assert_raise ArgumentError, fn -> TemporalBridge.process_state_at(b, :x, 1) end
    assert_raise ArgumentError, fn -> TemporalBridge.process_state_at(b, self(), 1.5) end
    assert_raise ArgumentError, fn -> TemporalBridge.feed_trace(:no_such_bridge) end
  end
end

defmodule ElixirScope.Capture.PipelineE2ETest do
  # End-to-end tests of the native capture pipeline: many processes ingest
  # through `Ingestor` into one `PipelineManager` (sharded ring → native
  # workers → correlator → store); after `flush/2` the store is checked
  # against the ground truth each producing process recorded (see
  # `ElixirScope.PipelineTestHelpers`).
  #
  # Cross-process interleaving across shards is not deterministic, so only
  # what one process's own events determine is asserted exactly (parents,
  # roots, call/return matching, per-process order); send → receive matching
  # is checked with properties that hold for any processing order.
  #
  # Every pipeline is unnamed, so the module can run concurrently with
  # others.
  use ExUnit.Case, async: true

  import Bitwise, only: [<<<: 2]
  import ElixirScope.PipelineTestHelpers

  alias ElixirScope.Capture.{AsyncWriterPool, Ingestor, PipelineManager}
  alias ElixirScope.Capture.PipelineManager.Server
  alias ElixirScope.Events.{FunctionExecution, StateChange}
  alias ElixirScope.Native
  alias ElixirScope.Storage.DataAccess

  @moduletag timeout: 120_000

  # Every correlation type is compared.
  @skip_types []

  defp base_seed do
    case System.get_env("PIPELINE_E2E_SEED") do
      nil -> ExUnit.configuration()[:seed] || 0
      s -> String.to_integer(s)
    end
  end

  # ===========================================================================
  # 1. End to end: 60 processes, nested calls, messages between them
  # ===========================================================================

  describe "end to end" do
    test "60 processes with nested calls and messages: parents, roots, returns and receives" do
      seed = base_seed()

      pm =
        start_pipeline!(
          shards: 8,
          ring_size: 16_384,
          async_writer_pool_size: 3,
          batch_size: 5,
          flush_interval_us: 200
        )

      buf = PipelineManager.ring_buffer(pm)
      me = self()
      n = 60

      tasks = for _ <- 1..n, do: Task.async(fn -> e2e_worker(buf, me) end)
      pids = Enum.map(tasks, & &1.pid)

      tasks
      |> Enum.with_index()
      |> Enum.each(fn {t, i} -> send(t.pid, {:go, pids, {seed, i}}) end)

      # Every worker tells how many messages it sent to whom; then each is
      # told how many to expect, so it can receive (and ingest) all of them.
      sent =
        for _ <- 1..n do
          assert_receive {:sent, _pid, counts}, 30_000
          counts
        end

      incoming = Enum.reduce(sent, %{}, &Map.merge(&1, &2, fn _, a, b -> a + b end))
      Enum.each(pids, &send(&1, {:expect, Map.get(incoming, &1, 0)}))

      logs =
        tasks
        |> Task.await_many(60_000)
        |> Enum.zip(pids)
        |> Map.new(fn {log, pid} -> {pid, log} end)

      assert :ok = PipelineManager.flush(pm, 30_000)
      store = PipelineManager.data_access(pm)
      total = logs |> Map.values() |> Enum.map(&length/1) |> Enum.sum()

      # Each process's events, in ingest order, content and all (3: order).
      paired = pair_logs!(store, logs)

      # Parents, roots, call/return matching against the model.
      %{sends: sends, receives: receives, correlated: corr} =
        check_correlations!(store, paired, skip_types: @skip_types)

      # Every receive was preceded by its send: all are linked, also
      # those whose send a worker correlated first (late links).
      native = PipelineManager.get_metrics(pm).native
      assert native.engine.late_link_misses == 0
      {linked, lost} = check_receives!(sends, receives)
      assert lost == 0
      assert linked == length(receives)
      assert length(receives) == length(sends)
      assert receives != [] and Enum.any?(receives, &match?({:ping, _}, &1.msg))

      # Every call has exactly one return, which completes it.
      calls = for {_, evs} <- paired, {{:call, _, _, _, _}, ev} <- evs, do: ev.id

      completions =
        for {_, evs} <- paired,
            {op, ev} <- evs,
            elem(op, 0) in [:return, :exception],
            do: corr[ev.id].links

      assert length(completions) == length(calls)
      assert Enum.sort(for [completes: c] <- completions, do: c) == Enum.sort(calls)

      # Queries built on the correlation: causal_chain, children,
      # call_contents, query_by_correlation.
      check_derived_queries!(store, paired, corr)

      for r <- Enum.take(receives, 300), match?([receives: _], r.c.links) do
        [receives: sid] = r.c.links
        {:ok, evs} = DataAccess.query_by_correlation(store, sid)
        assert Enum.map(evs, & &1.id) |> Enum.sort() == Enum.sort([sid, r.id])
      end

      # Correlator counters agree.
      assert native.correlator.calls == length(calls)
      assert native.correlator.returns == length(calls)
      assert native.correlator.unmatched_returns == 0
      assert native.correlator.unwound_frames == 0
      assert native.correlator.sends == length(sends)
      assert native.correlator.receives == length(receives)
      assert native.correlator.matched_receives == length(receives)

      acc = assert_exact_accounting!(pm)
      assert acc.accepted == total
      assert acc.stored == acc.accepted
      assert acc.buffer_full == 0
      assert total > 1000
    end
  end

  # One e2e process: a few call trees of depth 1..5 (recursion included),
  # sending to random peers and receiving what arrived at random points;
  # then it receives whatever is still owed to it, inside a last call.
  defp e2e_worker(buf, coordinator) do
    {peers, {seed, i}} =
      receive do
        {:go, peers, seed} -> {peers, seed}
      end

    :rand.seed(:exsss, {seed, i, 7919})
    Process.put(:e2e_peers, List.to_tuple(peers))
    Process.put(:e2e_received, 0)
    Process.put(:e2e_sent, %{})

    for _ <- 1..(2 + :rand.uniform(2)) do
      e2e_call(buf, :rand.uniform(5), Enum.random([:alpha, :beta]))
    end

    send(coordinator, {:sent, self(), Process.get(:e2e_sent)})

    expect =
      receive do
        {:expect, n} -> n
      end

    ref = make_ref()
    record!(buf, {:call, E2E, :drain, [expect], ref})
    e2e_drain(buf, expect)
    record!(buf, {:return, :drained, ref})
    {log, 0} = take_log()
    log
  end

  defp e2e_call(buf, depth, fun) do
    ref = make_ref()
    record!(buf, {:call, E2E, fun, [depth], ref})

    # The first action nests when it can, so each tree reaches its depth;
    # half the nested calls recurse into the same function.
    if depth > 1 do
      e2e_call(buf, depth - 1, Enum.random([fun, :alpha, :beta, :gamma]))
    end

    for _ <- 1..:rand.uniform(4) do
      case :rand.uniform(10) do
        r when r <= 2 and depth > 1 -> e2e_call(buf, depth - 1, fun)
        r when r <= 5 -> e2e_send(buf)
        r when r <= 8 -> e2e_try_receive(buf)
        _ -> record!(buf, {:state, depth, depth + :rand.uniform(2) - 1})
      end
    end

    if :rand.uniform(8) == 1,
      do: record!(buf, {:exception, :error, {:boom, depth}, ref}),
      else: record!(buf, {:return, {:ok, depth}, ref})
  end

  defp e2e_send(buf) do
    peers = Process.get(:e2e_peers)
    peer = elem(peers, :rand.uniform(tuple_size(peers)) - 1)

    # Identical messages from many senders ({:ping, k}), and repeats.
    msg =
      if :rand.uniform(2) == 1,
        do: {:ping, :rand.uniform(3)},
        else: {:data, self(), System.unique_integer([:positive])}

    times = if :rand.uniform(5) == 1, do: 2, else: 1

    for _ <- 1..times do
      record!(buf, {:send, peer, msg})
      send(peer, {:app, msg})
      Process.put(:e2e_sent, Map.update(Process.get(:e2e_sent), peer, 1, &(&1 + 1)))
    end
  end

  defp e2e_try_receive(buf) do
    receive do
      {:app, msg} ->
        record!(buf, {:receive, msg})
        Process.put(:e2e_received, Process.get(:e2e_received) + 1)
    after
      0 -> :ok
    end
  end

  defp e2e_drain(buf, expect) do
    if Process.get(:e2e_received) < expect do
      receive do
        {:app, msg} ->
          record!(buf, {:receive, msg})
          Process.put(:e2e_received, Process.get(:e2e_received) + 1)
      after
        30_000 -> raise "#{inspect(self())} still expects messages"
      end

      e2e_drain(buf, expect)
    end
  end

  # causal_chain/2 of every event, children/3 and call_contents/3 of every
  # call, query_by_correlation/2 of every call, against the correlation the
  # model confirmed (properly nested calls: a call's contents are the slice
  # of its process's events from the call to its return).
  defp check_derived_queries!(store, paired, corr) do
    for {_pid, evs} <- paired do
      ids = Enum.map(evs, fn {_, ev} -> ev.id end)
      index = ids |> Enum.with_index() |> Map.new()

      for id <- ids do
        {:ok, chain} = DataAccess.causal_chain(store, id)
        assert Enum.map(chain, & &1.id) == expected_chain(corr, id), "causal_chain of #{id}"
      end

      calls = for {{:call, _, _, _, _}, ev} <- evs, do: ev.id

      returns =
        for {op, ev} <- evs, elem(op, 0) in [:return, :exception], into: %{} do
          [completes: c] = corr[ev.id].links
          {c, ev.id}
        end

      for call <- calls do
        {:ok, kids} = DataAccess.children(store, call)
        want = for id <- ids, corr[id].parent_id == call, do: id
        assert Enum.map(kids, & &1.id) == want, "children of #{call}"

        {:ok, contents} = DataAccess.call_contents(store, call)
        ret = Map.fetch!(returns, call)
        slice = Enum.slice(ids, index[call]..index[ret])
        assert Enum.map(contents, & &1.id) == slice, "call_contents of #{call}"

        {:ok, same} = DataAccess.query_by_correlation(store, call)
        assert Enum.map(same, & &1.id) == [call, ret], "query_by_correlation of #{call}"
      end
    end
  end

  defp expected_chain(corr, id) do
    case corr[id].parent_id do
      nil -> [id]
      parent -> expected_chain(corr, parent) ++ [id]
    end
  end

  # ===========================================================================
  # 2. Property: random interleavings against the reference model
  # ===========================================================================

  describe "property" do
    test "random interleavings of every event kind agree with the reference model (30 seeds)" do
      seeds =
        case System.get_env("PIPELINE_E2E_SEED") do
          nil -> Enum.map(0..29, &(base_seed() * 100 + &1))
          s -> [String.to_integer(s)]
        end

      for seed <- seeds do
        try do
          run_property(seed)
        rescue
          e in ExUnit.AssertionError ->
            reraise %{
                      e
                      | message:
                          "[property seed #{seed}; rerun with PIPELINE_E2E_SEED=#{seed}] " <>
                            e.message
                    },
                    __STACKTRACE__
        end
      end
    end
  end

  # Immediate keys (atoms, small integers) and hashed ones (tuples,
  # binaries, bignums, floats, lists).
  @prop_keys [:a, :b, 1, 2, nil, {:t, 1}, "s", 1 <<< 70, 1.5, [1, 2]]
  @prop_msgs [{:m, 1}, {:m, 2}, :ping]

  defp run_property(seed) do
    :rand.seed(:exsss, {seed, 31, 337})
    n_actors = 1 + :rand.uniform(6)
    n_ops = 200 + :rand.uniform(400)

    config = [
      name: nil,
      shards: Enum.random([1, 2, 4, 7]),
      ring_size: 1024,
      async_writer_pool_size: :rand.uniform(3),
      batch_size: :rand.uniform(9),
      flush_interval_us: 200,
      max_events: 100_000
    ]

    {:ok, pm} = PipelineManager.start_link(config)

    try do
      buf = PipelineManager.ring_buffer(pm)
      actors = for _ <- 1..n_actors, do: Task.async(fn -> prop_actor(buf) end)
      pids = actors |> Enum.map(& &1.pid) |> List.to_tuple()

      # The schedule runs in rounds of `chunk` ops: within a round the
      # actors run concurrently (each its own ops in order), rounds are
      # separated by a barrier. Chunk 1 is a strict global interleaving.
      chunk = Enum.random([1, 4, 16, 64])

      gen_schedule(pids, n_ops)
      |> Enum.chunk_every(chunk)
      |> Enum.each(fn round ->
        by_actor = Enum.group_by(round, &elem(&1, 0), &elem(&1, 1))
        for {a, ops} <- by_actor, do: send(elem(pids, a), {:ops, self(), ops})

        for {a, _} <- by_actor do
          pid = elem(pids, a)
          assert_receive {:done, ^pid}, 10_000
        end
      end)

      Enum.each(actors, &send(&1.pid, :finish))

      logs =
        actors
        |> Task.await_many(10_000)
        |> Enum.zip(Tuple.to_list(pids))
        |> Map.new(fn {log, pid} -> {pid, log} end)

      assert :ok = PipelineManager.flush(pm, 10_000)
      store = PipelineManager.data_access(pm)

      paired = pair_logs!(store, logs)

      %{sends: sends, receives: receives} =
        check_correlations!(store, paired, skip_types: @skip_types)

      native = PipelineManager.get_metrics(pm).native
      assert native.engine.late_link_misses == 0
      {linked, lost} = check_receives!(sends, receives)

      stats = model_stats(logs)
      c = native.correlator
      assert c.calls == stats.calls
      assert c.returns == stats.returns
      assert c.unmatched_returns == stats.unmatched
      assert c.unwound_frames == stats.unwound
      assert c.orphaned_calls == stats.orphaned
      assert c.sends == length(sends)
      assert c.receives == length(receives)
      assert c.matched_receives == linked + lost

      acc = assert_exact_accounting!(pm)
      total = logs |> Map.values() |> Enum.map(&length/1) |> Enum.sum()
      assert acc.accepted == total
      assert acc.stored == total
    after
      PipelineManager.shutdown(pm)
    end
  end

  defp prop_actor(buf) do
    receive do
      {:ops, from, ops} ->
        Enum.each(ops, fn
          {:spawn, :new} -> record!(buf, {:spawn, spawn(fn -> :ok end)})
          op -> record!(buf, op)
        end)

        send(from, {:done, self()})
        prop_actor(buf)

      :finish ->
        {log, 0} = take_log()
        log
    end
  end

  # A random schedule `[{actor_index, op}]`. The generator keeps a model of
  # each actor's open call keys and of the messages sent to it and not yet
  # received, so returns mostly complete an open call (sometimes one below
  # the top, sometimes none) and receives mostly take a message that was
  # sent. Also: receives of messages never sent, and receives whose send
  # comes later ("early"), possibly never.
  defp gen_schedule(pids, n_ops) do
    n = tuple_size(pids)
    idx = for i <- 0..(n - 1), into: %{}, do: {i, []}
    st = %{stacks: idx, mail: idx, early: [], k: 0, pids: pids, n: n}

    {ops, st} =
      Enum.flat_map_reduce(1..n_ops, st, fn _, st ->
        st = %{st | k: st.k + 1}
        gen_op(st, :rand.uniform(n) - 1, :rand.uniform(100))
      end)

    late =
      for {from, to, msg} <- st.early,
          :rand.uniform(2) == 1,
          do: {from, {:send, elem(pids, to), msg}}

    ops ++ late
  end

  defp gen_op(st, a, roll) when roll <= 25 do
    key =
      case :rand.uniform(10) do
        r when r <= 5 -> Enum.random(@prop_keys)
        # a pid as correlation id (an immediate)
        6 -> elem(st.pids, :rand.uniform(st.n) - 1)
        _ -> {:u, st.k}
      end

    op = {:call, Enum.random([PropA, PropB]), Enum.random([:f, :g]), [st.k], key}
    {[{a, op}], update_in(st.stacks[a], &[key | &1])}
  end

  defp gen_op(st, a, roll) when roll <= 50 do
    stack = st.stacks[a]
    r = :rand.uniform(100)

    key =
      cond do
        stack == [] or r <= 10 ->
          Enum.random(Enum.reject(@prop_keys, &(&1 in stack)) ++ [{:none, st.k}])

        r <= 25 ->
          Enum.random(stack)

        true ->
          hd(stack)
      end

    op =
      if roll <= 45,
        do: {:return, {:v, st.k}, key},
        else: {:exception, Enum.random([:error, :exit, :throw]), {:r, st.k}, key}

    stack =
      case Enum.split_while(stack, &(&1 !== key)) do
        {_, [_ | below]} -> below
        {_, []} -> stack
      end

    {[{a, op}], put_in(st.stacks[a], stack)}
  end

  defp gen_op(st, a, roll) when roll <= 63 do
    to = :rand.uniform(st.n) - 1
    msg = if :rand.uniform(5) <= 3, do: Enum.random(@prop_msgs), else: {:u, st.k}
    {[{a, {:send, elem(st.pids, to), msg}}], update_in(st.mail[to], &(&1 ++ [msg]))}
  end

  defp gen_op(st, a, roll) when roll <= 78 do
    mail = st.mail[a]
    r = :rand.uniform(100)

    cond do
      mail != [] and r <= 85 ->
        i = :rand.uniform(length(mail)) - 1
        {[{a, {:receive, Enum.at(mail, i)}}], put_in(st.mail[a], List.delete_at(mail, i))}

      r <= 93 ->
        {[{a, {:receive, {:orphan, st.k}}}], st}

      true ->
        msg = {:early, st.k}
        {[{a, {:receive, msg}}], %{st | early: [{:rand.uniform(st.n) - 1, a, msg} | st.early]}}
    end
  end

  defp gen_op(st, a, roll) when roll <= 82, do: {[{a, {:spawn, :new}}], st}

  defp gen_op(st, a, roll) when roll <= 85 do
    reason = Enum.random([:normal, :shutdown, {:shutdown, st.k}])
    {[{a, {:exit, reason}}], put_in(st.stacks[a], [])}
  end

  defp gen_op(%{early: []} = st, a, _roll), do: gen_state(st, a)
  defp gen_op(st, a, roll) when roll <= 92, do: gen_state(st, a)

  defp gen_op(st, _a, _roll) do
    [{from, to, msg} | rest] = Enum.shuffle(st.early)
    {[{from, {:send, elem(st.pids, to), msg}}], %{st | early: rest}}
  end

  defp gen_state(st, a), do: {[{a, {:state, st.k, st.k + :rand.uniform(2) - 1}}], st}

  # Per-process counters the correlator must agree with.
  defp model_stats(logs) do
    zero = %{calls: 0, returns: 0, unmatched: 0, unwound: 0, orphaned: 0}

    Enum.reduce(logs, zero, fn {_pid, ops}, acc ->
      {acc, _} =
        Enum.reduce(ops, {acc, []}, fn
          {:call, _, _, _, key}, {acc, stack} ->
            {%{acc | calls: acc.calls + 1}, [key | stack]}

          {:exit, _}, {acc, stack} ->
            {%{acc | orphaned: acc.orphaned + length(stack)}, []}

          op, {acc, stack} when elem(op, 0) in [:return, :exception] ->
            key = elem(op, tuple_size(op) - 1)
            acc = %{acc | returns: acc.returns + 1}

            case Enum.split_while(stack, &(&1 !== key)) do
              {above, [_ | below]} -> {%{acc | unwound: acc.unwound + length(above)}, below}
              {_, []} -> {%{acc | unmatched: acc.unmatched + 1}, stack}
            end

          _, state ->
            state
        end)

      acc
    end)
  end

  # ===========================================================================
  # 3. Per-process order
  # ===========================================================================

  describe "per-process order" do
    test "each process's stored events are in ingest order (asc and desc)" do
      pm = start_pipeline!(shards: 4, ring_size: 8192, async_writer_pool_size: 3, batch_size: 3)

      buf = PipelineManager.ring_buffer(pm)

      tasks =
        for p <- 1..16 do
          Task.async(fn ->
            for i <- 1..400 do
              case rem(i + p, 4) do
                0 -> record!(buf, {:call, Order, :f, [i], i})
                1 -> record!(buf, {:return, i, i - 1})
                2 -> record!(buf, {:send, self(), {:seq, i}})
                3 -> record!(buf, {:state, i, i})
              end
            end

            {log, 0} = take_log()
            {self(), log}
          end)
        end

      logs = tasks |> Task.await_many(30_000) |> Map.new()
      assert :ok = PipelineManager.flush(pm, 10_000)
      store = PipelineManager.data_access(pm)

      paired = pair_logs!(store, logs)

      for {pid, evs} <- paired do
        asc = Enum.map(evs, fn {_, ev} -> ev end)
        assert events_of(store, pid, :desc) == Enum.reverse(asc)
        ids = Enum.map(asc, & &1.id)
        assert ids == Enum.sort(ids), "ids of #{inspect(pid)} not increasing"
      end

      acc = assert_exact_accounting!(pm)
      assert acc.stored == 16 * 400
    end
  end

  # ===========================================================================
  # 4. Faults
  # ===========================================================================

  describe "faults: injected stage failures" do
    test "one injected failure: the batch is retried and every event stored once" do
      pm = start_pipeline!(shards: 2, async_writer_pool_size: 1, batch_size: 10)
      buf = PipelineManager.ring_buffer(pm)
      :ok = Native.pipe_inject_failures(PipelineManager.handles(pm).pipe, 1)

      for i <- 1..50 do
        record!(buf, {:call, Fault, :f, [i], i})
        record!(buf, {:return, i, i})
      end

      {log, 0} = take_log()
      assert :ok = PipelineManager.flush(pm)
      store = PipelineManager.data_access(pm)

      paired = pair_logs!(store, %{self() => log})
      check_correlations!(store, paired)

      m = PipelineManager.get_metrics(pm)
      assert m.native.pool.panics == 1
      assert m.native.pool.retries == 1
      assert PipelineManager.dead_letters(pm) == []
      acc = assert_exact_accounting!(pm)
      assert {acc.stored, acc.dead_lettered, acc.duplicates} == {100, 0, 0}
    end

    test "many injected failures: batches are dead-lettered with their events, then the pipeline recovers" do
      # One shard, one worker: batches are consumed one after the other, and
      # each failing batch takes two injections (attempt + retry). 9
      # injections: 4 batches dead-lettered, the 5th fails once and is
      # stored on retry.
      pm = start_pipeline!(shards: 1, async_writer_pool_size: 1, batch_size: 4)
      buf = PipelineManager.ring_buffer(pm)
      :ok = Native.pipe_inject_failures(PipelineManager.handles(pm).pipe, 9)

      for i <- 1..50 do
        record!(buf, {:call, Fault, :f, [i], i})
        record!(buf, {:return, i, i})
      end

      {log, 0} = take_log()
      assert :ok = PipelineManager.flush(pm)
      store = PipelineManager.data_access(pm)

      letters = PipelineManager.dead_letters(pm)
      assert length(letters) == 4

      dead =
        Enum.flat_map(letters, fn {reason, shard, first, events} ->
          assert reason =~ "injected stage failure"
          assert shard == 0
          assert events != [] and length(events) <= 4
          # One producer on one shard from position 0: position p holds op p.
          for {ev, p} <- Enum.with_index(events, first) do
            assert matches?(Enum.at(log, p), self(), ev),
                   "dead letter at position #{p}: #{inspect(ev)} is not #{inspect(Enum.at(log, p))}"

            p
          end
        end)

      positions = letters |> Enum.map(&elem(&1, 2))
      assert positions == Enum.sort(positions)

      m = PipelineManager.get_metrics(pm)
      assert m.native.pool.panics == 9
      assert m.native.pool.retries == 5
      assert m.native.pool.dead_lettered_events == length(dead)

      acc = assert_exact_accounting!(pm)
      assert acc.dead_lettered == length(dead)
      assert acc.stored + acc.dead_lettered == acc.accepted
      assert acc.accepted == 100
      assert PipelineManager.health_check(pm).status == :degraded

      # What was not dead-lettered is stored, correlated as if the dead
      # events had never happened (the correlator never saw them).
      dead_set = MapSet.new(dead)
      survivors = for {op, p} <- Enum.with_index(log), p not in dead_set, do: op
      paired = pair_logs!(store, %{self() => survivors})
      check_correlations!(store, paired)

      # Recovery: injections are used up.
      for i <- 51..80 do
        record!(buf, {:call, Fault, :g, [i], {:again, i}})
        record!(buf, {:return, i, {:again, i}})
      end

      {more, 0} = take_log()
      assert :ok = PipelineManager.flush(pm)
      paired = pair_logs!(store, %{self() => survivors ++ more})
      check_correlations!(store, paired)
      assert length(PipelineManager.dead_letters(pm)) == 4
      acc = assert_exact_accounting!(pm)
      assert acc.stored == length(survivors) + 60
      assert acc.dead_lettered == length(dead)
    end

    test "dead letters beyond :max_dead_letters are dropped from the queue but still counted" do
      pm =
        start_pipeline!(
          shards: 1,
          async_writer_pool_size: 1,
          batch_size: 2,
          max_dead_letters: 2,
          # Every failing batch reaches the stage (the breaker has its own test).
          breaker_threshold: 0
        )

      buf = PipelineManager.ring_buffer(pm)
      :ok = Native.pipe_inject_failures(PipelineManager.handles(pm).pipe, 12)
      for i <- 1..40, do: record!(buf, {:state, i, i})
      {log, 0} = take_log()
      assert :ok = PipelineManager.flush(pm)

      m = PipelineManager.get_metrics(pm)
      assert m.native.pool.panics == 12
      assert m.native.pool.dead_letter_overflow == 4
      letters = PipelineManager.dead_letters(pm)
      assert length(letters) == 2
      assert [{_, _, _, _}] = PipelineManager.dead_letters(pm, 1)

      acc = assert_exact_accounting!(pm)
      assert acc.accepted == length(log)
      assert acc.dead_lettered == m.native.pool.dead_lettered_events
      assert acc.dead_lettered >= 6 and acc.dead_lettered <= 12
      assert acc.stored == length(log) - acc.dead_lettered

      # The two kept letters are the newest dead batches.
      stored = for ev <- events_of(PipelineManager.data_access(pm), self()), do: ev.old_state
      kept = for {_, _, _, evs} <- letters, ev <- evs, do: ev.old_state
      assert kept == Enum.sort(kept)
      assert Enum.all?(stored, &(&1 > List.last(kept)))
    end
  end

  describe "faults: killed children" do
    test "killing the Server and the AsyncWriterPool loses no events" do
      pm = start_pipeline!(shards: 4, ring_size: 8192, async_writer_pool_size: 2, batch_size: 8)

      buf = PipelineManager.ring_buffer(pm)
      handles = PipelineManager.handles(pm)
      load = start_load(buf, 4)
      Process.sleep(20)

      server = child_pid(pm, Server)
      ref = Process.monitor(server)
      Process.exit(server, :kill)
      assert_receive {:DOWN, ^ref, :process, ^server, :killed}
      new_server = child_pid(pm, Server, server)
      assert new_server != server
      # The restarted server took over the running pipeline.
      assert PipelineManager.handles(pm) == handles
      assert PipelineManager.get_state(pm).status == :running
      Process.sleep(20)

      pool = child_pid(pm, AsyncWriterPool)
      ref = Process.monitor(pool)
      Process.exit(pool, :kill)
      assert_receive {:DOWN, ^ref, :process, ^pool, :killed}
      new_pool = child_pid(pm, AsyncWriterPool, pool)
      assert AsyncWriterPool.get_state(new_pool).pool_size == 2
      Process.sleep(20)

      {logs, refused} = stop_load(load)
      assert :ok = PipelineManager.flush(pm, 30_000)
      store = PipelineManager.data_access(pm)

      # Order and content of every event; correlation of every event of
      # three producers (their messages go to themselves, so their
      # receives are checked completely) to keep the NIF calls bounded.
      paired = pair_logs!(store, logs)
      checked = Map.take(paired, paired |> Map.keys() |> Enum.take(3))
      %{sends: s, receives: r} = check_correlations!(store, checked, skip_types: @skip_types)
      assert PipelineManager.get_metrics(pm).native.engine.late_link_misses == 0
      check_receives!(s, r)

      acc = assert_exact_accounting!(pm)
      total = logs |> Map.values() |> Enum.map(&length/1) |> Enum.sum()
      assert acc.accepted == total
      assert acc.stored == total
      assert acc.buffer_full == refused
      assert total > 0

      health = PipelineManager.health_check(pm)
      # Server, AsyncWriterPool, QueryCoordinator.Server, BackpressureManager.
      assert health.children_alive == 4
      assert health.active_workers == 2
    end
  end

  describe "faults: scaling under load" do
    test "resizing the worker pool 1→4→2→1 (and the batch size) under 8 producers stores every event once, in order" do
      pm = start_pipeline!(shards: 8, ring_size: 8192, async_writer_pool_size: 2, batch_size: 16)

      buf = PipelineManager.ring_buffer(pm)
      load = start_load(buf, 8)

      for round <- 1..3, n <- [1, 4, 2, 1] do
        assert :ok = PipelineManager.update_config(pm, %{async_writer_pool_size: n})
        assert PipelineManager.get_metrics(pm).native.pool.workers == n

        if n == 4 do
          batch = Enum.at([1, 64, 5], round - 1)
          assert :ok = PipelineManager.update_config(pm, batch_size: batch)
        end

        Process.sleep(8)
      end

      {logs, refused} = stop_load(load)
      assert :ok = PipelineManager.flush(pm, 30_000)
      store = PipelineManager.data_access(pm)

      # Order and content of every event; correlation of every event of
      # three producers (their messages go to themselves, so their
      # receives are checked completely) to keep the NIF calls bounded.
      paired = pair_logs!(store, logs)
      checked = Map.take(paired, paired |> Map.keys() |> Enum.take(3))
      %{sends: s, receives: r} = check_correlations!(store, checked, skip_types: @skip_types)
      assert PipelineManager.get_metrics(pm).native.engine.late_link_misses == 0
      check_receives!(s, r)

      ids = for {_, evs} <- paired, {_, ev} <- evs, do: ev.id
      assert length(ids) == length(Enum.uniq(ids))

      acc = assert_exact_accounting!(pm)
      assert acc.accepted == length(ids)
      assert acc.stored == length(ids)
      assert acc.duplicates == 0
      assert acc.buffer_full == refused
      assert PipelineManager.get_metrics(pm).native.pool.workers == 1
    end
  end

  # Producers writing "units" (a call with a nested call, a state change, a
  # message to itself and its receive, the two returns) until told to stop.
  # Refused writes are counted, not logged.
  defp start_load(buf, n) do
    for _ <- 1..n, do: Task.async(fn -> load_loop(buf, 0) end)
  end

  defp load_loop(buf, i) do
    receive do
      :stop -> {self(), take_log()}
    after
      0 ->
        outer = make_ref()
        inner = make_ref()
        try_record(buf, {:call, Load, :unit, [i], outer})
        try_record(buf, {:call, Load, :inner, [i], inner})
        try_record(buf, {:state, i, i + 1})
        try_record(buf, {:send, self(), {:tick, rem(i, 3)}})
        try_record(buf, {:receive, {:tick, rem(i, 3)}})
        try_record(buf, {:return, i, inner})
        try_record(buf, {:return, i, outer})
        if rem(i, 10) == 9, do: Process.sleep(1)
        load_loop(buf, i + 1)
    end
  end

  defp stop_load(tasks) do
    Enum.each(tasks, &send(&1.pid, :stop))
    results = Task.await_many(tasks, 30_000)
    logs = Map.new(results, fn {pid, {log, _}} -> {pid, log} end)
    refused = results |> Enum.map(fn {_, {_, r}} -> r end) |> Enum.sum()
    {logs, refused}
  end

  # ===========================================================================
  # 5. Overflow accounting
  # ===========================================================================

  describe "overflow" do
    test ":drop_oldest on a tiny ring: accepted = stored + overflow exactly" do
      pm =
        start_pipeline!(
          shards: 1,
          ring_size: 64,
          overflow_strategy: :drop_oldest,
          async_writer_pool_size: 1,
          batch_size: 1,
          flush_interval_us: 50_000_000
        )

      buf = PipelineManager.ring_buffer(pm)
      {logs, refused} = hammer(buf, 4, 3000)
      assert refused == 0
      assert :ok = PipelineManager.flush(pm, 30_000)
      store = PipelineManager.data_access(pm)

      acc = assert_exact_accounting!(pm)
      assert acc.accepted == 4 * 3000
      assert acc.buffer_full == 0
      assert {acc.evicted, acc.expired, acc.duplicates, acc.dead_lettered} == {0, 0, 0, 0}
      assert acc.stored + acc.overflow + acc.failed == acc.accepted

      # What survived of each producer is a subsequence of what it wrote,
      # in order.
      stored =
        for {pid, _log} <- logs, reduce: 0 do
          n ->
            seqs = for %StateChange{old_state: i} <- events_of(store, pid), do: i
            assert seqs == Enum.sort(seqs) and seqs == Enum.uniq(seqs)
            assert Enum.all?(seqs, &(&1 in 1..3000))
            n + length(seqs)
        end

      assert stored == acc.stored
    end

    test ":drop_newest on a tiny ring: buffer_full counts exactly the refused writes" do
      pm =
        start_pipeline!(
          shards: 1,
          ring_size: 64,
          overflow_strategy: :drop_newest,
          async_writer_pool_size: 1,
          batch_size: 1,
          flush_interval_us: 50_000_000
        )

      buf = PipelineManager.ring_buffer(pm)
      {logs, refused} = hammer(buf, 4, 3000)
      assert :ok = PipelineManager.flush(pm, 30_000)
      store = PipelineManager.data_access(pm)

      acc = assert_exact_accounting!(pm)
      accepted = logs |> Map.values() |> Enum.map(&length/1) |> Enum.sum()
      assert accepted + refused == 4 * 3000
      assert acc.buffer_full == refused
      assert acc.accepted == accepted
      assert acc.stored == accepted
      assert acc.overflow == 0

      # Exactly the accepted writes are stored, each producer's in order.
      pair_logs!(store, logs)
    end
  end

  describe "overflow with workers draining" do
    test ":drop_oldest on small shards drained concurrently: the identity holds exactly" do
      pm =
        start_pipeline!(
          shards: 2,
          ring_size: 64,
          overflow_strategy: :drop_oldest,
          async_writer_pool_size: 2,
          batch_size: 8,
          flush_interval_us: 20
        )

      buf = PipelineManager.ring_buffer(pm)
      {logs, 0} = hammer(buf, 6, 5000)
      assert :ok = PipelineManager.flush(pm, 30_000)
      store = PipelineManager.data_access(pm)

      acc = assert_exact_accounting!(pm)
      assert acc.accepted == 6 * 5000
      assert {acc.evicted, acc.expired, acc.duplicates, acc.dead_lettered} == {0, 0, 0, 0}
      assert acc.stored + acc.overflow + acc.failed == acc.accepted

      stored =
        for {pid, _log} <- logs, reduce: 0 do
          n ->
            seqs = for %StateChange{old_state: i} <- events_of(store, pid), do: i
            assert seqs == Enum.sort(seqs) and seqs == Enum.uniq(seqs)
            n + length(seqs)
        end

      assert stored == acc.stored
    end

    test "max_age_ms: expired events are counted, the identity holds" do
      pm = start_pipeline!(max_age_ms: 15, shards: 2, batch_size: 50)
      buf = PipelineManager.ring_buffer(pm)

      for round <- 1..4 do
        for i <- 1..1000, do: record!(buf, {:state, round, i})
        Process.sleep(20)
      end

      {log, 0} = take_log()
      assert :ok = PipelineManager.flush(pm, 10_000)
      store = PipelineManager.data_access(pm)

      acc = assert_exact_accounting!(pm)
      assert acc.accepted == length(log)
      assert acc.stored + acc.expired == acc.accepted
      assert length(events_of(store, self())) == acc.stored
      assert DataAccess.get_stats(store).total_events == acc.stored
    end
  end

  defp hammer(buf, producers, n) do
    1..producers
    |> Enum.map(fn _ ->
      Task.async(fn ->
        for i <- 1..n, do: try_record(buf, {:state, i, i})
        {self(), take_log()}
      end)
    end)
    |> stop_load_results()
  end

  defp stop_load_results(tasks) do
    results = Task.await_many(tasks, 30_000)
    logs = Map.new(results, fn {pid, {log, _}} -> {pid, log} end)
    {logs, results |> Enum.map(fn {_, {_, r}} -> r end) |> Enum.sum()}
  end

  # ===========================================================================
  # 6. max_events eviction
  # ===========================================================================

  describe "max_events" do
    test "5000 events into max_events 1000: 1000 stored, 4000 evicted, each producer's newest kept" do
      pm =
        start_pipeline!(
          max_events: 1000,
          shards: 4,
          async_writer_pool_size: 2,
          batch_size: 7
        )

      buf = PipelineManager.ring_buffer(pm)

      {logs, 0} =
        1..5
        |> Enum.map(fn _ ->
          Task.async(fn ->
            for i <- 1..1000, do: record!(buf, {:state, i, i})
            {self(), take_log()}
          end)
        end)
        |> stop_load_results()

      assert :ok = PipelineManager.flush(pm, 10_000)
      store = PipelineManager.data_access(pm)

      acc = assert_exact_accounting!(pm)
      assert {acc.accepted, acc.stored, acc.evicted} == {5000, 1000, 4000}
      assert DataAccess.get_stats(store).total_events == 1000

      # Eviction is oldest first and each process's events are stored in
      # order: what is left of each producer is a suffix of its writes.
      kept =
        for {pid, _} <- logs, reduce: 0 do
          n ->
            seqs = for %StateChange{old_state: i} <- events_of(store, pid), do: i
            assert seqs == Enum.to_list((1001 - length(seqs))..1000//1)
            n + length(seqs)
        end

      assert kept == 1000
    end

    test "one producer: exactly its newest 1000 events are kept, ancestors may be gone" do
      pm = start_pipeline!(max_events: 1000, shards: 2, batch_size: 16)
      buf = PipelineManager.ring_buffer(pm)

      record!(buf, {:call, Evict, :root, [], :root})
      for i <- 1..4998, do: record!(buf, {:state, i, i})
      record!(buf, {:return, :done, :root})
      {log, 0} = take_log()

      assert :ok = PipelineManager.flush(pm, 10_000)
      store = PipelineManager.data_access(pm)

      acc = assert_exact_accounting!(pm)
      assert {acc.accepted, acc.stored, acc.evicted} == {5000, 1000, 4000}

      evs = events_of(store, self())
      assert length(evs) == 1000

      for {op, ev} <- Enum.zip(Enum.take(log, -1000), evs),
          do: assert(matches?(op, self(), ev))

      # The root call is evicted; its stored children still name it.
      [first | _] = evs
      {:ok, c} = DataAccess.get_correlated(store, first.id)
      root = c.parent_id
      assert is_integer(root) and root < first.id
      assert DataAccess.get_event(store, root) == {:error, :not_found}
      {:ok, chain} = DataAccess.causal_chain(store, first.id)
      assert Enum.map(chain, & &1.id) == [first.id]
      %FunctionExecution{event_type: :return} = ret = List.last(evs)
      assert {:ok, %{links: [completes: ^root]}} = DataAccess.get_correlated(store, ret.id)
    end
  end

  # ===========================================================================
  # Regressions (bugs these tests found, now fixed)
  # ===========================================================================

  describe "regressions" do
    test "get_correlated of a state change reports correlation_type :state_change" do
      pm = start_pipeline!(shards: 1)
      buf = PipelineManager.ring_buffer(pm)
      :ok = Ingestor.ingest_function_call(buf, KB, :f, [], self(), :kb)
      :ok = Ingestor.ingest_state_change(buf, self(), 1, 2)
      :ok = Ingestor.ingest_function_return(buf, :ok, 1, :kb)
      assert :ok = PipelineManager.flush(pm)
      store = PipelineManager.data_access(pm)
      [call, state, _ret] = events_of(store, self())

      {:ok, c} = DataAccess.get_correlated(store, state.id)
      assert c.links == [state_in: call.id]
      # Documented as `:state_change` (CorrType::StateChange in
      # correlator.rs); the NIF returns the StateChange struct's module name.
      assert c.correlation_type == :state_change
    end

    test "a late link is never lost: a receive stored after its send still gets linked" do
      # Receivers ingest receives while their senders ingest the matching
      # sends, on other shards and workers, one event per batch. Whenever
      # the receive is correlated first, the send finds it pending and
      # produces a late link. Nothing is evicted, so every late link must
      # reach its receive: `late_link_misses` must stay 0 and every receive
      # must end up linked. Up to 60 rounds (the race needs a worker to be
      # preempted between correlating and storing).
      result =
        Enum.reduce_while(1..60, nil, fn _round, nil ->
          case late_link_round() do
            :ok -> {:cont, nil}
            failure -> {:halt, failure}
          end
        end)

      assert result == nil
    end

    test "the timestamps of one process's events never go backwards" do
      # Two writers, each into its own plain ring, for up to 1 s: every
      # event's timestamp must be >= the previous one of the same process.
      deadline = System.monotonic_time(:millisecond) + 1000

      steps =
        1..2
        |> Enum.map(fn _ -> Task.async(fn -> backward_step(deadline) end) end)
        |> Task.await_many(30_000)

      assert Enum.reject(steps, &is_nil/1) == []
    end

    test "a receive of a truncated message is linked to a send of the same message" do
      pm = start_pipeline!(shards: 1)
      buf = PipelineManager.ring_buffer(pm)
      me = self()
      # Both are larger than :max_event_bytes (4096): stored truncated.
      a = {:big, :binary.copy("a", 10_000)}
      b = {:big, :binary.copy("b", 10_000)}
      :ok = Ingestor.ingest_message_send(buf, me, me, a)
      :ok = Ingestor.ingest_message_send(buf, me, me, b)
      :ok = Ingestor.ingest_message_receive(buf, me, b)
      :ok = Ingestor.ingest_message_receive(buf, me, a)
      assert :ok = PipelineManager.flush(pm)
      store = PipelineManager.data_access(pm)
      [send_a, send_b, recv_b, recv_a] = events_of(store, me)

      assert {:ok, %{links: [receives: got_b]}} = DataAccess.get_correlated(store, recv_b.id)
      assert {:ok, %{links: [receives: got_a]}} = DataAccess.get_correlated(store, recv_a.id)
      # Ingestor docs: linked to the oldest unmatched send "of equal content".
      assert {got_b, got_a} == {send_b.id, send_a.id}
    end

    test "writes after shutdown are refused, not silently lost" do
      {:ok, pm} = PipelineManager.start_link(name: nil, shards: 2)
      buf = PipelineManager.ring_buffer(pm)
      :ok = Ingestor.ingest_state_change(buf, self(), 0, 1)
      :ok = PipelineManager.shutdown(pm)

      # Nobody drains this ring any more and there are no metrics left to
      # count the event in: the write must not report success.
      assert {:error, _} = Ingestor.ingest_state_change(buf, self(), 1, 2)
    end
  end

  # One round of the late-link race: :ok, or what was lost.
  defp late_link_round do
    {:ok, pm} =
      PipelineManager.start_link(
        name: nil,
        shards: 16,
        async_writer_pool_size: 4,
        batch_size: 1,
        flush_interval_us: 10
      )

    try do
      buf = PipelineManager.ring_buffer(pm)

      tasks =
        for _ <- 1..8 do
          r =
            Task.async(fn ->
              receive do: (:go -> :ok)
              for i <- 1..500, do: :ok = Ingestor.ingest_message_receive(buf, self(), {:m, i})
            end)

          s =
            Task.async(fn ->
              receive do: (:go -> :ok)
              for i <- 1..500, do: :ok = Ingestor.ingest_message_send(buf, self(), r.pid, {:m, i})
            end)

          [r, s]
        end
        |> List.flatten()

      Enum.each(tasks, &send(&1.pid, :go))
      Task.await_many(tasks, 30_000)
      :ok = PipelineManager.flush(pm, 30_000)
      m = PipelineManager.get_metrics(pm).native

      if m.engine.late_link_misses == 0 do
        :ok
      else
        store = PipelineManager.data_access(pm)
        receivers = tasks |> Enum.take_every(2) |> Enum.map(& &1.pid)

        unlinked =
          for r <- receivers,
              ev <- events_of(store, r),
              {:ok, %{links: []}} <- [DataAccess.get_correlated(store, ev.id)],
              do: ev.id

        %{
          late_link_misses: m.engine.late_link_misses,
          matched_by_correlator: m.correlator.matched_receives,
          receives: m.correlator.receives,
          evicted: m.accounting.evicted,
          unlinked_receives: unlinked
        }
      end
    after
      PipelineManager.shutdown(pm)
    end
  end

  # nil, or {previous, next} timestamps of the first backward step seen.
  defp backward_step(deadline) do
    {:ok, ring} = ElixirScope.Capture.RingBuffer.new(size: 8192)

    try do
      backward_step(ring, 0, nil, deadline)
    after
      ElixirScope.Capture.RingBuffer.destroy(ring)
    end
  end

  defp backward_step(ring, pos, prev, deadline) do
    for i <- 1..4096, do: :ok = Ingestor.ingest_state_change(ring, self(), i, i)
    {evs, next} = ElixirScope.Capture.RingBuffer.read_batch(ring, pos, 4096)
    stamps = Enum.map(evs, & &1.timestamp)
    all = if prev, do: [prev | stamps], else: stamps
    pairs = Enum.zip(all, tl(all))

    case Enum.find(pairs, fn {a, b} -> b < a end) do
      nil ->
        if System.monotonic_time(:millisecond) < deadline,
          do: backward_step(ring, next, List.last(stamps), deadline),
          else: nil

      step ->
        step
    end
  end
end

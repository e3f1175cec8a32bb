defmodule ElixirScope.Storage.QueryCoordinatorTest do
  use ExUnit.Case, async: true

  import ElixirScope.PipelineTestHelpers, only: [start_pipeline!: 1, assert_exact_accounting!: 1]
  require ElixirScope.Storage.QueryCoordinator

  alias ElixirScope.Analysis
  alias ElixirScope.Analysis.Entry
  alias ElixirScope.Capture.{Ingestor, PipelineManager}
  alias ElixirScope.Storage.{DataAccess, QueryCoordinator}

  @moduletag timeout: 120_000

  defmodule ModA do
  end

  defmodule ModB do
  end

  # Collects every message of subscription `ref` already in the mailbox.
  defp drain(ref, acc \\ []) do
    receive do
      {:elixir_scope_event, ^ref, e} -> drain(ref, [e | acc])
      {:elixir_scope_dropped, ^ref, n} -> drain(ref, [{:dropped, n} | acc])
    after
      0 -> Enum.reverse(acc)
    end
  end

  defp all_entries(store), do: Analysis.select(store: store, limit: 10_000_000)

  # A mixed workload from `n` processes: calls (two modules, nested),
  # sends to the next process, state changes, returns; receives are
  # written after the sends are stored (so none is linked late).
  defp mixed_workload(pm, n, rounds) do
    buf = PipelineManager.ring_buffer(pm)
    parent = self()

    procs =
      for i <- 1..n do
        spawn_link(fn ->
          receive do
            {:go, peers} ->
              me = self()
              next = Enum.at(peers, rem(i, n))

              for r <- 1..rounds do
                mod = if rem(r + i, 2) == 0, do: ModA, else: ModB
                :ok = Ingestor.ingest_function_call(buf, mod, :f, [i, r], me, {i, r})
                :ok = Ingestor.ingest_function_call(buf, ModA, :g, [r, :x, i], me, {i, r, :g})
                :ok = Ingestor.ingest_message_send(buf, me, next, {:work, r, i})
                :ok = Ingestor.ingest_state_change(buf, me, %{n: r - 1}, %{n: r})
                :ok = Ingestor.ingest_function_return(buf, {:ok, r}, 100, {i, r, :g})
                :ok = Ingestor.ingest_function_return(buf, :done, 200, {i, r})
              end

              send(parent, {:sent, me})

              receive do
                :receive_now ->
                  prev = Enum.at(peers, rem(i - 2 + n, n))
                  pi = Enum.find_index(peers, &(&1 == prev)) + 1

                  for r <- 1..rounds,
                      do: :ok = Ingestor.ingest_message_receive(buf, me, {:work, r, pi})

                  send(parent, {:received, me})
              end
          end
        end)
      end

    Enum.each(procs, &send(&1, {:go, procs}))
    for p <- procs, do: assert_receive({:sent, ^p}, 30_000)
    :ok = PipelineManager.flush(pm)
    Enum.each(procs, &send(&1, :receive_now))
    for p <- procs, do: assert_receive({:received, ^p}, 30_000)
    procs
  end

  describe "subscribe/3" do
    test "exactly the matching events arrive, in store order, with their correlation" do
      pm = start_pipeline!(shards: 4, async_writer_pool_size: 2, batch_size: 7)
      store = PipelineManager.data_access(pm)

      filters = [
        all: [],
        mod_a: [module: ModA],
        g2: [module: ModA, function: :g, arity: 3],
        msgs: [types: [:send, :receive]],
        states: [types: [:state_change]],
        local: [node: node(), types: [:return]],
        big_work: [message: QueryCoordinator.match({:work, r, _} when r > 3)],
        args_x: [args: QueryCoordinator.pattern([:_, :x, :_])],
        args_guard: [args: [{[:"$1", :"$2"], [{:==, :"$1", {:+, :"$2", -1}}], [true]}]],
        remote: [node: :nobody@nowhere]
      ]

      subs =
        for {name, f} <- filters do
          {:ok, ref} = QueryCoordinator.subscribe(pm, f)
          {name, ref}
        end

      procs = mixed_workload(pm, 6, 12)
      :ok = PipelineManager.flush(pm)
      {:ok, pid_ref} = QueryCoordinator.subscribe(pm, pid: hd(procs))
      :ok = QueryCoordinator.flush(pm)
      # Nothing of p1 is written after it subscribed: no message.
      assert drain(pid_ref) == []

      entries = all_entries(store)
      assert length(entries) == 6 * 12 * 7

      truth = %{
        all: fn _ -> true end,
        mod_a: &(&1.module == ModA),
        g2: &(&1.module == ModA and &1.function == :g and &1.arity == 3 and &1.type == :call),
        msgs: &(&1.type in [:send, :receive]),
        states: &(&1.type == :state_change),
        local: &(&1.type == :return),
        big_work: fn e ->
          e.type in [:send, :receive] and match?({:work, r, _} when r > 3, e.data)
        end,
        args_x: &(&1.type == :call and match?([_, :x, _], &1.data)),
        args_guard: fn e ->
          e.type == :call and match?([a, b] when a == b - 1, e.data)
        end,
        remote: fn _ -> false end
      }

      for {name, ref} <- subs do
        got = drain(ref)
        want = entries |> Enum.filter(truth[name]) |> Enum.map(& &1.id)
        assert Enum.map(got, & &1.id) == want, "subscription #{name}"
        s = QueryCoordinator.stats(ref)
        assert s.matched == length(want) and s.delivered == length(want) and s.dropped == 0

        for e <- Enum.take_random(got, 40) do
          {:ok, stored} = DataAccess.get_correlated(store, e.id)
          assert e == stored
        end
      end

      # The receives are linked to their sends, calls to their callers.
      [recv | _] = for e <- drain_all_from(entries, :receive), do: e
      {:ok, c} = DataAccess.get_correlated(store, recv.id)
      assert [{:receives, send_id}] = c.links
      assert %Entry{type: :send} = Analysis.get(send_id, store: store)

      assert_exact_accounting!(pm)

      for {_, ref} <- subs, do: :ok = QueryCoordinator.unsubscribe(ref)
      :ok = QueryCoordinator.unsubscribe(pid_ref)
      assert QueryCoordinator.subscriptions(pm) == []
    end

    test "a correlation id subscription follows one call to its return" do
      pm = start_pipeline!(shards: 2, async_writer_pool_size: 1)
      buf = PipelineManager.ring_buffer(pm)
      store = PipelineManager.data_access(pm)
      :ok = Ingestor.ingest_function_call(buf, ModA, :long, [], self(), :c1)
      :ok = PipelineManager.flush(pm)
      {:ok, [call]} = DataAccess.query_by_function(store, ModA, :long)
      {:ok, ref} = QueryCoordinator.subscribe(pm, correlation_id: call.id)
      :ok = Ingestor.ingest_function_call(buf, ModA, :inner, [], self(), :c2)
      :ok = Ingestor.ingest_function_return(buf, :in, 5, :c2)
      :ok = Ingestor.ingest_function_return(buf, :out, 9, :c1)
      :ok = QueryCoordinator.flush(pm)

      assert [%{correlation_id: cid, links: [{:completes, cid}], event: ret}] = drain(ref)
      assert cid == call.id
      assert ret.return_value == :out
    end

    test "a slow subscriber gets drops counted; its mailbox and the pipeline stay bounded" do
      pm = start_pipeline!(shards: 2, async_writer_pool_size: 1, ring_size: 65_536)
      buf = PipelineManager.ring_buffer(pm)
      parent = self()

      slow =
        spawn_link(fn ->
          receive do
            :consume -> :ok
          end

          send(parent, {:consumed, consume_all([])})
          # Keep consuming (and stay subscribed).
          consume_forever()
        end)

      {:ok, ref} =
        QueryCoordinator.subscribe(pm, [types: [:call]], subscriber: slow, max_queue: 500)

      n = 30_000

      for i <- 1..n do
        :ok = Ingestor.ingest_function_call(buf, ModA, :f, [i], self(), i)
      end

      :ok = QueryCoordinator.flush(pm)
      s = QueryCoordinator.stats(ref)
      assert s.matched == n
      assert s.dropped > 0
      assert s.delivered + s.dropped + s.queued == n
      {:message_queue_len, len} = Process.info(slow, :message_queue_len)
      # The bound: max_queue items (events and drop notices), one over at most.
      assert len <= 501
      assert s.delivered <= 500
      acc = assert_exact_accounting!(pm)
      assert acc.stored == n

      send(slow, :consume)
      assert_receive {:consumed, got}, 10_000
      events = Enum.count(got, &match?({:event, _}, &1))

      dropped =
        got
        |> Enum.flat_map(fn
          {:dropped, k} -> [k]
          _ -> []
        end)
        |> Enum.sum()

      assert events == s.delivered
      assert events + dropped == n
      # Events stay in order around the gaps.
      ids = for {:event, e} <- got, do: e.event.args
      assert ids == Enum.sort(ids)

      # Once consumed (and measured again), events flow again.
      wait_until(fn ->
        :ok = Ingestor.ingest_function_call(buf, ModA, :f, [:again], self(), :again)
        :ok = QueryCoordinator.flush(pm)
        QueryCoordinator.stats(ref).delivered > s.delivered
      end)
    end

    test "a killed subscriber is unsubscribed" do
      pm = start_pipeline!(shards: 2, async_writer_pool_size: 1)

      sub =
        spawn(fn ->
          receive do
            :never -> :ok
          end
        end)

      {:ok, ref} = QueryCoordinator.subscribe(pm, [], subscriber: sub)
      assert [%{subscriber: ^sub, active: true}] = QueryCoordinator.subscriptions(pm)
      Process.exit(sub, :kill)
      wait_until(fn -> QueryCoordinator.subscriptions(pm) == [] end)
      refute QueryCoordinator.stats(ref).active
    end

    test "100 subscribers at once each get their own events" do
      pm = start_pipeline!(shards: 8, async_writer_pool_size: 2)
      buf = PipelineManager.ring_buffer(pm)
      parent = self()

      subs =
        for i <- 1..100 do
          spawn_link(fn ->
            filter =
              if rem(i, 10) == 0,
                do: [pid: self(), args: QueryCoordinator.match([k] when k > 25)],
                else: [pid: self()]

            {:ok, ref} = QueryCoordinator.subscribe(pm, filter)
            send(parent, {:ready, self()})

            receive do
              :go -> :ok
            end

            for k <- 1..50, do: :ok = Ingestor.ingest_function_call(buf, ModB, :h, [k], self(), k)
            send(parent, {:written, self()})

            receive do
              :collect -> send(parent, {:got, i, Enum.map(drain(ref), & &1.event.args)})
            end
          end)
        end

      for p <- subs, do: assert_receive({:ready, ^p}, 10_000)
      assert length(QueryCoordinator.subscriptions(pm)) == 100
      Enum.each(subs, &send(&1, :go))
      for p <- subs, do: assert_receive({:written, ^p}, 10_000)
      :ok = QueryCoordinator.flush(pm)
      Enum.each(subs, &send(&1, :collect))

      for i <- 1..100 do
        assert_receive {:got, ^i, got}, 10_000
        want = if rem(i, 10) == 0, do: for(k <- 26..50, do: [k]), else: for(k <- 1..50, do: [k])
        assert got == want
      end
    end

    test "stream/3 yields events as they are stored and unsubscribes when it halts" do
      pm = start_pipeline!(shards: 2, async_writer_pool_size: 1)
      buf = PipelineManager.ring_buffer(pm)
      me = self()

      task =
        Task.async(fn ->
          QueryCoordinator.stream(pm, [module: ModA], timeout: 5000) |> Enum.take(3)
        end)

      wait_until(fn -> length(QueryCoordinator.subscriptions(pm)) == 1 end)

      for k <- 1..5,
          do: :ok = Ingestor.ingest_function_call(buf, ModA, :s, [k], me, k)

      assert [a, b, c] = Task.await(task)
      assert Enum.map([a, b, c], & &1.event.args) == [[1], [2], [3]]
      wait_until(fn -> QueryCoordinator.subscriptions(pm) == [] end)
    end
  end

  describe "query/2" do
    test "equals a brute-force filter of select on random combinations (seeded)" do
      pm = start_pipeline!(shards: 4, async_writer_pool_size: 2, batch_size: 11)
      store = PipelineManager.data_access(pm)
      procs = mixed_workload(pm, 5, 30)
      :ok = PipelineManager.flush(pm)
      entries = all_entries(store)

      corr =
        Map.new(entries, fn e ->
          {:ok, c} = DataAccess.get_correlated(store, e.id)
          {e.id, c.correlation_id}
        end)

      linked? = fn e, t ->
        e.id != t and
          case e.type do
            t2 when t2 in [:call, :state_change] -> e.parent_id == t
            t2 when t2 in [:return, :exception, :receive] -> corr[e.id] == t
            _ -> false
          end
      end

      ts = Enum.map(entries, & &1.timestamp)
      {t_min, t_max} = Enum.min_max(ts)
      types = [:call, :return, :send, :receive, :state_change, :spawn]
      seed = ExUnit.configuration()[:seed] || 0
      :rand.seed(:exsss, {seed, 14, 2})

      plans =
        for _ <- 1..300, reduce: MapSet.new() do
          seen ->
            pick = fn -> :rand.uniform() < 0.35 end
            ev = Enum.random(entries)
            t0 = t_min + :rand.uniform(max(t_max - t_min, 1))
            t1 = t0 + :rand.uniform(max(div(t_max - t_min, 3), 1))

            spec =
              [
                pick.() && {:pid, Enum.random(procs)},
                pick.() && {:module, Enum.random([ModA, ModB])},
                pick.() && {:function, Enum.random([:f, :g])},
                pick.() && {:arity, Enum.random([2, 3])},
                pick.() && {:types, Enum.take_random(types, 1 + :rand.uniform(2))},
                :rand.uniform() < 0.1 && {:correlation_id, corr[ev.id]},
                :rand.uniform() < 0.1 && {:linked_to, ev.call_id || ev.id},
                pick.() && {:from, t0},
                pick.() && {:to, t1}
              ]
              |> Enum.filter(& &1)

            order = Enum.random([:asc, :desc])
            limit = Enum.random([1, 7, 50, 1000])

            want =
              entries
              |> Enum.filter(fn e ->
                Enum.all?(spec, fn
                  {:pid, p} -> e.pid == p
                  {:module, m} -> e.module == m
                  {:function, f} -> e.function == f
                  {:arity, a} -> e.type == :call and e.arity == a
                  {:types, ts} -> e.type in ts
                  {:correlation_id, c} -> corr[e.id] == c
                  {:linked_to, t} -> linked?.(e, t)
                  {:from, t} -> e.timestamp >= t
                  {:to, t} -> e.timestamp <= t
                end)
              end)
              |> Enum.map(& &1.id)
              |> then(&if order == :desc, do: Enum.reverse(&1), else: &1)

            {got, plan} = all_pages(store, spec ++ [order: order, limit: limit, as: :entry])
            assert got == want, "query #{inspect(spec)} #{order} limit #{limit}"
            MapSet.put(seen, plan)
        end

      # The random filters exercised every plan.
      assert MapSet.subset?(
               MapSet.new([:correlation, :linked_to, :pid, :function, :time, :scan]),
               plans
             ),
             inspect(plans)

      # The same query on the pipeline itself, as correlated maps.
      {:ok, %{events: [first | _]}} = QueryCoordinator.query(pm, types: [:receive], limit: 1)
      assert {:ok, first} == DataAccess.get_correlated(store, first.id)
      assert [{:receives, _}] = first.links
    end

    test "works on a store filled by hand" do
      {:ok, s} = DataAccess.new(max_events: 100)
      me = self()

      for i <- 1..20,
          do: :ok = DataAccess.store_event(s, %{id: i, timestamp: i * 10, pid: me, module: M})

      assert {:ok, %{events: evs, cursor: c, plan: :time}} =
               QueryCoordinator.query(s, pid: me, from: 50, limit: 11, as: :event)

      assert Enum.map(evs, & &1.id) == Enum.to_list(5..15)

      assert {:ok, %{events: rest, cursor: nil}} =
               QueryCoordinator.query(s, pid: me, from: 50, cursor: c, as: :event)

      assert Enum.map(rest, & &1.id) == Enum.to_list(16..20)

      assert {:ok, %{events: [], plan: :pid}} =
               QueryCoordinator.query(s, pid: spawn(fn -> :ok end))

      assert {:ok, %{events: [%{id: 3}], plan: :time}} =
               QueryCoordinator.query(s, pid: me, from: 25, to: 35)

      assert {:ok, %{plan: :scan}} = QueryCoordinator.query(s, module: M)
    end
  end

  describe "correlation_search/3" do
    test "gathers the call, its return, callers, what happened inside, messages and state" do
      pm = start_pipeline!(shards: 2, async_writer_pool_size: 1)
      buf = PipelineManager.ring_buffer(pm)
      store = PipelineManager.data_access(pm)
      me = self()
      other = spawn(fn -> Process.sleep(:infinity) end)
      :ok = Ingestor.ingest_function_call(buf, ModA, :outer, [], me, :o)
      :ok = Ingestor.ingest_function_call(buf, ModA, :mid, [1], me, :m)
      :ok = Ingestor.ingest_function_call(buf, ModB, :inner, [2], me, :i)
      :ok = Ingestor.ingest_message_send(buf, me, other, {:hello, 1})
      :ok = Ingestor.ingest_function_return(buf, :ok, 10, :i)
      :ok = Ingestor.ingest_state_change(buf, me, 1, 2)
      :ok = Ingestor.ingest_function_return(buf, :mid_done, 20, :m)
      :ok = Ingestor.ingest_function_return(buf, :outer_done, 30, :o)
      :ok = PipelineManager.flush(pm)

      ingest_in(other, fn ->
        :ok = Ingestor.ingest_function_call(buf, ModB, :handle, [], other, :h)
        :ok = Ingestor.ingest_message_receive(buf, other, {:hello, 1})
        :ok = Ingestor.ingest_function_return(buf, :handled, 5, :h)
      end)

      :ok = PipelineManager.flush(pm)
      {:ok, [mid]} = DataAccess.query_by_function(store, ModA, :mid)
      {:ok, r} = QueryCoordinator.correlation_search(pm, mid.id)

      assert r.event.id == mid.id and r.call.id == mid.id
      assert r.return.event.return_value == :mid_done
      assert [%{event: %{function: :outer}}] = r.ancestors

      assert Enum.map(r.inside, & &1.correlation_type) ==
               [:function_call, :message_send, :function_return, :state_change]

      assert [%{send: s, receive: rcv, receiver_call: h}] = r.messages
      assert s.event.message == {:hello, 1}
      assert rcv.links == [{:receives, s.id}]
      assert h.event.function == :handle
      assert [%{event: %{new_state: 2}}] = r.state_changes

      # From the return, the same call; depth 1 stays at the first level.
      {:ok, r2} = QueryCoordinator.correlation_search(store, r.return.id, depth: 1)
      assert r2.call.id == mid.id

      assert Enum.map(r2.inside, & &1.correlation_type) ==
               [:function_call, :function_return, :state_change]

      assert r2.messages == []
      assert QueryCoordinator.correlation_search(store, 2_000_000_000_000) == {:error, :not_found}
    end
  end

  defp ingest_in(pid, fun) do
    parent = self()
    ref = make_ref()
    # Ingest from `pid`'s point of view: the events name it explicitly.
    _ = pid

    spawn(fn ->
      fun.()
      send(parent, ref)
    end)

    assert_receive ^ref, 5000
  end

  # Every page of a query, concatenated, and the plan of the first.
  defp all_pages(store, spec, acc \\ [], plan \\ nil) do
    {:ok, %{events: evs, cursor: c, plan: p}} = QueryCoordinator.query(store, spec)
    acc = acc ++ Enum.map(evs, & &1.id)
    plan = plan || p
    if c, do: all_pages(store, Keyword.put(spec, :cursor, c), acc, plan), else: {acc, plan}
  end

  defp drain_all_from(entries, type), do: Enum.filter(entries, &(&1.type == type))

  defp consume_all(acc) do
    receive do
      {:elixir_scope_event, _ref, e} -> consume_all([{:event, e} | acc])
      {:elixir_scope_dropped, _ref, n} -> consume_all([{:dropped, n} | acc])
    after
      200 -> Enum.reverse(acc)
    end
  end

  defp consume_forever do
    receive do
      _ -> consume_forever()
    end
  end

  defp wait_until(fun, tries \\ 500) do
    cond do
      fun.() -> :ok
      tries == 0 -> flunk("condition not reached")
      true -> Process.sleep(10) && wait_until(fun, tries - 1)
    end
  end
end

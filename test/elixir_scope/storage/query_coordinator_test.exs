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

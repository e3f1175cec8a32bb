defmodule ElixirScope.TraceFileHelpers do
  @moduledoc false
  # Traces and workloads for the trace-file and export tests, and the
  # comparison of every query's answers on two stores.

  import Bitwise
  import ExUnit.Assertions

  alias ElixirScope.Analysis
  alias ElixirScope.Capture.{Ingestor, PipelineManager}
  alias ElixirScope.Storage.DataAccess

  @sample_app Path.expand("../../scripts/sample_app.ex", __DIR__)

  @doc "Loads the demo's sample application (scripts/sample_app.ex)."
  def require_sample_app do
    unless Code.ensure_loaded?(ElixirScope.SampleApp), do: Code.require_file(@sample_app)
    :ok
  end

  @doc """
  Traces the demo's scenario (scripts/sample_app.ex) and returns
  `{store, truth}`; the trace stays the node's last trace.
  """
  def demo_trace(opts \\ []) do
    require_sample_app()
    app = ElixirScope.SampleApp
    {:ok, _} = app.start()

    {:ok, _} =
      ElixirScope.trace(
        [Module.concat(app, Bank), Module.concat(app, Auditor), Module.concat(app, Math)],
        Keyword.merge([pids: :all, max_payload_bytes: 1024], opts)
      )

    truth = app.run_scenario()
    {:ok, _} = ElixirScope.stop_trace()
    {ElixirScope.trace_store(), truth}
  end

  @doc """
  A seeded random workload through a fresh pipeline (calls nested to
  depth 6, returns, exceptions, sends and receives, state changes,
  spawns, exits, errors, metrics, among `procs` fake processes); returns
  `{pm, store}` after a flush.
  """
  def random_pipeline(seed, n, opts \\ []) do
    :rand.seed(:exsss, {seed, seed * 7, seed * 13})
    name = :"tf_random_#{seed}_#{System.unique_integer([:positive])}"

    {:ok, pm} =
      PipelineManager.start_link(
        Keyword.merge([name: name, max_events: 1_000_000, backpressure_enabled: false], opts)
      )

    buf = PipelineManager.ring_buffer(pm)
    procs = for _ <- 1..Keyword.get(opts, :procs, 8), do: spawn(fn -> :ok end)
    mods = [Alpha, Beta, Gamma, :lists, :"Elixir.Weird Name"]
    funs = [:run, :step, :handle_call, :ünïcode, :go]
    stacks = Map.new(procs, &{&1, []})

    Enum.reduce(1..n, stacks, fn i, stacks ->
      p = Enum.random(procs)
      stack = stacks[p]

      case :rand.uniform(10) do
        r when r <= 4 and length(stack) < 6 ->
          corr = {p, i}
          args = [i, "arg #{i}", {:ok, i * 1.5}, %{k: [1, 2]}, 1 <<< 70]

          {m, f} = {Enum.random(mods), Enum.random(funs)}
          ingest!(fn -> Ingestor.ingest_function_call(buf, m, f, args, p, corr) end)

          Map.put(stacks, p, [corr | stack])

        r when r <= 6 and stack != [] ->
          [corr | rest] = stack

          if :rand.uniform(6) == 1,
            do:
              ingest!(fn -> Ingestor.ingest_function_exception(buf, :error, :badarg, i, corr) end),
            else: ingest!(fn -> Ingestor.ingest_function_return(buf, {:ok, i}, i * 10, corr) end)

          Map.put(stacks, p, rest)

        7 ->
          to = Enum.random(procs)
          msg = {:msg, rem(i, 17)}
          ingest!(fn -> Ingestor.ingest_message_send(buf, p, to, msg) end)
          ingest!(fn -> Ingestor.ingest_message_receive(buf, to, msg) end)
          stacks

        8 ->
          ingest!(fn -> Ingestor.ingest_state_change(buf, p, %{n: i - 1}, %{n: i}) end)
          stacks

        9 ->
          case :rand.uniform(4) do
            1 ->
              q = Enum.random(procs)
              ingest!(fn -> Ingestor.ingest_process_spawn(buf, p, q) end)

            2 ->
              ingest!(fn -> Ingestor.ingest_error(buf, :oops, "message #{i}", []) end)

            3 ->
              ingest!(fn -> Ingestor.ingest_performance_metric(buf, :latency, i, %{at: i}) end)

            4 ->
              q = Enum.random(procs)
              ingest!(fn -> Ingestor.ingest_process_exit(buf, q, :normal) end)
          end

          stacks

        _ ->
          ingest!(fn -> Ingestor.ingest_generic_event(buf, :custom, %{i: i}, p, nil, i, i) end)
          stacks
      end
    end)

    :ok = PipelineManager.flush(pm)
    {pm, PipelineManager.data_access(pm)}
  end

  # The workload is what these tests need, not the ring's overflow: a write
  # the full ring refused (its workers starved on a loaded machine, with
  # backpressure off) is retried once they drained some (for up to ~30 s).
  defp ingest!(write, tries \\ 30_000) do
    case write.() do
      :ok ->
        :ok

      {:error, :buffer_full} when tries > 0 ->
        Process.sleep(1)
        ingest!(write, tries - 1)
    end
  end

  @doc """
  Asserts that every Analysis and DataAccess query gives the same answer
  on both stores (on every event, or every `step`-th for the per-event
  queries).
  """
  def assert_same_answers(%DataAccess{} = a, %DataAccess{} = b, step \\ 1) do
    sa = [store: a]
    sb = [store: b]
    all_a = Analysis.select(sa ++ [limit: 10_000_000])
    all_b = Analysis.select(sb ++ [limit: 10_000_000])
    assert length(all_a) == length(all_b)
    assert all_a == all_b

    for by <- [:function, :module, :process, :process_function],
        do: assert(Analysis.call_stat(sa ++ [by: by]) == Analysis.call_stat(sb ++ [by: by]))

    assert Analysis.top_call_trees(sa) == Analysis.top_call_trees(sb)
    assert Analysis.messages(sa) == Analysis.messages(sb)

    {:ok, ta} = DataAccess.query_by_time_range(a, -(1 <<< 62), 1 <<< 62, limit: 10_000_000)
    {:ok, tb} = DataAccess.query_by_time_range(b, -(1 <<< 62), 1 <<< 62, limit: 10_000_000)
    assert ta == tb

    pids = all_a |> Enum.map(& &1.pid) |> Enum.uniq()

    # State records: the per-process state index is rebuilt by insertion.
    # (A store that evicted may still count the state records it freed
    # since its last sweep: compare what its histories hold.)
    states = Analysis.state_processes(sa)

    if DataAccess.get_stats(a).evicted == 0,
      do: assert(states == Analysis.state_processes(sb))

    live = fn s, pids ->
      for {pid, _} <- pids,
          h = Analysis.state_history(pid, store: s, limit: 100_000),
          h != [],
          do: {pid, h}
    end

    histories = live.(a, states)
    assert histories == live.(b, Analysis.state_processes(sb))

    for {pid, history} <- histories do
      for e <- Enum.filter(all_a, &(&1.pid == pid)) |> Enum.take_every(step) do
        assert Analysis.state_at(pid, e.timestamp, sa) == Analysis.state_at(pid, e.timestamp, sb)
      end

      for st <- history |> List.wrap() |> Enum.take_every(step) do
        assert Analysis.why(st, sa) == Analysis.why(st, sb)
      end
    end

    for pid <- pids, pid != nil do
      assert DataAccess.query_by_process(a, pid, limit: 100_000) ==
               DataAccess.query_by_process(b, pid, limit: 100_000)

      assert Analysis.select(sa ++ [pid: pid]) == Analysis.select(sb ++ [pid: pid])
      assert Analysis.messages(sa ++ [pid: pid]) == Analysis.messages(sb ++ [pid: pid])
    end

    for {m, f} <- all_a |> Enum.map(&{&1.module, &1.function}) |> Enum.uniq(),
        is_atom(m) and m != nil do
      assert DataAccess.query_by_function(a, m, f, limit: 100_000) ==
               DataAccess.query_by_function(b, m, f, limit: 100_000)
    end

    all_a
    |> Enum.take_every(step)
    |> Enum.each(fn e ->
      for q <- [:get_event, :get_correlated, :causal_chain, :call_contents, :children] do
        assert apply(DataAccess, q, [a, e.id]) == apply(DataAccess, q, [b, e.id]),
               "#{q} of #{e.id}"
      end

      {:ok, ea} = DataAccess.get_event(a, e.id)
      corr = Map.get(ea, :correlation_id)

      assert DataAccess.query_by_correlation(a, corr) == DataAccess.query_by_correlation(b, corr)

      for q <- [:get, :traceback, :range, :call_tree, :next, :prev] do
        assert apply(Analysis, q, [e, sa]) == apply(Analysis, q, [e, sb]), "#{q} of #{e.id}"
      end

      assert Analysis.next(e, sa ++ [scope: :global]) == Analysis.next(e, sb ++ [scope: :global])
      assert Analysis.prev(e, sa ++ [scope: :global]) == Analysis.prev(e, sb ++ [scope: :global])
    end)

    length(all_a)
  end

  @doc "A fresh directory under the system's temp dir, removed on exit."
  def tmp_dir!(tag) do
    dir = Path.join(System.tmp_dir!(), "es_tf_#{tag}_#{System.unique_integer([:positive])}")
    File.mkdir_p!(dir)
    ExUnit.Callbacks.on_exit(fn -> File.rm_rf(dir) end)
    dir
  end

  @doc """
  Mounts two tiny (64 KiB) tmpfs under `dir`, a read-only one and a
  writable one to fill, for the file-system error tests: `{:ok, ro, full}`
  (both unmounted on exit), or `{:skip, why}` when this machine cannot
  mount them (whatever did mount is unmounted again).
  """
  def tiny_tmpfs_pair(dir) do
    ro = Path.join(dir, "ro")
    full = Path.join(dir, "full")
    File.mkdir_p!(ro)
    File.mkdir_p!(full)
    r = mount(["-t", "tmpfs", "-o", "size=64k,ro", "tmpfs", ro])
    f = mount(["-t", "tmpfs", "-o", "size=64k", "tmpfs", full])
    mounted = for {:ok, p} <- [{r, ro}, {f, full}], do: p
    umount = fn -> Enum.each(mounted, &System.cmd("umount", [&1], stderr_to_stdout: true)) end

    case {r, f} do
      {:ok, :ok} ->
        ExUnit.Callbacks.on_exit(umount)
        {:ok, ro, full}

      other ->
        umount.()
        {:skip, "cannot mount a tmpfs here (#{inspect(other)})"}
    end
  end

  @doc "`mount ARGS` (a tiny tmpfs for the file-system error tests): `:ok` or `{:error, ...}`."
  def mount(args) do
    case System.cmd("mount", args, stderr_to_stdout: true) do
      {_, 0} -> :ok
      {out, code} -> {:error, code, out}
    end
  rescue
    e -> {:error, e}
  end
end

# Trace files and exports on a real trace of ~2M events (payload: :arity),
# beside the baselines, in one run:
#
#   mix run bench/trace_file_bench.exs
#
# The trace: TraceFileBench.Work (a non-tail recursive chain of depth 32
# ending in a binary call tree of depth 6: 640 events per run/1) traced with
# ElixirScope.trace/2 (calls + returns, payload: :arity) in one process until
# about TF_BENCH_EVENTS events are stored. Then, with the house harness
# (per-event time; samples interleaved across jobs, medians):
#
# * TraceFile.save/3 (zstd 1, with and without fsync) and TraceFile.load/2
#   (into a queryable store), next to the baselines: `:erlang.term_to_binary`
#   + `File.write` of the events as `Analysis.select/1` returns them (and
#   `File.read` + `binary_to_term` back), and Erlang Doctor's dump/load
#   (`:ets.tab2file` / `:ets.file2tab` of an ETS table holding the same
#   records); bytes per event on disk for each.
# * Every ElixirScope.Export format, and the memory of the Chrome-trace
#   export above the store: the VM's peak RSS during the export (VmHWM
#   after resetting it through /proc/self/clear_refs) minus its RSS before.
#
# Files go to TF_BENCH_DIR (default System.tmp_dir!()). Environment:
# TF_BENCH_EVENTS (default 2_000_000), BENCH_SAMPLES (default 3).
Code.require_file("support/harness.exs", __DIR__)

defmodule TraceFileBench.Work do
  @moduledoc false
  # 1 + 33 chain + 32 leaf + (2^8 - 2) tree and leaf = 320 calls per run/1.
  @chain 32
  @tree 6

  def run(i), do: chain(@chain, i)

  def chain(0, i), do: tree(@tree) + i
  def chain(d, i), do: leaf(d) + chain(d - 1, i) + 1

  def tree(0), do: leaf(0)
  def tree(d), do: leaf(d) + tree(d - 1) + tree(d - 1)

  def leaf(x), do: x * 2 + 1

  def events_per_run, do: 2 * (1 + (@chain + 1) + @chain + (Integer.pow(2, @tree + 2) - 2))
end

defmodule TraceFileBench.Driver do
  @moduledoc false
  def loop(i, n) when i > n, do: :ok

  def loop(i, n) do
    TraceFileBench.Work.run(i)
    loop(i + 1, n)
  end
end

defmodule TraceFileBench do
  @moduledoc false
  alias ElixirScope.{Analysis, Export, TraceFile}
  alias ElixirScope.Bench.Harness
  alias ElixirScope.Storage.DataAccess
  alias TraceFileBench.{Driver, Work}

  defp build_trace(target) do
    runs = max(div(target, Work.events_per_run()), 1)
    parent = self()

    pid =
      spawn(fn ->
        receive do
          :go -> :ok
        end

        Driver.loop(1, runs)
        send(parent, {:done, self()})
      end)

    {:ok, _} =
      ElixirScope.trace(Work,
        pids: [pid],
        events: [:calls, :returns],
        payload: :arity,
        max_events: 3 * target,
        max_rate: 100_000_000,
        max_stored: target + 100_000,
        duration: 600_000
      )

    send(pid, :go)

    receive do
      {:done, ^pid} -> :ok
    end

    {:ok, summary} = ElixirScope.stop_trace()
    _ = ElixirScope.flush_trace(120_000)
    store = ElixirScope.trace_store()
    stats = DataAccess.get_stats(store)

    IO.puts(
      "trace: #{runs} × Work.run/1 (#{Work.events_per_run()} events each) — " <>
        "traced #{summary.traced}, dropped #{summary.dropped}, stored #{stats.total_events}"
    )

    store
  end

  defp rss_kib(field) do
    "/proc/self/status"
    |> File.read!()
    |> String.split("\n")
    |> Enum.find_value(fn line ->
      case String.split(line) do
        [^field, kib, "kB"] -> String.to_integer(kib)
        _ -> nil
      end
    end)
  end

  defp mib(bytes), do: :erlang.float_to_binary(bytes / 1_048_576, decimals: 1)

  # The export's memory above the store, in a fresh VM (this one holds the
  # baselines' 2M terms and malloc's free lists from the loads, which an
  # export would reuse unseen): load the file, then the VM's peak RSS
  # during the export (VmHWM after resetting it through clear_refs) minus
  # its RSS before.
  defp memory(tf, dir) do
    ebin = :code.lib_dir(:elixir_scope, :ebin) |> to_string()

    for f <- [:chrome_trace, :speedscope] do
      out = Path.join(dir, "tf_bench_mem_#{f}")

      code = """
      {:ok, _} = Application.ensure_all_started(:elixir_scope)
      rss = fn field ->
        "/proc/self/status" |> File.read!() |> String.split("\\n")
        |> Enum.find_value(fn l -> case String.split(l) do [^field, k, "kB"] -> String.to_integer(k); _ -> nil end end)
      end
      {:ok, s} = ElixirScope.TraceFile.load("#{tf}")
      store = ElixirScope.Native.store_stats(s.ref).memory_usage
      :erlang.garbage_collect()
      before = rss.("VmRSS:")
      File.write!("/proc/self/clear_refs", "5")
      {t, {:ok, sum}} = :timer.tc(fn -> ElixirScope.Export.export(s, "#{out}", :#{f}) end)
      peak = rss.("VmHWM:")
      IO.puts("#{f} export memory (fresh VM, \#{sum.events} events loaded): store \#{div(store, 1048576)} MiB, " <>
        "RSS \#{div(before, 1024)} MiB before, peak \#{div(peak, 1024)} MiB during: " <>
        "\#{div(peak - before, 1024)} MiB above; \#{div(t, 1000)} ms, \#{div(sum.bytes, 1048576)} MiB written")
      """

      {outp, 0} =
        System.cmd(System.find_executable("elixir"), ["-pa", ebin, "-e", code],
          stderr_to_stdout: true
        )

      IO.write("\n" <> outp)
      File.rm(out)
    end
  end

  def run do
    target = Harness.env_int("TF_BENCH_EVENTS", 2_000_000)
    samples = Harness.env_int("BENCH_SAMPLES", 3)
    dir = System.get_env("TF_BENCH_DIR", System.tmp_dir!())
    IO.puts("# Trace files and exports\n\n#{Harness.machine()}\n")
    {:ok, _} = Application.ensure_all_started(:elixir_scope)
    store = build_trace(target)
    n = DataAccess.get_stats(store).total_events
    store_mem = ElixirScope.Native.store_stats(store.ref).memory_usage
    IO.puts("store: #{n} events, #{mib(store_mem)} MiB\n")

    p = &Path.join(dir, "tf_bench_#{&1}")
    tf = p.("trace.estrace")
    etf = p.("select.etf")
    ets_file = p.("doctor.ets")

    # The baselines' data: the events as Analysis.select/1 returns them, and
    # an ETS table of the same records (Erlang Doctor keeps tuples in ETS).
    if System.get_env("TF_BENCH_PARTS") == "memory" do
      {:ok, _} = TraceFile.save(store, tf)
      memory(tf, dir)
      File.rm(tf)
      System.halt(0)
    end

    {select_us, entries} = :timer.tc(fn -> Analysis.select(store: store, limit: n + 1) end)

    IO.puts(
      "Analysis.select/1 of #{length(entries)} events: #{div(select_us, 1000)} ms (not in the baselines' times)"
    )

    table = :ets.new(:tf_bench, [:ordered_set, :public])
    true = :ets.insert(table, Enum.map(entries, &{&1.id, &1}))
    {:ok, _} = TraceFile.save(store, tf)
    File.write!(etf, :erlang.term_to_binary(entries))
    :ok = :ets.tab2file(table, String.to_charlist(ets_file))

    jobs = [
      %{
        name: "TraceFile.save (zstd 1, fsync)",
        n: n,
        run: fn _ -> {:ok, _} = TraceFile.save(store, tf) end
      },
      %{
        name: "TraceFile.save (zstd 1, no fsync)",
        n: n,
        run: fn _ -> {:ok, _} = TraceFile.save(store, tf, sync: false) end
      },
      %{
        name: "baseline: term_to_binary + File.write",
        n: n,
        run: fn _ -> File.write!(etf, :erlang.term_to_binary(entries)) end
      },
      %{
        name: "baseline: :ets.tab2file",
        n: n,
        run: fn _ -> :ok = :ets.tab2file(table, String.to_charlist(ets_file)) end
      },
      %{
        name: "TraceFile.load",
        n: n,
        run: fn _ ->
          {:ok, s} = TraceFile.load(tf)
          DataAccess.destroy(s)
        end
      },
      %{
        name: "baseline: File.read + binary_to_term",
        n: n,
        run: fn _ -> length(:erlang.binary_to_term(File.read!(etf))) end
      },
      %{
        name: "baseline: :ets.file2tab",
        n: n,
        run: fn _ ->
          {:ok, t} = :ets.file2tab(String.to_charlist(ets_file))
          :ets.delete(t)
        end
      }
    ]

    sizes = %{
      "TraceFile.save (zstd 1, fsync)" => File.stat!(tf).size,
      "TraceFile.save (zstd 1, no fsync)" => File.stat!(tf).size,
      "baseline: term_to_binary + File.write" => File.stat!(etf).size,
      "baseline: :ets.tab2file" => File.stat!(ets_file).size,
      "TraceFile.load" => File.stat!(tf).size,
      "baseline: File.read + binary_to_term" => File.stat!(etf).size,
      "baseline: :ets.file2tab" => File.stat!(ets_file).size
    }

    res = Harness.run(jobs, samples: samples, warmup: 1)

    extra = fn name ->
      md = res[name].median

      "#{:erlang.float_to_binary(1.0e3 / md, decimals: 2)} M events/s, " <>
        "#{:erlang.float_to_binary(md * n / 1.0e9, decimals: 3)} s for #{n}, " <>
        "#{:erlang.float_to_binary(sizes[name] / n, decimals: 2)} B/event"
    end

    Harness.print_table(
      "Save and load, per event (#{n} events, payload: :arity, #{dir})",
      res,
      Enum.map(jobs, & &1.name),
      extra
    )

    :ets.delete(table)

    # Exports.
    outs = %{
      chrome_trace: "chrome.json",
      speedscope: "speedscope.json",
      folded: "folded",
      flamegraph: "flame.svg"
    }

    ejobs =
      for f <- Export.formats() do
        %{
          name: "Export.#{f}",
          n: n,
          run: fn _ -> {:ok, _} = Export.export(store, p.(outs[f]), f) end
        }
      end

    eres = Harness.run(ejobs, samples: samples, warmup: 1)

    eextra = fn name ->
      f = name |> String.replace_prefix("Export.", "") |> String.to_existing_atom()
      md = eres[name].median

      "#{:erlang.float_to_binary(md * n / 1.0e9, decimals: 3)} s, #{mib(File.stat!(p.(outs[f])).size)} MiB out"
    end

    Harness.print_table(
      "Exports, per event (#{n} events)",
      eres,
      Enum.map(ejobs, & &1.name),
      eextra
    )

    memory(tf, dir)
    for f <- [tf, etf, ets_file | Enum.map(Map.values(outs), p)], do: File.rm(f)
  end
end

TraceFileBench.run()

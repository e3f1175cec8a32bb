defmodule ElixirScope.ExportTest do
  # Traces are node-wide (one at a time).
  use ExUnit.Case, async: false

  import ElixirScope.TraceFileHelpers
  import ElixirScope.ExportValidation

  alias ElixirScope.{Analysis, Export, TraceFile}
  alias ElixirScope.Storage.DataAccess

  @moduletag timeout: 300_000

  setup do
    on_exit(fn ->
      ElixirScope.stop_trace()
      if Code.ensure_loaded?(ElixirScope.SampleApp), do: apply(ElixirScope.SampleApp, :stop, [])
    end)

    {:ok, dir: tmp_dir!("export")}
  end

  defp label(pid), do: pid |> inspect() |> String.trim_leading("#PID")

  defp read_json(path), do: path |> File.read!() |> decode!()

  # {pid, tid} of the thread whose name starts with the pid's label.
  defp thread_of(trace, pid) do
    l = label(pid)

    Enum.find_value(trace["traceEvents"], fn
      %{"ph" => "M", "name" => "thread_name", "args" => %{"name" => n}} = e ->
        if n == l or String.starts_with?(n, l <> " "), do: {e["pid"], e["tid"]}

      _ ->
        nil
    end)
  end

  defp on(trace, {p, t}, ph),
    do: Enum.filter(trace["traceEvents"], &(&1["pid"] == p and &1["tid"] == t and &1["ph"] == ph))

  describe "chrome_trace" do
    test "the demo app's trace: calls, instants, flows, names, and the format's rules", %{
      dir: dir
    } do
      {store, truth} = demo_trace()
      path = Path.join(dir, "demo.json")
      assert {:ok, s} = Export.chrome_trace(:trace, path)
      assert s.format == :chrome_trace and s.path == path
      assert s.events == DataAccess.get_stats(store).total_events
      assert s.bytes == File.stat!(path).size

      trace = read_json(path)
      assert chrome_errors(trace) == []
      evs = trace["traceEvents"]
      xs = Enum.filter(evs, &(&1["ph"] == "X"))
      assert length(xs) == s.calls
      assert Enum.count(evs, &(&1["ph"] == "i")) == s.instants
      assert Enum.count(evs, &(&1["ph"] == "s")) == s.flows
      assert s.flows > 0

      # One node, named; every Erlang process a named thread of it.
      assert [%{"pid" => 1, "args" => %{"name" => node_name}}] =
               Enum.filter(evs, &(&1["name"] == "process_name"))

      assert node_name == Atom.to_string(node())
      bank_after = thread_of(trace, truth.bank_pid_after)
      bank_before = thread_of(trace, truth.bank_pid_before)
      caller = thread_of(trace, truth.caller_pid)
      assert bank_after && bank_before && caller

      assert Enum.any?(evs, fn e ->
               e["name"] == "thread_name" and {e["pid"], e["tid"]} == bank_after and
                 e["args"]["name"] =~ "ElixirScope.SampleApp.Bank"
             end)

      # fib's calls, all in the first Bank process, with their arguments
      # and return values.
      fibs = Enum.filter(xs, &(&1["name"] == "ElixirScope.SampleApp.Math.fib/1"))
      assert length(fibs) == truth.fib_calls
      assert Enum.all?(fibs, &({&1["pid"], &1["tid"]} == bank_before))
      assert Enum.all?(fibs, &(&1["args"]["end"] == "return"))
      top = Enum.max_by(fibs, & &1["dur"])
      assert top["args"]["args"] == "[#{truth.fib_n}]"
      assert top["args"]["return"] == Integer.to_string(truth.fib_result)

      # The crash: the exception leaves check_funds!/2, an exception and an
      # exit instant on the Bank process that died.
      [crash] =
        Enum.filter(
          xs,
          &(&1["name"] == "ElixirScope.SampleApp.Bank.check_funds!/2" and
              &1["args"]["end"] == "exception")
        )

      assert crash["args"]["exception"] =~ "InsufficientFunds"
      assert {crash["pid"], crash["tid"]} == bank_before
      names = bank_before |> then(&on(trace, &1, "i")) |> Enum.map(& &1["name"])
      assert "exception" in names and "exit" in names and "receive" in names

      # Arrows: a send of the caller to the Bank ends on the Bank's thread,
      # at or after its start.
      starts = Map.new(Enum.filter(evs, &(&1["ph"] == "s")), &{&1["id"], &1})
      ends = Enum.filter(evs, &(&1["ph"] == "f"))

      assert Enum.any?(ends, fn f ->
               st = starts[f["id"]]

               {st["pid"], st["tid"]} == caller and
                 {f["pid"], f["tid"]} in [bank_before, bank_after]
             end)

      # Every flow's id is the id of a stored send, whose receive is
      # correlated to it.
      sends = Analysis.select(types: [:send], store: store, limit: 100_000)
      ids = MapSet.new(sends, & &1.id)
      assert Enum.all?(Map.keys(starts), &MapSet.member?(ids, &1))

      # Timestamps: ns since the oldest event, as µs.
      oldest = DataAccess.get_stats(store).oldest_timestamp
      assert trace["otherData"]["origin_ns"] == oldest
      assert Enum.all?(evs, &(&1["ph"] == "M" or &1["ts"] >= 0))
    end

    test "previews are cut at preview_bytes", %{dir: dir} do
      {:ok, s} = DataAccess.new(max_events: 100)
      big = String.duplicate("x", 5_000)
      pid = self()

      :ok =
        DataAccess.store_event(s, %{
          id: 1,
          timestamp: 10,
          event_type: :send,
          data: big,
          pid: pid
        })

      path = Path.join(dir, "p.json")
      {:ok, _} = Export.chrome_trace(s, path, preview_bytes: 40)
      trace = read_json(path)
      assert chrome_errors(trace) == []
      [i] = Enum.filter(trace["traceEvents"], &(&1["ph"] == "i"))
      assert Enum.all?(Map.values(i["args"]), &(not is_binary(&1) or byte_size(&1) <= 40 + 3))
      assert Enum.any?(Map.values(i["args"]), &(is_binary(&1) and String.ends_with?(&1, "…")))
    end

    test "a seeded random workload, a bounded store (orphans) and a loaded file", %{dir: dir} do
      for {seed, max} <- [{1, 1_000_000}, {2, 700}] do
        {pm, store} = random_pipeline(seed, 3_000, max_events: max)
        path = Path.join(dir, "r#{seed}.json")
        {:ok, s} = Export.chrome_trace(store, path)
        trace = read_json(path)
        assert chrome_errors(trace) == []
        assert s.events == DataAccess.get_stats(store).total_events
        assert Enum.count(trace["traceEvents"], &(&1["ph"] == "X")) == s.calls
        if max < 1_000, do: assert(s.orphans > 0)

        # A saved and loaded store exports the same events.
        file = Path.join(dir, "r#{seed}.estrace")
        {:ok, _} = TraceFile.save(store, file)
        loaded_path = Path.join(dir, "r#{seed}.loaded.json")
        {:ok, s2} = Export.chrome_trace(file, loaded_path)
        assert Map.drop(s2, [:path, :bytes]) == Map.drop(s, [:path, :bytes])
        assert read_json(loaded_path)["traceEvents"] == trace["traceEvents"]
        GenServer.stop(pm)
      end
    end
  end

  describe "speedscope" do
    test "validates against speedscope's published schema; one profile per process", %{dir: dir} do
      {_store, truth} = demo_trace()
      path = Path.join(dir, "demo.speedscope.json")
      assert {:ok, s} = Export.speedscope(:trace, path)
      file = read_json(path)
      assert speedscope_errors(file) == []
      assert file["$schema"] == "https://www.speedscope.app/file-format-schema.json"
      assert length(file["profiles"]) == s.stacks
      names = Enum.map(file["profiles"], & &1["name"])
      assert length(Enum.uniq(names)) == length(names)

      assert Enum.all?(
               file["profiles"],
               &(&1["type"] == "evented" and &1["unit"] == "nanoseconds")
             )

      # The first Bank process's profile opens fib/1 as often as it was called.
      frames = Enum.map(file["shared"]["frames"], & &1["name"])
      fib = Enum.find_index(frames, &(&1 == "ElixirScope.SampleApp.Math.fib/1"))

      [bank] =
        Enum.filter(
          file["profiles"],
          &String.starts_with?(&1["name"], label(truth.bank_pid_before))
        )

      assert Enum.count(bank["events"], &(&1["type"] == "O" and &1["frame"] == fib)) ==
               truth.fib_calls

      # The busiest profile is the active one.
      active = Enum.at(file["profiles"], file["activeProfileIndex"])

      assert length(active["events"]) ==
               file["profiles"] |> Enum.map(&length(&1["events"])) |> Enum.max()

      # The schema checker catches what the schema forbids.
      refute schema_errors(Map.delete(file, "shared"), speedscope_schema()) == []
      bad = put_in(file, ["profiles", Access.at(0), "unit"], "parsecs")
      refute schema_errors(bad, speedscope_schema()) == []
    end

    test "random workloads, crashes and evictions keep every profile well formed", %{dir: dir} do
      for {seed, max} <- [{3, 1_000_000}, {4, 500}] do
        {pm, store} = random_pipeline(seed, 3_000, max_events: max)
        path = Path.join(dir, "r#{seed}.speedscope.json")
        {:ok, s} = Export.speedscope(store, path)
        file = read_json(path)
        assert speedscope_errors(file) == [], "seed #{seed}"

        opens =
          file["profiles"] |> Enum.flat_map(& &1["events"]) |> Enum.count(&(&1["type"] == "O"))

        assert opens == s.calls
        GenServer.stop(pm)
      end
    end
  end

  describe "folded and flamegraph" do
    test "folded stacks weighted by calls and by own time agree with the timeline", %{dir: dir} do
      {_store, truth} = demo_trace()
      calls_path = Path.join(dir, "calls.folded")
      time_path = Path.join(dir, "time.folded")
      chrome = Path.join(dir, "demo.json")
      {:ok, sc} = Export.folded(:trace, calls_path, weight: :calls)
      {:ok, _} = Export.folded(:trace, time_path)
      {:ok, _} = Export.chrome_trace(:trace, chrome)

      calls = folded_lines!(File.read!(calls_path))
      assert length(calls) == sc.stacks
      assert calls |> Enum.map(&elem(&1, 1)) |> Enum.sum() == sc.calls
      # Every stack starts with its process.
      assert Enum.all?(calls, fn {[root | _], _} -> String.starts_with?(root, "<") end)

      fib_calls =
        for {frames, w} <- calls,
            List.last(frames) == "ElixirScope.SampleApp.Math.fib/1",
            reduce: 0,
            do: (acc -> acc + w)

      assert fib_calls == truth.fib_calls

      # Own times add up to the time of the outermost calls (in ns).
      own = time_path |> File.read!() |> folded_lines!() |> Enum.map(&elem(&1, 1)) |> Enum.sum()
      xs = chrome |> read_json() |> Map.fetch!("traceEvents") |> Enum.filter(&(&1["ph"] == "X"))

      roots =
        xs
        |> Enum.group_by(&{&1["pid"], &1["tid"]})
        |> Enum.flat_map(fn {_, es} ->
          es
          |> Enum.map(&{ns(&1["ts"]), ns(&1["dur"])})
          |> Enum.sort_by(fn {ts, dur} -> {ts, -dur} end)
          |> Enum.reduce({[], -1}, fn {ts, dur} = e, {acc, until} ->
            if ts >= until, do: {[e | acc], ts + dur}, else: {acc, until}
          end)
          |> elem(0)
        end)

      root_ns = roots |> Enum.map(&elem(&1, 1)) |> Enum.sum()
      assert own == root_ns
    end

    test "max_depth merges deeper frames; process_roots: false drops the process", %{dir: dir} do
      {_store, _truth} = demo_trace()
      path = Path.join(dir, "d.folded")
      {:ok, _} = Export.folded(:trace, path, weight: :calls, max_depth: 3, process_roots: false)
      lines = folded_lines!(File.read!(path))
      assert Enum.all?(lines, fn {frames, _} -> length(frames) <= 4 end)
      assert Enum.any?(lines, fn {frames, _} -> List.last(frames) == "…" end)
      refute Enum.any?(lines, fn {[root | _], _} -> String.starts_with?(root, "<") end)
    end

    test "flamegraph renders an SVG in-process", %{dir: dir} do
      {_store, _truth} = demo_trace()
      path = Path.join(dir, "demo.svg")
      {:ok, s} = Export.flamegraph(:trace, path, title: "demo <flame>")
      svg = File.read!(path)
      assert s.stacks > 0
      assert svg =~ ~r/^<\?xml/
      assert svg =~ "<svg"
      assert svg =~ "ElixirScope.SampleApp.Math.fib/1"
      assert svg =~ "demo &lt;flame&gt;"
      assert String.ends_with?(String.trim_trailing(svg), "</svg>")

      # An empty store still gives a valid (empty) graph.
      {:ok, empty} = DataAccess.new(max_events: 10)
      {:ok, e} = Export.flamegraph(empty, Path.join(dir, "empty.svg"))
      assert e.stacks == 0
      assert File.read!(Path.join(dir, "empty.svg")) =~ "no completed calls"
    end
  end

  describe "bad input" do
    setup do
      {:ok, s} = DataAccess.new(max_events: 1_000)

      for i <- 1..50,
          do: :ok = DataAccess.store_event(s, %{id: i, timestamp: i, event_type: :send, data: i})

      {:ok, store: s}
    end

    test "a directory, a missing directory, a file as a directory", %{store: s, dir: dir} do
      for f <- Export.formats() do
        assert {:error, {:eisdir, %{path: ^dir}}} = Export.export(s, dir, f)
        missing = Path.join([dir, "no", "such", "x.out"])
        assert {:error, {:enoent, _}} = Export.export(s, missing, f)
        file = Path.join(dir, "plain")
        File.write!(file, "x")
        assert {:error, {:enotdir, _}} = Export.export(s, Path.join(file, "x.out"), f)
      end

      assert File.ls!(dir) == ["plain"]
    end

    test "unknown format, options and sources", %{store: s, dir: dir} do
      path = Path.join(dir, "x")

      assert_raise ArgumentError, ~r/unknown export format :svg/, fn ->
        Export.export(s, path, :svg)
      end

      assert_raise ArgumentError, ~r/unknown/, fn -> Export.folded(s, path, bogus: 1) end
      assert_raise ArgumentError, ~r/weight/, fn -> Export.folded(s, path, weight: :bytes) end

      assert_raise ArgumentError, ~r/preview_bytes/, fn ->
        Export.chrome_trace(s, path, preview_bytes: 0)
      end

      assert_raise ArgumentError, ~r/max_depth/, fn -> Export.folded(s, path, max_depth: 0) end
      assert_raise ArgumentError, ~r/path/, fn -> Export.folded(s, "") end
      assert_raise ArgumentError, ~r/source/, fn -> Export.folded({:not, :a_store}, path) end
      assert Export.folded(:no_such_pipeline, path) == {:error, :no_pipeline}
      assert {:error, {:enoent, _}} = Export.folded(Path.join(dir, "missing.estrace"), path)
      File.write!(Path.join(dir, "junk.estrace"), "not a trace file")

      assert {:error, {:not_a_trace_file, _}} =
               Export.folded(Path.join(dir, "junk.estrace"), path)

      refute File.exists?(path)
    end

    test "a read-only and a full file system (tiny tmpfs)", %{store: s, dir: dir} do
      case tiny_tmpfs_pair(dir) do
        {:ok, ro, full} ->
          assert {:error, {:erofs, _}} = Export.chrome_trace(s, Path.join(ro, "x.json"))

          # 64 KiB cannot hold the export of 2,000 events with previews.
          {:ok, big} = DataAccess.new(max_events: 5_000)

          for i <- 1..2_000,
              do:
                :ok =
                  DataAccess.store_event(big, %{
                    id: i,
                    timestamp: i,
                    event_type: :send,
                    data: :crypto.strong_rand_bytes(64)
                  })

          for f <- [:chrome_trace, :speedscope] do
            target = Path.join(full, "x.out")
            result = Export.export(big, target, f)

            if f == :chrome_trace do
              assert {:error, {:enospc, _}} = result
            end

            # Nothing is left behind: neither the target nor a partial
            # file nor a spool.
            assert File.ls!(full) == [] or match?({:ok, _}, result)
            File.rm_rf!(target)
          end

          # A small export still fits.
          assert {:ok, _} = Export.chrome_trace(s, Path.join(full, "small.json"))

        {:skip, why} ->
          IO.puts("skipped: #{why}")
      end
    end

    test "a write limit in another VM (ulimit -f, SIGXFSZ ignored) gives efbig", %{dir: dir} do
      path = Path.join(dir, "limited.json")

      code = """
      {:ok, _} = Application.ensure_all_started(:elixir_scope)
      alias ElixirScope.Storage.DataAccess
      {:ok, s} = DataAccess.new(max_events: 20_000)
      evs = for i <- 1..20_000, do: %{id: i, timestamp: i, event_type: :send, data: :crypto.strong_rand_bytes(100)}
      {:ok, _} = DataAccess.store_events(s, evs)
      IO.inspect(ElixirScope.Export.chrome_trace(s, "#{path}"), label: "RESULT")
      IO.inspect(File.ls!("#{dir}"), label: "LEFT")
      """

      ebin = :code.lib_dir(:elixir_scope, :ebin) |> to_string()

      {out, status} =
        System.cmd(
          "sh",
          [
            "-c",
            "trap '' XFSZ; ulimit -f 1024 && exec \"$0\" \"$@\"",
            System.find_executable("elixir"),
            "-pa",
            ebin,
            "-e",
            code
          ],
          stderr_to_stdout: true
        )

      assert status == 0, out
      assert out =~ ~r/RESULT: \{:error,\s*\{:efbig/
      assert out =~ "LEFT: []"
    end
  end

  describe "mix elixir_scope.export" do
    test "exports a trace file in each format; refuses unknown formats", %{dir: dir} do
      {_store, _truth} = demo_trace()
      file = Path.join(dir, "demo.estrace")
      {:ok, _} = TraceFile.save(:trace, file)
      Mix.shell(Mix.Shell.Process)

      for f <- Export.formats() do
        out = Path.join(dir, "demo.#{f}")
        Mix.Tasks.ElixirScope.Export.run([file, "--format", Atom.to_string(f), "-o", out])
        assert_received {:mix_shell, :info, [msg]}
        assert msg =~ "#{f}"
        assert File.stat!(out).size > 0
      end

      assert chrome_errors(read_json(Path.join(dir, "demo.chrome_trace"))) == []
      assert speedscope_errors(read_json(Path.join(dir, "demo.speedscope"))) == []

      assert_raise Mix.Error, ~r/unknown format "svg"/, fn ->
        Mix.Tasks.ElixirScope.Export.run([file, "--format", "svg", "-o", Path.join(dir, "x")])
      end

      assert_raise Mix.Error, ~r/--output/, fn ->
        Mix.Tasks.ElixirScope.Export.run([file, "--format", "folded"])
      end

      assert_raise Mix.Error, ~r/not_a_trace_file/, fn ->
        Mix.Tasks.ElixirScope.Export.run([__ENV__.file, "-f", "folded", "-o", Path.join(dir, "y")])
      end
    after
      Mix.shell(Mix.Shell.IO)
    end
  end
end

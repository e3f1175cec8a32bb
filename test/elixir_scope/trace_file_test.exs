defmodule ElixirScope.TraceFileTest do
  # Traces are node-wide (one at a time).
  use ExUnit.Case, async: false

  import Bitwise
  import ElixirScope.TraceFileHelpers

  alias ElixirScope.{Analysis, TraceFile}
  alias ElixirScope.Capture.{Ingestor, PipelineManager}
  alias ElixirScope.Storage.DataAccess

  @moduletag timeout: 300_000

  setup do
    on_exit(fn ->
      ElixirScope.stop_trace()
      if Code.ensure_loaded?(ElixirScope.SampleApp), do: apply(ElixirScope.SampleApp, :stop, [])
    end)

    {:ok, dir: tmp_dir!("tf")}
  end

  describe "round trips" do
    test "the demo app's trace: every query answers alike after save and load", %{dir: dir} do
      {store, truth} = demo_trace()
      path = Path.join(dir, "demo.estrace")
      assert {:ok, saved} = TraceFile.save(:trace, path)
      assert saved.events == DataAccess.get_stats(store).total_events
      assert saved.skipped == 0

      {:ok, loaded} = TraceFile.load(path)
      assert [%{complete: true, events: n}] = loaded.source.files
      assert n == saved.events
      assert loaded.source.notes == []
      assert loaded.source.atoms_created == 0
      assert assert_same_answers(store, loaded) == saved.events

      # The crash is still the crash, with its traceback.
      [crash | _] =
        Analysis.select(types: [:exception], pid: truth.bank_pid_before, store: loaded)

      assert %{function: :handle_call} = List.last(Analysis.traceback(crash, store: loaded))

      # The trace's options and counters and the process names travel along.
      {:ok, info} = TraceFile.info(path)
      assert info.metadata.trace.traced == saved.events
      assert info.metadata.trace.options.calls == true
      assert info.complete and info.events == saved.events and info.node == "#{node()}"
      names = Map.new(TraceFile.process_names(loaded))
      assert names[truth.auditor_pid] == "ElixirScope.SampleApp.Auditor"
      # The Bank's states travel too.
      assert [_ | _] = Analysis.state_processes(store: loaded)
    end

    test "the demo app traced with state snapshots", %{dir: dir} do
      {store, truth} = demo_trace(state: :snapshot)
      path = Path.join(dir, "states.estrace")
      {:ok, %{events: n}} = TraceFile.save(store, path)
      {:ok, loaded} = TraceFile.load(path)
      assert assert_same_answers(store, loaded) == n
      bank = truth.bank_pid_before
      assert [_ | _] = history = Analysis.state_history(bank, store: loaded)
      last = List.last(history)

      assert Analysis.state_at(bank, last.timestamp, store: loaded) ==
               Analysis.state_at(bank, last.timestamp, store: store)
    end

    test "a seeded random workload through a pipeline, each codec", %{dir: dir} do
      {pm, store} = random_pipeline(1234, 20_000)

      for codec <- [:zstd, :lz4, :none] do
        path = Path.join(dir, "random_#{codec}.estrace")

        assert {:ok, %{events: n}} =
                 TraceFile.save(pm, path, compression: codec, block_events: 999)

        assert n == DataAccess.get_stats(store).total_events
        {:ok, loaded} = TraceFile.load(path)
        assert assert_same_answers(store, loaded, 7) == n
        assert {:ok, ^codec} = {:ok, elem(TraceFile.info(path), 1).compression}
        :ok = DataAccess.destroy(loaded)
      end

      PipelineManager.shutdown(pm)
    end

    test "a plain DataAccess store of arbitrary terms", %{dir: dir} do
      {:ok, store} = DataAccess.new(max_events: 1000)

      events = [
        %{id: 1, timestamp: 10, pid: self(), module: M, function: :f, data: "x"},
        %{id: 2, timestamp: 11, pid: "not a pid", correlation_id: {:ref, make_ref()}},
        {:tuple, 3, [1.5, <<1, 2, 3>>, fn -> :ok end, 1 <<< 80]},
        %{event_id: :an_atom_id, timestamp: 12, pid: hd(Port.list())}
      ]

      {:ok, 4} = DataAccess.store_events(store, events)
      path = Path.join(dir, "plain.estrace")
      assert {:ok, %{events: 4}} = TraceFile.save(store, path)
      {:ok, loaded} = TraceFile.load(path)
      {:ok, a} = DataAccess.query_by_time_range(store, -(1 <<< 62), 1 <<< 62)
      {:ok, b} = DataAccess.query_by_time_range(loaded, -(1 <<< 62), 1 <<< 62)
      assert a == b
      assert DataAccess.get_event(loaded, 1) == DataAccess.get_event(store, 1)

      assert DataAccess.query_by_process(loaded, self()) ==
               DataAccess.query_by_process(store, self())

      assert DataAccess.store_event(loaded, %{id: 9}) == {:error, :read_only}
    end

    test "a store that evicted keeps what it holds and its counters", %{dir: dir} do
      {pm, store} = random_pipeline(7, 5_000, max_events: 1_000)
      path = Path.join(dir, "evicted.estrace")
      {:ok, %{events: 1_000}} = TraceFile.save(pm, path)
      {:ok, info} = TraceFile.info(path)
      stats = DataAccess.get_stats(store)
      assert info.store.max_events == 1_000
      assert info.store.evicted == stats.evicted and stats.evicted > 0
      {:ok, loaded} = TraceFile.load(path)
      assert_same_answers(store, loaded, 5)
      PipelineManager.shutdown(pm)
    end

    test "saving while the pipeline keeps storing", %{dir: dir} do
      {pm, store} = random_pipeline(99, 20_000)
      buf = PipelineManager.ring_buffer(pm)
      before = DataAccess.get_stats(store).total_events

      writer =
        Task.async(fn ->
          for i <- 1..50_000, do: Ingestor.ingest_message_send(buf, self(), self(), {:more, i})
        end)

      path = Path.join(dir, "live.estrace")
      {:ok, saved} = TraceFile.save(pm, path, block_events: 512)
      Task.await(writer, 60_000)
      # What was stored when the save began, minus what was evicted since.
      {:ok, info} = TraceFile.info(path)
      assert info.store.live >= before
      assert saved.events + saved.skipped == info.store.live
      {:ok, loaded} = TraceFile.load(path)
      assert DataAccess.get_stats(loaded).total_events == saved.events
      PipelineManager.shutdown(pm)
    end
  end

  describe "merging" do
    test "two traces of one node merge into what one store of both answers", %{dir: dir} do
      {first, _} = demo_trace()
      a = Analysis.select(store: first)
      stats_a = Analysis.call_stat(store: first)
      p1 = Path.join(dir, "one.estrace")
      {:ok, _} = TraceFile.save(first, p1)

      {second, _} = demo_trace(payload: :arity)
      b = Analysis.select(store: second)
      p2 = Path.join(dir, "two.estrace")
      {:ok, _} = TraceFile.save(second, p2)

      {:ok, merged} = TraceFile.load([p1, p2])
      assert Enum.map(merged.source.files, & &1.id_shift) == [0, 0]
      assert Analysis.select(store: merged, limit: 1_000_000) == a ++ b

      # Call statistics of the merge add up those of each trace.
      sum =
        (stats_a ++ Analysis.call_stat(store: second))
        |> Enum.group_by(& &1.key)
        |> Map.new(fn {k, v} -> {k, Enum.sum(Enum.map(v, & &1.count))} end)

      assert Map.new(Analysis.call_stat(store: merged), &{&1.key, &1.count}) == sum

      for e <- Enum.take_every(a ++ b, 5) do
        store = if e in a, do: first, else: second
        assert Analysis.traceback(e, store: merged) == Analysis.traceback(e, store: store)
        assert Analysis.range(e, store: merged) == Analysis.range(e, store: store)
      end
    end

    test "one file loaded twice gets fresh ids for its copy, links intact", %{dir: dir} do
      {store, _} = demo_trace()
      path = Path.join(dir, "twice.estrace")
      {:ok, %{events: n}} = TraceFile.save(store, path)
      {:ok, both} = TraceFile.load([path, path])
      [f1, f2] = both.source.files
      assert f1.id_shift == 0 and f2.id_shift > 0
      assert DataAccess.get_stats(both).total_events == 2 * n
      assert [_ | _] = both.source.notes

      for e <- Analysis.select(store: store, types: [:call]) |> Enum.take(20) do
        copy = Analysis.get(e.id + f2.id_shift, store: both)
        assert copy.function == e.function and copy.data == e.data

        assert Enum.map(Analysis.traceback(copy, store: both), & &1.id) ==
                 Enum.map(Analysis.traceback(e, store: store), &(&1.id + f2.id_shift))
      end
    end
  end

  describe "another VM" do
    test "a file from another VM: atoms by name, pids foreign but faithful", %{dir: dir} do
      path = Path.join(dir, "child.estrace")
      atom = "tf_child_only_#{System.unique_integer([:positive])}"

      out =
        child_vm("""
        {:ok, _} = Application.ensure_all_started(:elixir_scope)
        alias ElixirScope.Capture.{Ingestor, PipelineManager}
        {:ok, pm} = PipelineManager.start_link(name: :child, backpressure_enabled: false)
        buf = PipelineManager.ring_buffer(pm)
        other = spawn(fn -> Process.sleep(:infinity) end)
        f = String.to_atom("#{atom}")
        for i <- 1..100 do
          :ok = Ingestor.ingest_function_call(buf, ChildMod, f, [i, other], self(), i)
          :ok = Ingestor.ingest_message_send(buf, self(), other, {f, i})
          :ok = Ingestor.ingest_function_return(buf, {:ok, other}, 10, i)
        end
        :ok = PipelineManager.flush(pm)
        {:ok, _} = ElixirScope.TraceFile.save(pm, "#{path}")
        IO.puts("PIDS " <> Base.encode64(:erlang.term_to_binary({self(), other})))
        """)

      [_, b64] = Regex.run(~r/PIDS (\S+)/, out)
      {child_self, child_other} = :erlang.binary_to_term(Base.decode64!(b64))
      for m <- [TraceFile, Analysis, DataAccess, Analysis.Entry], do: Code.ensure_loaded!(m)
      # Warm up the error path (loading code creates atoms too).
      {:error, {:enoent, _}} = TraceFile.load(Path.join(dir, "missing"))

      # Existing atoms only: the child's function name does not exist here.
      before = :erlang.system_info(:atom_count)

      assert {:error, {:too_many_atoms, %{path: ^path, detail: detail}}} =
               TraceFile.load(path, max_new_atoms: 0)

      assert detail =~ atom
      assert :erlang.system_info(:atom_count) == before

      {:ok, store} = TraceFile.load(path)
      # The function's name (ChildMod exists here: this test names it).
      assert store.source.atoms_created == 1
      assert :erlang.system_info(:atom_count) == before + 1
      assert store.source.foreign_processes == 2
      {:ok, _} = TraceFile.load(path)
      assert :erlang.system_info(:atom_count) == before + 1

      calls = Analysis.select(store: store, types: [:call])
      assert length(calls) == 100
      fun = String.to_existing_atom(atom)
      assert Enum.all?(calls, &(&1.function == fun and &1.module == ChildMod))
      [pid] = calls |> Enum.map(& &1.pid) |> Enum.uniq()

      # Not one of this VM's processes, though it prints like one: the
      # child's (another VM instance of nonode@nohost) pid with creation + 1.
      assert is_pid(pid) and pid not in Process.list()
      assert pid != child_self
      assert inspect(pid) == inspect(child_self)
      assert creation(pid) == creation(child_self) + 1
      [_, other] = hd(calls).data
      assert inspect(other) == inspect(child_other) and other != pid

      # Queries by a foreign pid work, and results carry it.
      assert length(Analysis.select(store: store, pid: pid)) == 300
      {:ok, evs} = DataAccess.query_by_process(store, pid)
      assert length(evs) == 300
      assert [%{from: ^pid, to: ^other} | _] = Analysis.messages(store: store)
      assert [%{key: ^pid, count: 100}] = Analysis.call_stat(store: store, by: :process)
    end

    test "a save killed midway leaves a partial file that loads its complete blocks", %{
      dir: dir
    } do
      path = Path.join(dir, "killed.estrace")

      # The child runs under a 16 MiB file-size limit (ulimit -f): the
      # kernel kills it (SIGXFSZ) in the middle of writing the ~80 MB file,
      # as a kill -9 would, with data still in the writer's buffer.
      port =
        child_vm_port(
          """
          {:ok, _} = Application.ensure_all_started(:elixir_scope)
          alias ElixirScope.Storage.DataAccess
          {:ok, s} = DataAccess.new(max_events: 40_000)
          evs = for i <- 1..40_000, do: %{id: i, timestamp: i, data: :crypto.strong_rand_bytes(2048)}
          {:ok, _} = DataAccess.store_events(s, evs)
          ElixirScope.TraceFile.save(s, "#{path}", compression: :none, block_events: 64)
          IO.puts("DONE")
          """,
          file_limit_kib: 16_384
        )

      status =
        receive do
          {^port, {:exit_status, st}} -> st
        after
          120_000 -> flunk("the child VM did not exit")
        end

      # 128 + SIGXFSZ (25).
      assert status == 153, "the child was not killed mid-write (exit #{status})"
      refute File.exists?(path)
      [file] = Path.wildcard(Path.join(dir, "killed.estrace.partial-*"))

      {:ok, store} = TraceFile.load(file)
      [f] = store.source.files
      refute f.complete
      assert f.events > 0 and f.events < 40_000, inspect(f)
      assert [note] = store.source.notes
      assert note =~ "cut short"
      # What loaded is the first events, complete and in order.
      {:ok, evs} = DataAccess.query_by_time_range(store, 0, 1 <<< 40, limit: 100_000)
      assert Enum.map(evs, & &1.id) == Enum.to_list(1..f.events)
      assert Enum.all?(evs, &(byte_size(&1.data) == 2048))
      assert {:error, {:incomplete, _}} = TraceFile.load(file, strict: true)
    end
  end

  describe "bad files" do
    # Block layout: (offset, length, tag) of each block.
    defp blocks(bin), do: blocks(bin, 16, [])

    defp blocks(bin, at, acc) when at + 40 <= byte_size(bin) do
      <<_::binary-size(at), tag, _codec, 0::16, stored::32-little, _::binary>> = bin
      blocks(bin, at + 40 + stored, [{at, 40 + stored, tag} | acc])
    end

    defp blocks(_bin, _at, acc), do: Enum.reverse(acc)

    defp flip(bin, at, x) do
      <<a::binary-size(at), b, c::binary>> = bin
      <<a::binary, Bitwise.bxor(b, x), c::binary>>
    end

    # Recomputes a block's payload and header checksums after an edit.
    defp reseal(bin, at) do
      <<pre::binary-size(at), h::binary-size(32), _pcrc::32, _hcrc::32, rest::binary>> = bin
      <<_::binary-size(4), stored::32-little, _::binary>> = h
      payload = binary_part(rest, 0, min(stored, byte_size(rest)))
      h36 = h <> <<:erlang.crc32(payload)::32-little>>
      pre <> h36 <> <<:erlang.crc32(h36)::32-little>> <> rest
    end

    defp sealed_block(tag, raw, count, a \\ 0, b \\ 0) do
      h36 =
        <<tag, 0, 0::16, byte_size(raw)::32-little, byte_size(raw)::32-little, count::32-little,
          a::64-little, b::64-little, :erlang.crc32(raw)::32-little>>

      h36 <> <<:erlang.crc32(h36)::32-little>> <> raw
    end

    # Loads `bin`; every answer must be {:ok, store} or {:error, {reason,
    # %{offset: _}}}; a loaded store must answer every query.
    defp load_case(bin, dir, opts \\ []) do
      path = Path.join(dir, "case.estrace")
      File.write!(path, bin)

      assert match?({:ok, %{version: 1}}, TraceFile.info(path, opts)) or
               match?({:error, {r, %{offset: _}}} when is_atom(r), TraceFile.info(path, opts))

      case TraceFile.load(path, opts) do
        {:ok, store} ->
          _ = Analysis.select(store: store)
          _ = Analysis.messages(store: store)
          _ = Analysis.call_stat(store: store, by: :process)
          _ = Analysis.top_call_trees(store: store)
          {:ok, _} = DataAccess.query_by_time_range(store, -(1 <<< 62), 1 <<< 62)
          :ok = DataAccess.destroy(store)
          {:ok, store.source}

        {:error, {reason, %{offset: o, path: ^path}}} = e when is_atom(reason) ->
          assert o <= byte_size(bin)
          e
      end
    end

    setup %{dir: dir} do
      for m <- [TraceFile, Analysis, Analysis.Entry, DataAccess], do: Code.ensure_loaded!(m)
      {store, _} = demo_trace()
      zstd = Path.join(dir, "z.estrace")
      none = Path.join(dir, "n.estrace")
      {:ok, _} = TraceFile.save(store, zstd, block_events: 40)
      {:ok, _} = TraceFile.save(store, none, block_events: 40, compression: :none)
      {:ok, zstd: File.read!(zstd), none: File.read!(none)}
    end

    test "cuts at every block boundary and inside every block", %{zstd: bin, dir: dir} do
      bl = blocks(bin)
      [{_, hlen, ?H} | _] = bl

      inside =
        for {at, len, _} <- bl, d <- [1, 17, 39, 40, div(len, 2), len - 1], d < len, do: at + d

      cuts = Enum.uniq(Enum.map(bl, &elem(&1, 0)) ++ inside ++ [byte_size(bin)])

      for cut <- cuts do
        expected =
          for {at, len, ?E} <- bl, at + len <= cut, reduce: 0 do
            n -> n + (binary_part(bin, at + 12, 4) |> :binary.decode_unsigned(:little))
          end

        case load_case(binary_part(bin, 0, cut), dir) do
          {:ok, %{files: [f], events: n}} ->
            assert n == expected, "cut at #{cut}"
            assert f.complete == (cut == byte_size(bin))
            unless f.complete, do: assert(f.truncated_at + f.lost_bytes == cut)

          {:error, {reason, _}} ->
            assert cut < 16 + hlen, "cut at #{cut} refused: #{reason}"
            assert reason in [:truncated, :not_a_trace_file]
        end
      end
    end

    test "3,000 seeded byte flips: caught by the checksums", %{zstd: zstd, none: none, dir: dir} do
      :rand.seed(:exsss, {1, 2, 3})

      counts =
        for bin <- [zstd, none], _ <- 1..1500, reduce: %{} do
          acc ->
            at = :rand.uniform(byte_size(bin)) - 1
            case_bin = flip(bin, at, :rand.uniform(255))

            key =
              case load_case(case_bin, dir) do
                {:ok, %{files: [%{complete: true}]}} ->
                  assert at in 10..11, "a flip at #{at} went unnoticed"
                  :ok

                {:error, {reason, _}} ->
                  reason
              end

            Map.update(acc, key, 1, &(&1 + 1))
        end

      assert counts[:checksum_mismatch] > 1000
      refute Map.has_key?(counts, :ok) and counts[:ok] > 20
    end

    test "flips behind valid checksums: caught by the structural checks; atoms bounded", %{
      none: bin,
      dir: dir
    } do
      :rand.seed(:exsss, {4, 5, 6})
      bl = for {_, len, _} = b <- blocks(bin), len > 40, do: b
      # Warm up: the code an accepted load and its queries run is loaded
      # (loading modules creates atoms too).
      {:ok, _} = load_case(bin, dir)
      {created0, bound} = TraceFile.atom_budget()
      atoms0 = :erlang.system_info(:atom_count)
      n = 1500

      results =
        for _ <- 1..n do
          {at, len, _} = Enum.random(bl)

          edited =
            Enum.reduce(1..:rand.uniform(3), bin, fn _, b ->
              flip(b, at + 40 + :rand.uniform(len - 40) - 1, :rand.uniform(255))
            end)

          case load_case(reseal(edited, at), dir, max_new_atoms: 2) do
            {:ok, _} -> :ok
            {:error, {reason, %{offset: ^at}}} -> reason
          end
        end

      freq = Enum.frequencies(results)
      assert freq[:ok] > 0 and map_size(freq) > 3
      {created1, ^bound} = TraceFile.atom_budget()
      # Every atom the loads created is counted, each load made at most 2.
      assert :erlang.system_info(:atom_count) - atoms0 == created1 - created0
      assert created1 - created0 <= 2 * n
      assert created1 <= bound
    end

    test "hostile lengths, nesting and atoms", %{none: bin, dir: dir} do
      [{_, _, ?H} = h | _] = blocks(bin)
      header = binary_part(bin, 0, 16 + elem(h, 1))

      gigabytes = fn stored, raw, count ->
        h36 =
          <<?E, 2, 0::16, stored::32-little, raw::32-little, count::32-little, 0::64, 0::64,
            0::32>>

        header <> h36 <> <<:erlang.crc32(h36)::32-little>> <> :binary.copy(<<0>>, 64)
      end

      for {stored, raw, count} <- [
            {0xFFFFFFF0, 64, 0},
            {64, 0x80000000, 0},
            {64, 64 * 65, 0},
            {64, 64, 1 <<< 24}
          ] do
        assert {:error, {:bad_block, %{block: 1, detail: d}}} =
                 load_case(gigabytes.(stored, raw, count), dir)

        assert is_binary(d)
      end

      # A tuple nested 10,000 deep; a list claiming 2^40 elements.
      deep = :binary.copy(<<2, 1>>, 10_000) <> <<11>>
      huge = <<3, 0x80, 0x80, 0x80, 0x80, 0x80, 0x20>>

      for payload <- [deep, huge] do
        cols = [
          <<2>>,
          <<0>>,
          <<16 ||| 128>>,
          <<2>>,
          <<2>>,
          <<0>>,
          <<>>,
          <<0>>,
          <<>>,
          <<>>,
          <<>>,
          <<>>,
          <<>>,
          <<byte_size(payload)>> |> varint_fix(payload),
          payload
        ]

        raw = Enum.map_join(cols, fn c -> varint(byte_size(c)) <> c end)
        case_bin = header <> sealed_block(?E, raw, 1, 1, 1)
        assert {:error, {:bad_term, %{block: 1}}} = load_case(case_bin, dir)
      end

      # 50 atoms this VM never saw: created up to the budget, then refused.
      fresh = for i <- 1..50, do: "tf_hostile_#{System.unique_integer([:positive])}_#{i}"
      syms = Enum.map_join(fresh, fn a -> <<1>> <> varint(byte_size(a)) <> a end)
      case_bin = header <> sealed_block(?S, syms, 50)
      before = :erlang.system_info(:atom_count)

      assert {:error, {:too_many_atoms, %{detail: d}}} =
               load_case(case_bin, dir, max_new_atoms: 5)

      assert d =~ "no more than 5"
      assert :erlang.system_info(:atom_count) - before == 5
      assert {:error, {:too_many_atoms, _}} = load_case(case_bin, dir, max_new_atoms: 0)
      assert :erlang.system_info(:atom_count) - before == 5
    end

    test "wrong version, foreign bytes, empty and directory", %{zstd: bin, dir: dir} do
      assert {:error, {:unsupported_version, %{offset: 8}}} = load_case(flip(bin, 8, 3), dir)

      assert {:error, {:not_a_trace_file, _}} = load_case("PK\x03\x04 a zip file", dir)
      assert {:error, {:not_a_trace_file, _}} = load_case("", dir)
      assert {:error, {:truncated, _}} = load_case(binary_part(bin, 0, 30), dir)
      assert {:error, {:unsupported_version, _}} = TraceFile.info(write!(dir, flip(bin, 9, 1)))
    end
  end

  defp write!(dir, bin) do
    path = Path.join(dir, "w#{System.unique_integer([:positive])}.estrace")
    File.write!(path, bin)
    path
  end

  defp varint(n) when n < 128, do: <<n>>
  defp varint(n), do: <<Bitwise.band(n, 127) ||| 128>> <> varint(n >>> 7)

  # The payload-length column of one record holding `payload`.
  defp varint_fix(_one_byte, payload), do: varint(byte_size(payload))

  describe "bad input" do
    setup %{dir: dir} do
      {:ok, store} = DataAccess.new(max_events: 100)
      :ok = DataAccess.store_event(store, %{id: 1, timestamp: 1, pid: self()})
      {:ok, store: store, path: Path.join(dir, "x.estrace")}
    end

    test "a path in a missing directory, a directory, a file as directory", %{
      store: store,
      dir: dir
    } do
      assert {:error, {:enoent, %{path: _}}} = TraceFile.save(store, Path.join(dir, "no/x"))
      assert {:error, {:eisdir, _}} = TraceFile.save(store, dir)
      File.write!(Path.join(dir, "file"), "x")
      assert {:error, {:enotdir, _}} = TraceFile.save(store, Path.join(dir, "file/x"))
      assert {:error, {:eisdir, _}} = TraceFile.load(dir)
      assert {:error, {:enoent, _}} = TraceFile.load(Path.join(dir, "missing"))
      assert {:error, {:enoent, _}} = TraceFile.info(Path.join(dir, "missing"))
      assert Path.wildcard(Path.join(dir, "*partial*")) == []
    end

    @tag :tmpfs
    test "an unwritable place and a full disk (tiny tmpfs mounts)", %{store: store, dir: dir} do
      case tiny_tmpfs_pair(dir) do
        {:ok, ro, full} ->
          assert {:error, {:erofs, _}} = TraceFile.save(store, Path.join(ro, "x.estrace"))

          # 64 KiB cannot hold a trace of incompressible payloads.
          {:ok, big} = DataAccess.new(max_events: 100)

          for i <- 1..40,
              do:
                :ok = DataAccess.store_event(big, %{id: i, data: :crypto.strong_rand_bytes(4096)})

          target = Path.join(full, "x.estrace")
          assert {:error, {:enospc, _}} = TraceFile.save(big, target)
          # Nothing is left behind: neither the target nor a partial file.
          assert File.ls!(full) == []
          # And the small store still fits.
          assert {:ok, _} = TraceFile.save(store, target)

        {:skip, why} ->
          IO.puts("skipped: #{why}")
      end
    end

    test "unknown compression, bad options and sources raise or answer", %{
      store: store,
      path: path
    } do
      assert_raise ArgumentError, ~r/compression/, fn ->
        TraceFile.save(store, path, compression: :gzip)
      end

      assert_raise ArgumentError, ~r/unknown/, fn -> TraceFile.save(store, path, bogus: 1) end
      assert_raise ArgumentError, ~r/level/, fn -> TraceFile.save(store, path, level: 99) end
      assert_raise ArgumentError, ~r/path/, fn -> TraceFile.save(store, "") end
      assert_raise ArgumentError, ~r/source/, fn -> TraceFile.save("store", path) end
      assert TraceFile.save(:no_such_pipeline, path) == {:error, :no_pipeline}
      assert TraceFile.save(self(), path) == {:error, :no_pipeline}

      assert_raise ArgumentError, ~r/max_new_atoms/, fn ->
        TraceFile.load(path, max_new_atoms: -1)
      end

      assert_raise ArgumentError, ~r/at least one/, fn -> TraceFile.load([]) end
      :ok = DataAccess.destroy(store)
      assert_raise ArgumentError, fn -> TraceFile.save(store, path) end
    end
  end

  # The creation field of a pid's external form (NEW_PID_EXT).
  defp creation(pid) do
    bin = :erlang.term_to_binary(pid)
    <<_::binary-size(byte_size(bin) - 4), c::32>> = bin
    c
  end

  defp child_args(code) do
    ebin = :code.lib_dir(:elixir_scope, :ebin) |> to_string()
    ["-pa", ebin, "-e", code]
  end

  defp child_vm(code) do
    {out, 0} =
      System.cmd(System.find_executable("elixir"), child_args(code), stderr_to_stdout: true)

    out
  end

  defp child_vm_port(code, file_limit_kib: kib) do
    Port.open({:spawn_executable, System.find_executable("sh")}, [
      :binary,
      :exit_status,
      :stderr_to_stdout,
      args:
        ["-c", "ulimit -f #{kib} && exec \"$0\" \"$@\"", System.find_executable("elixir")] ++
          child_args(code)
    ])
  end
end

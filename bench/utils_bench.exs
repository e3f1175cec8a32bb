# ElixirScope.Utils clocks and ids beside the VM's clock calls and the
# original implementation's id scheme, measured in the same run.
#
#   mix run bench/utils_bench.exs             # BENCH_N=1000000 BENCH_SAMPLES=15
#
# Every job calls the function n times in a loop of remote calls; the
# "loop floor" job calls a remote function returning a constant, so the
# other figures can be read with and without the loop's own cost. Targets
# are checked on the raw medians (loop included).
Code.require_file("support/harness.exs", __DIR__)

defmodule ElixirScope.Bench.Utils do
  import Bitwise

  alias ElixirScope.Bench.Harness
  alias ElixirScope.Events
  alias ElixirScope.Utils

  # The original ElixirScope's id: the low 48 bits of the monotonic time in
  # ns, then 8 bits of a node hash and 8 random bits (ids of two processes
  # in the same nanosecond collide one time in 256).
  def original_id do
    t = System.monotonic_time(:nanosecond)
    node_bits = :erlang.phash2(node(), 256)
    (t &&& 0xFFFF_FFFF_FFFF) <<< 16 ||| node_bits <<< 8 ||| :rand.uniform(256) - 1
  end

  def constant, do: 0

  for {name, call} <- [
        floor: quote(do: __MODULE__.constant()),
        mono: quote(do: Utils.monotonic_timestamp()),
        sys_mono: quote(do: System.monotonic_time()),
        sys_mono_ns: quote(do: System.monotonic_time(:nanosecond)),
        wall: quote(do: Utils.wall_timestamp()),
        sys_wall_ns: quote(do: System.system_time(:nanosecond)),
        id: quote(do: Utils.generate_id()),
        original_id: quote(do: __MODULE__.original_id()),
        event_id: quote(do: Events.generate_id()),
        unique_integer: quote(do: System.unique_integer([:positive, :monotonic]))
      ] do
    def unquote(:"loop_#{name}")(0), do: :ok

    def unquote(:"loop_#{name}")(k) do
      _ = unquote(call)
      unquote(:"loop_#{name}")(k - 1)
    end
  end

  # Ids from `procs` processes at once: are they unique?
  def collisions(fun, procs, per) do
    ids =
      1..procs
      |> Enum.map(fn _ -> Task.async(fn -> for _ <- 1..per, do: fun.() end) end)
      |> Enum.flat_map(&Task.await(&1, :infinity))

    length(ids) - (ids |> Enum.uniq() |> length())
  end

  def run do
    n = Harness.env_int("BENCH_N", 1_000_000)
    IO.puts("# Utils bench — #{Harness.machine()}")
    IO.puts("n = #{n} calls per sample; ns per call; load before: #{loadavg()}")

    jobs = [
      {"loop floor (remote call returning a constant)", &loop_floor/1},
      {"Utils.monotonic_timestamp/0", &loop_mono/1},
      {"baseline System.monotonic_time/0", &loop_sys_mono/1},
      {"baseline System.monotonic_time(:nanosecond)", &loop_sys_mono_ns/1},
      {"Utils.wall_timestamp/0", &loop_wall/1},
      {"baseline System.system_time(:nanosecond)", &loop_sys_wall_ns/1},
      {"Utils.generate_id/0", &loop_id/1},
      {"baseline original id scheme", &loop_original_id/1},
      {"Events.generate_id/0 (event-id counter)", &loop_event_id/1},
      {"baseline System.unique_integer([:positive, :monotonic])", &loop_unique_integer/1}
    ]

    jobs = for {name, f} <- jobs, do: %{name: name, n: n, run: fn _ -> f.(n) end}
    results = Harness.run(jobs)
    floor = results["loop floor (remote call returning a constant)"].median

    extra = fn name ->
      m = results[name].median
      "#{Harness.fmt(m - floor)} above the floor"
    end

    Harness.print_table("Utils (ns per call)", results, Enum.map(jobs, & &1.name), extra)

    mono = results["Utils.monotonic_timestamp/0"].median
    sys = results["baseline System.monotonic_time/0"].median
    id = results["Utils.generate_id/0"].median
    orig = results["baseline original id scheme"].median

    IO.puts(
      "\nRatios (medians): monotonic_timestamp / System.monotonic_time/0 = #{ratio(mono, sys)}"
    )

    IO.puts("                  generate_id / original id scheme = #{ratio(id, orig)}")

    per = div(n, 10)
    ours = collisions(&Utils.generate_id/0, 4, per)
    theirs = collisions(&original_id/0, 4, per)

    IO.puts(
      "\nDuplicates among 4 × #{per} ids made at once: ours #{ours}, original scheme #{theirs}"
    )

    check = fn label, ok? -> IO.puts("  #{if ok?, do: "MET ", else: "MISS"} #{label}") end
    IO.puts("\nTargets (raw medians, loop included):")
    check.("monotonic_timestamp/0 ≤ 40 ns (#{Harness.fmt(mono)})", mono <= 40)
    check.("generate_id/0 ≤ 60 ns (#{Harness.fmt(id)})", id <= 60)
    check.("generate_id/0 unique under concurrency (#{ours} duplicates)", ours == 0)
    IO.puts("load after: #{loadavg()}")
  end

  defp ratio(a, b), do: "#{Harness.fmt(a / b)}×"

  defp loadavg do
    case File.read("/proc/loadavg") do
      {:ok, s} -> String.trim(s)
      _ -> "n/a"
    end
  end
end

ElixirScope.Bench.Utils.run()

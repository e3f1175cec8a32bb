defmodule ElixirScope.UtilsTest do
  use ExUnit.Case, async: true

  import Bitwise

  alias ElixirScope.Utils

  doctest ElixirScope.Utils

  describe "timestamps" do
    test "monotonic_timestamp/0 is the VM's monotonic clock in ns and never goes back" do
      # The documented bound: behind the VM's clock by at most the
      # narrowest bracket of VM readings seen (allowed 1 ms here, for a
      # loaded machine), ahead of it only by the VM's time correction since
      # the last re-estimate (at most 10 µs per ms; allowed 50 µs). Over
      # many re-estimates (one per ms at most): a re-estimate preempted
      # under load must not push the clock ahead.
      for _ <- 1..100 do
        before = System.monotonic_time(:nanosecond)
        ours = Utils.monotonic_timestamp()
        later = System.monotonic_time(:nanosecond)
        assert ours >= before - 1_000_000, "behind by #{before - ours} ns"
        assert ours <= later + 50_000, "ahead by #{ours - later} ns"
        Process.sleep(1)
      end

      readings = for _ <- 1..10_000, do: Utils.monotonic_timestamp()
      assert readings == Enum.sort(readings)
    end

    test "monotonic timestamps do not go back across processes" do
      parent = self()

      for _ <- 1..4 do
        spawn_link(fn ->
          send(parent, {:ts, for(_ <- 1..2_000, do: Utils.monotonic_timestamp())})
        end)
      end

      for _ <- 1..4 do
        assert_receive {:ts, ts}
        assert ts == Enum.sort(ts)
      end

      # A timestamp taken after a message was received is not earlier than
      # the sender's last one before sending.
      pid =
        spawn_link(fn ->
          receive do
            {:go, t, from} -> send(from, {:after, t, Utils.monotonic_timestamp()})
          end
        end)

      send(pid, {:go, Utils.monotonic_timestamp(), self()})
      assert_receive {:after, t0, t1}
      assert t1 >= t0
    end

    test "time passes in nanoseconds" do
      t0 = Utils.monotonic_timestamp()
      Process.sleep(2)
      assert Utils.monotonic_timestamp() - t0 >= 2_000_000
    end

    test "wall_timestamp/0 is the system time in ns" do
      before = System.system_time(:nanosecond)
      ours = Utils.wall_timestamp()
      later = System.system_time(:nanosecond)
      assert ours >= before - 1_000_000 and ours <= later + 1_000_000
      # after 2020-01-01
      assert ours > 1_577_836_800_000_000_000
    end

    test "format_timestamp/1 prints UTC with all nine digits of the nanoseconds" do
      assert Utils.format_timestamp(1_609_459_200_000_000_000) ==
               "2021-01-01 00:00:00.000000000Z"

      assert Utils.format_timestamp(1_609_459_200_123_456_789) ==
               "2021-01-01 00:00:00.123456789Z"

      # before the epoch (a monotonic timestamp is usually negative)
      assert Utils.format_timestamp(-1) == "1969-12-31 23:59:59.999999999Z"
      formatted = Utils.format_timestamp(Utils.wall_timestamp())
      assert formatted =~ ~r/^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{9}Z$/
    end

    test "format_timestamp/1 refuses what is not a date" do
      assert_raise ArgumentError, ~r/timestamp_ns/, fn -> Utils.format_timestamp(1 <<< 90) end
      assert_raise ArgumentError, ~r/timestamp_ns/, fn -> Utils.format_timestamp("now") end
    end
  end

  describe "measure/1" do
    test "returns the result and the duration in ns" do
      {result, duration} = Utils.measure(fn -> Process.sleep(10) && :done end)
      assert result == :done
      assert duration >= 10_000_000
      assert duration < 1_000_000_000

      {2, fast} = Utils.measure(fn -> 1 + 1 end)
      assert is_integer(fast) and fast >= 0 and fast < 1_000_000
    end

    test "exceptions propagate" do
      assert_raise RuntimeError, "boom", fn -> Utils.measure(fn -> raise "boom" end) end
      assert_raise ArgumentError, ~r/fun/, fn -> Utils.measure(fn _ -> :ok end) end
    end
  end

  describe "ids" do
    test "generate_id/0: unique increasing integers" do
      ids = for _ <- 1..10_000, do: Utils.generate_id()
      assert Enum.all?(ids, &(is_integer(&1) and &1 > 0))
      assert ids == Enum.sort(ids)
      assert length(Enum.uniq(ids)) == 10_000
    end

    test "ids are unique across processes making them at the same time" do
      ids =
        1..8
        |> Enum.map(fn _ -> Task.async(fn -> for _ <- 1..20_000, do: Utils.generate_id() end) end)
        |> Enum.flat_map(&Task.await(&1, 30_000))

      assert length(ids) == 160_000
      assert length(Enum.uniq(ids)) == 160_000
    end

    test "ids are small integers, apart from event ids" do
      id = Utils.generate_id()
      # below 2^59: an immediate on the BEAM (no heap allocation)
      assert id < 1 <<< 59
      assert id >= 1 <<< 58
      assert id > ElixirScope.Events.generate_id()
    end

    test "id_to_timestamp/1 gives back the monotonic time the id was made at" do
      for _ <- 1..100 do
        t0 = Utils.monotonic_timestamp()
        id = Utils.generate_id()
        t1 = Utils.monotonic_timestamp()
        ts = Utils.id_to_timestamp(id)
        # An id is ahead of its clock reading by at most the ids made in
        # the same nanoseconds (none here but ours and the other tests').
        assert ts >= t0 and ts <= t1 + 1_000_000
      end

      id1 = Utils.generate_id()
      Process.sleep(2)
      id2 = Utils.generate_id()
      assert id2 > id1
      assert Utils.id_to_timestamp(id2) - Utils.id_to_timestamp(id1) >= 2_000_000
    end

    test "id_to_timestamp/1 decodes other integers as the original's ids" do
      assert Utils.id_to_timestamp(5 <<< 16 ||| 0xAB) == 5
      assert Utils.id_to_timestamp(0) == 0
      assert_raise ArgumentError, ~r/id/, fn -> Utils.id_to_timestamp(-1) end
      assert_raise ArgumentError, ~r/id/, fn -> Utils.id_to_timestamp("abc") end
    end

    test "generate_correlation_id/0: version 4 UUID strings" do
      ids = for _ <- 1..1000, do: Utils.generate_correlation_id()
      assert length(Enum.uniq(ids)) == 1000

      for id <- ids do
        assert id =~ ~r/^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/
      end
    end
  end

  describe "safe_inspect/2" do
    test "inspects small terms whole, structs as maps" do
      assert Utils.safe_inspect(%{key: "value"}) == ~s(%{key: "value"})
      assert Utils.safe_inspect([]) == "[]"
      assert Utils.safe_inspect(nil) == "nil"
      assert Utils.safe_inspect(:atom) == ":atom"
      assert Utils.safe_inspect("") == ~s("")
      assert Utils.safe_inspect(%URI{host: "h"}) =~ "__struct__: URI"
    end

    test "bounds large terms" do
      big = for i <- 1..1000, into: %{}, do: {i, i}
      assert Utils.safe_inspect(big) =~ "..."
      assert String.length(Utils.safe_inspect(big, limit: 5)) < 100
      long = String.duplicate("x", 10_000)
      assert String.length(Utils.safe_inspect(long, printable_limit: 20)) < 40
      assert Utils.safe_inspect(big, limit: :infinity) =~ "1000 => 1000"
    end

    test "bad options raise" do
      assert_raise ArgumentError, ~r/opts/, fn -> Utils.safe_inspect(1, :bad) end
      assert_raise ArgumentError, ~r/:limit/, fn -> Utils.safe_inspect(1, limit: -1) end
    end
  end

  describe "truncation" do
    test "truncate_if_large/2 keeps small terms and marks large ones" do
      assert Utils.truncate_if_large("small") == "small"
      assert Utils.truncate_if_large(nil) == nil
      assert Utils.truncate_if_large(:atom) == :atom

      large = String.duplicate("x", 10_000)
      assert {:truncated, size, "binary data"} = Utils.truncate_if_large(large, 1000)
      assert size == byte_size(:erlang.term_to_binary(large))
      # The default bound is 5,000 bytes.
      assert Utils.truncate_if_large(String.duplicate("x", 4_000)) == String.duplicate("x", 4_000)
      assert {:truncated, _, _} = Utils.truncate_if_large(String.duplicate("x", 6_000))
    end

    test "type hints say what was cut" do
      assert {:truncated, _, "list with 1000 elements"} =
               Utils.truncate_if_large(Enum.to_list(1..1000), 100)

      assert {:truncated, _, "map with 1000 entries"} =
               Utils.truncate_if_large(Map.new(1..1000, &{&1, &1}), 100)

      assert {:truncated, _, "tuple with 1000 elements"} =
               Utils.truncate_if_large(List.to_tuple(Enum.to_list(1..1000)), 100)

      assert {:truncated, _, "improper list with 2 elements"} =
               Utils.truncate_if_large([1, 2 | String.duplicate("y", 500)], 100)

      assert {:truncated, _, "data"} = Utils.truncate_if_large(1 <<< 10_000, 100)
    end

    test "truncate_data/2 defaults to 1,000 bytes" do
      assert {:truncated, 2006, "binary data"} = Utils.truncate_data(String.duplicate("x", 2000))
      assert Utils.truncate_data("small") == "small"
      assert Utils.truncate_data(String.duplicate("x", 2000), 5000) == String.duplicate("x", 2000)
    end

    test "a huge term is measured without being encoded" do
      huge = :binary.copy("z", 50_000_000)
      {result, ns} = Utils.measure(fn -> Utils.truncate_if_large([huge, huge]) end)
      assert {:truncated, size, "list with 2 elements"} = result
      assert size > 100_000_000
      # external_size/1 does not copy the 100 MB (encoding it takes far longer)
      assert ns < 50_000_000
    end

    test "term_size/1 is the heap size in bytes" do
      assert Utils.term_size(:atom) == 0
      assert Utils.term_size({1, 2}) == 3 * :erlang.system_info(:wordsize)
      assert Utils.term_size(String.duplicate("x", 1000)) > Utils.term_size("x")
      assert Utils.term_size(%{a: [1, 2, 3]}) > 0
    end

    test "bad bounds raise" do
      assert_raise ArgumentError, ~r/max_size/, fn -> Utils.truncate_if_large(1, -1) end
      assert_raise ArgumentError, ~r/max_size/, fn -> Utils.truncate_data(1, :big) end
    end
  end

  describe "measurement helpers" do
    test "measure_memory/1 returns the result and the VM's memory around it" do
      {list, {before, after_, diff}} = Utils.measure_memory(fn -> Enum.to_list(1..1000) end)
      assert length(list) == 1000
      assert is_integer(before) and before > 0 and is_integer(after_)
      assert diff == after_ - before
    end

    test "process_stats/1 of the caller, another process, a dead one" do
      stats = Utils.process_stats()

      for k <- [
            :memory,
            :reductions,
            :message_queue_len,
            :heap_size,
            :stack_size,
            :total_heap_size,
            :timestamp
          ] do
        assert is_integer(Map.fetch!(stats, k))
      end

      assert stats.memory > 0 and stats.reductions > 0

      other = spawn_link(fn -> Process.sleep(:infinity) end)
      assert %{memory: m} = Utils.process_stats(other)
      assert m > 0

      dead = spawn(fn -> :ok end)
      ref = Process.monitor(dead)
      assert_receive {:DOWN, ^ref, _, _, _}
      assert Utils.process_stats(dead) == %{error: :process_not_found}
      assert_raise ArgumentError, ~r/pid/, fn -> Utils.process_stats(:me) end
    end

    test "system_stats/0" do
      stats = Utils.system_stats()
      assert stats.process_count > 0 and stats.process_count <= stats.process_limit
      assert stats.total_memory > stats.processes_memory
      assert stats.scheduler_count > 0 and stats.scheduler_count_online > 0
      assert is_integer(stats.timestamp)

      for k <- [:system_memory, :ets_memory, :atom_memory],
          do: assert(is_integer(Map.fetch!(stats, k)))
    end
  end

  describe "formatting" do
    test "format_bytes/1" do
      assert Utils.format_bytes(0) == "0 B"
      assert Utils.format_bytes(512) == "512 B"
      assert Utils.format_bytes(1024) == "1.0 KB"
      assert Utils.format_bytes(1536) == "1.5 KB"
      assert Utils.format_bytes(1_048_576) == "1.0 MB"
      assert Utils.format_bytes(1_500_000) == "1.4 MB"
      assert Utils.format_bytes(1_073_741_824) == "1.0 GB"
      assert Utils.format_bytes(2_000_000_000) == "1.9 GB"
      assert Utils.format_bytes(999_999_999_999) =~ "GB"
      assert_raise ArgumentError, ~r/bytes/, fn -> Utils.format_bytes(-1) end
      assert_raise ArgumentError, ~r/bytes/, fn -> Utils.format_bytes(1.5) end
    end

    test "format_duration/1" do
      assert Utils.format_duration(0) == "0 ns"
      assert Utils.format_duration(1) == "1 ns"
      assert Utils.format_duration(500) == "500 ns"
      assert Utils.format_duration(1000) == "1.0 μs"
      assert Utils.format_duration(1_500) == "1.5 μs"
      assert Utils.format_duration(1_000_000) == "1.0 ms"
      assert Utils.format_duration(1_500_000) == "1.5 ms"
      assert Utils.format_duration(1_000_000_000) == "1.0 s"
      assert Utils.format_duration(1_500_000_000) == "1.5 s"
      assert_raise ArgumentError, ~r/nanoseconds/, fn -> Utils.format_duration(-5) end
    end
  end

  describe "validation" do
    test "valid_positive_integer?/1" do
      assert Utils.valid_positive_integer?(1)
      assert Utils.valid_positive_integer?(1 <<< 80)
      refute Utils.valid_positive_integer?(0)
      refute Utils.valid_positive_integer?(-1)
      refute Utils.valid_positive_integer?(1.5)
      refute Utils.valid_positive_integer?("1")
    end

    test "valid_percentage?/1" do
      for v <- [0, 0.0, 0.5, 1, 1.0], do: assert(Utils.valid_percentage?(v))
      for v <- [-0.1, 1.1, "0.5", nil], do: refute(Utils.valid_percentage?(v))
    end

    test "valid_pid?/1" do
      assert Utils.valid_pid?(self())
      live = spawn_link(fn -> Process.sleep(:infinity) end)
      assert Utils.valid_pid?(live)
      dead = spawn(fn -> :ok end)
      ref = Process.monitor(dead)
      assert_receive {:DOWN, ^ref, _, _, _}
      refute Utils.valid_pid?(dead)
      refute Utils.valid_pid?("not_a_pid")
      refute Utils.valid_pid?(123)
      # a pid of a node we are not connected to
      name = "elsewhere@nohost"

      remote =
        :erlang.binary_to_term(
          <<131, 88, 119, byte_size(name), name::binary, 1::32, 0::32, 1::32>>
        )

      assert is_pid(remote) and node(remote) != node()
      refute Utils.valid_pid?(remote)
    end
  end
end

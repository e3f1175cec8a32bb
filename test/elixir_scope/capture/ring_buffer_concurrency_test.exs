defmodule ElixirScope.Capture.RingBufferConcurrencyTest do
  # Not async: each scenario saturates the schedulers on its own.
  use ExUnit.Case, async: false

  import Bitwise
  import ElixirScope.RingTestHelpers

  alias ElixirScope.Capture.RingBuffer

  @moduletag timeout: 300_000

  @writers 8
  @per_writer 100_000
  @attempts @writers * @per_writer

  defp assert_reader_clean(reader) do
    assert reader.violations == [],
           "reader saw duplicates / out-of-order / foreign events: " <>
             inspect(Enum.reverse(reader.violations))

    assert reader.next - reader.start == reader.delivered + reader.missed,
           "positions advanced (#{reader.next - reader.start}) != delivered " <>
             "(#{reader.delivered}) + missed (#{reader.missed})"

    assert reader.per_writer |> Map.values() |> Enum.sum() == reader.delivered
    assert Enum.all?(Map.keys(reader.per_writer), &(&1 in 1..@writers))
    assert Enum.all?(reader.last, fn {_w, seq} -> seq in 1..@per_writer end)
  end

  # One consuming reader, no other readers: every accepted event is either
  # read by it, dropped for a counted reason, or still available (0).
  defp assert_single_reader_run(%{rejected: rejected, readers: [reader], stats: stats}) do
    assert_reader_clean(reader)

    assert stats.available_events == 0, "ring not drained: #{inspect(stats)}"
    assert stats.write_position == stats.read_position

    assert @attempts == reader.delivered + stats.dropped_events + stats.available_events,
           "attempts #{@attempts} != read #{reader.delivered} + dropped " <>
             "#{stats.dropped_events} + available #{stats.available_events}: #{inspect(stats)}"

    # The only reader consumed all it got (no event counted both as read and
    # as dropped), and the counters agree with what the writers were told.
    assert reader.delivered == stats.total_reads
    assert rejected == stats.dropped.buffer_full
    assert stats.total_writes + stats.dropped.buffer_full == @attempts
    assert dropped_by_reason(stats) == stats.dropped_events
    assert_accounting(stats, @attempts)
    stats
  end

  describe "8 writers x 100_000 events, one reader draining at the cursor" do
    test ":drop_oldest, size 4096 (drops happen)" do
      buf = new_ring!(size: 4096, overflow_strategy: :drop_oldest)
      run = run_concurrent(buf, writers: @writers, per_writer: @per_writer, readers: 1)
      stats = assert_single_reader_run(run)

      assert run.rejected == 0
      assert stats.dropped.buffer_full == 0
      assert stats.dropped.cleared == 0
      assert stats.dropped.failed == 0
      assert stats.total_writes == @attempts
      # The writers outpace a reader of a 4096-slot ring.
      assert stats.dropped_events > 0
      assert stats.dropped.overflow > 0
      assert hd(run.readers).missed == stats.dropped.overflow
    end

    test ":drop_newest, size 4096" do
      buf = new_ring!(size: 4096, overflow_strategy: :drop_newest)
      run = run_concurrent(buf, writers: @writers, per_writer: @per_writer, readers: 1)
      stats = assert_single_reader_run(run)

      assert stats.dropped.overflow == 0
      assert stats.dropped.cleared == 0
      assert stats.dropped.failed == 0
      assert run.rejected > 0
      assert stats.total_writes < @attempts
      # Every accepted event was delivered.
      assert hd(run.readers).missed == 0
      assert hd(run.readers).delivered == stats.total_writes
    end

    test "big ring (2^20): no drops, every event delivered once, in order" do
      buf = new_ring!(size: 1 <<< 20, overflow_strategy: :drop_oldest)
      run = run_concurrent(buf, writers: @writers, per_writer: @per_writer, readers: 1)
      stats = assert_single_reader_run(run)
      [reader] = run.readers

      assert stats.dropped_events == 0
      assert reader.missed == 0
      assert reader.delivered == @attempts
      assert reader.per_writer == Map.new(1..@writers, &{&1, @per_writer})
      assert reader.last == Map.new(1..@writers, &{&1, @per_writer})
    end

    test ":drop_newest never loses an accepted event" do
      for _ <- 1..10 do
        buf = new_ring!(size: 4096, overflow_strategy: :drop_newest)
        run = run_concurrent(buf, writers: @writers, per_writer: @per_writer, readers: 1)
        stats = assert_single_reader_run(run)
        assert hd(run.readers).delivered == stats.total_writes
      end
    end
  end

  describe "with 2 extra readers owning their own positions" do
    # Every reader starts at 0 and reads with its own position; whichever
    # stands at the cursor consumes, so per-reader deliveries cannot be
    # tied to total_reads. The ring-wide identity still holds.
    for {strategy, size} <- [{:drop_oldest, 4096}, {:drop_newest, 4096}] do
      test "#{strategy}, size #{size}" do
        buf = new_ring!(size: unquote(size), overflow_strategy: unquote(strategy))
        run = run_concurrent(buf, writers: @writers, per_writer: @per_writer, readers: 3)
        stats = run.stats

        Enum.each(run.readers, &assert_reader_clean/1)
        Enum.each(run.readers, &assert(&1.next == stats.write_position))

        assert stats.available_events == 0
        assert run.rejected == stats.dropped.buffer_full
        assert_accounting(stats, @attempts)

        assert @attempts ==
                 stats.total_reads + stats.dropped_events + stats.available_events

        # Readers share the queue: together they received exactly what was
        # consumed, each event once.
        assert Enum.sum(Enum.map(run.readers, & &1.delivered)) == stats.total_reads
      end
    end

    test "big ring (2^20): the readers share every event exactly once, each in order" do
      buf = new_ring!(size: 1 <<< 20, overflow_strategy: :drop_oldest)
      run = run_concurrent(buf, writers: @writers, per_writer: @per_writer, readers: 3)
      stats = run.stats

      assert stats.dropped_events == 0
      assert stats.total_reads == @attempts
      assert_accounting(stats, @attempts)

      for reader <- run.readers do
        assert_reader_clean(reader)
        assert reader.next == @attempts
      end

      assert Enum.sum(Enum.map(run.readers, & &1.delivered)) == @attempts

      per_writer =
        run.readers
        |> Enum.map(& &1.per_writer)
        |> Enum.reduce(%{}, &Map.merge(&1, &2, fn _, a, b -> a + b end))

      assert per_writer == Map.new(1..@writers, &{&1, @per_writer})
    end
  end

  describe "clear/1 and destroy/1 under load" do
    test "clears racing writers and a consuming reader keep the accounting exact" do
      buf = new_ring!(size: 4096, overflow_strategy: :drop_oldest)
      parent = self()

      clearer =
        spawn_link(fn ->
          n =
            Stream.repeatedly(fn ->
              :ok = RingBuffer.clear(buf)
              Process.sleep(1)
            end)
            |> Enum.reduce_while(0, fn _, n ->
              receive do
                :stop -> {:halt, n + 1}
              after
                0 -> {:cont, n + 1}
              end
            end)

          send(parent, {:clears, n})
        end)

      run = run_concurrent(buf, writers: 4, per_writer: 50_000, readers: 1)
      send(clearer, :stop)
      assert_receive {:clears, clears}, 10_000
      assert clears > 0

      [reader] = run.readers
      stats = RingBuffer.stats(buf)
      assert_reader_clean(reader)
      assert stats.available_events == 0
      assert reader.delivered == stats.total_reads
      assert 200_000 == reader.delivered + stats.dropped_events + stats.available_events
      assert reader.missed == stats.dropped_events
      assert_accounting(stats, 200_000)
    end

    test "destroy racing writers and a reader: results switch to :destroyed, nothing crashes" do
      buf = new_ring!(size: 1024, overflow_strategy: :drop_oldest)
      parent = self()

      writers =
        for w <- 1..4 do
          Task.async(fn ->
            send(parent, {:writer_started, w})

            for seq <- 1..200_000 do
              case RingBuffer.write(buf, {w, seq}) do
                :ok -> :ok
                {:error, :destroyed} -> :destroyed
              end
            end
          end)
        end

      reader =
        Task.async(fn ->
          Stream.iterate(0, & &1)
          |> Enum.reduce_while(0, fn _, pos ->
            try do
              {_events, next} = RingBuffer.read_batch(buf, pos, 500)
              {:cont, next}
            rescue
              e in ArgumentError ->
                {:halt, {:raised, e.message}}
            end
          end)
        end)

      for w <- 1..4, do: assert_receive({:writer_started, ^w}, 5_000)
      Process.sleep(5)
      assert RingBuffer.destroy(buf) == :ok

      for results <- Enum.map(writers, &Task.await(&1, 60_000)) do
        # A prefix of accepted writes, then only :destroyed.
        {oks, rest} = Enum.split_while(results, &(&1 == :ok))
        assert Enum.all?(rest, &(&1 == :destroyed))
        assert length(oks) + length(rest) == 200_000
      end

      assert {:raised, msg} = Task.await(reader, 60_000)
      assert msg =~ "destroyed"
      assert RingBuffer.write(buf, :late) == {:error, :destroyed}
      assert_raise ArgumentError, fn -> RingBuffer.stats(buf) end
    end
  end
end

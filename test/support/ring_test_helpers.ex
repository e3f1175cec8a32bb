defmodule ElixirScope.RingTestHelpers do
  @moduledoc false
  # Shared helpers for the RingBuffer / Ingestor tests: accounting checks and
  # a concurrent writers/readers harness. Compiled only in the :test env.

  import ExUnit.Assertions

  alias ElixirScope.Capture.RingBuffer

  @doc "Creates a ring, failing the test if `new/1` does not return `{:ok, _}`."
  def new_ring!(opts \\ []) do
    assert {:ok, %RingBuffer{} = buf} = RingBuffer.new(opts)
    buf
  end

  @doc "Sum of the per-reason drop counters."
  def dropped_by_reason(%{dropped: dropped}), do: dropped |> Map.values() |> Enum.sum()

  @doc """
  Asserts the accounting identities of `stats/1` on a quiescent ring:

      write attempts = total_writes + dropped.buffer_full
                     = total_reads + dropped_events + available_events

  and that the per-reason counters add up to `dropped_events`. With
  `attempts`, also asserts the number of write attempts.
  """
  def assert_accounting(stats, attempts \\ nil) do
    assert dropped_by_reason(stats) == stats.dropped_events,
           "dropped by reason #{inspect(stats.dropped)} != dropped_events #{stats.dropped_events}"

    lhs = stats.total_writes + stats.dropped.buffer_full
    rhs = stats.total_reads + stats.dropped_events + stats.available_events

    assert lhs == rhs,
           "accounting broken: total_writes + buffer_full = #{lhs}, " <>
             "total_reads + dropped_events + available_events = #{rhs}: #{inspect(stats)}"

    assert stats.available_events == stats.write_position - stats.read_position
    assert stats.total_writes == stats.write_position
    assert stats.available_events <= stats.size
    assert stats.utilization == stats.available_events / stats.size

    if attempts, do: assert(lhs == attempts)
    stats
  end

  @doc "Reads everything from `pos` to the end of the ring: `{events, next, missed}`."
  def drain(buf, pos) do
    {events, next, missed} = RingBuffer.read_batch(buf, pos, 1_000_000, with_missed: true)
    {events, next, missed}
  end

  # ---------------------------------------------------------------------------
  # Concurrent harness
  # ---------------------------------------------------------------------------

  @doc """
  Runs `writers` processes writing `{writer_id, seq}` for seq in
  `1..per_writer` concurrently with `readers` reader processes (each with
  its own position, starting at 0, reading `read_batch(buf, pos, batch,
  with_missed: true)` in a loop). Readers stop once every writer is done and
  the ring has nothing more for them.

  Returns `%{rejected: n, readers: [summary], stats: stats}` where each
  reader summary has `:delivered`, `:missed`, `:start`, `:next`, `:calls`,
  `:per_writer` (count of events per writer), `:last` (last seq per writer)
  and `:violations` (first few ordering/duplication/shape problems).
  """
  def run_concurrent(buf, opts) do
    writers = Keyword.fetch!(opts, :writers)
    per_writer = Keyword.fetch!(opts, :per_writer)
    n_readers = Keyword.get(opts, :readers, 1)
    batch = Keyword.get(opts, :batch, 1000)
    parent = self()

    readers =
      for r <- 1..n_readers do
        spawn_link(fn ->
          send(parent, {:reader_done, r, reader_loop(buf, batch, new_summary())})
        end)
      end

    writer_tasks =
      for w <- 1..writers do
        Task.async(fn -> write_seq(buf, w, 1, per_writer, 0) end)
      end

    rejected = writer_tasks |> Enum.map(&Task.await(&1, :infinity)) |> Enum.sum()
    Enum.each(readers, &send(&1, :writers_done))

    summaries =
      for r <- 1..n_readers do
        receive do
          {:reader_done, ^r, summary} -> summary
        after
          120_000 -> flunk("reader #{r} did not finish")
        end
      end

    %{rejected: rejected, readers: summaries, stats: RingBuffer.stats(buf)}
  end

  defp write_seq(_buf, _w, seq, max, rejected) when seq > max, do: rejected

  defp write_seq(buf, w, seq, max, rejected) do
    case RingBuffer.write(buf, {w, seq}) do
      :ok -> write_seq(buf, w, seq + 1, max, rejected)
      {:error, :buffer_full} -> write_seq(buf, w, seq + 1, max, rejected + 1)
    end
  end

  defp new_summary do
    %{
      start: 0,
      next: 0,
      delivered: 0,
      missed: 0,
      calls: 0,
      last: %{},
      per_writer: %{},
      violations: []
    }
  end

  defp reader_loop(buf, batch, s) do
    done? =
      receive do
        :writers_done -> true
      after
        0 -> false
      end

    if done?, do: final_drain(buf, batch, s), else: reader_step(buf, batch, s)
  end

  defp reader_step(buf, batch, s) do
    {events, s} = read_once(buf, batch, s)
    # Nothing yet: let the writers run, but keep polling hard so reads
    # interleave with writes as much as possible.
    if events == [], do: :erlang.yield()
    reader_loop(buf, batch, s)
  end

  # Writers are done: read until a call neither delivers nor skips anything.
  defp final_drain(buf, batch, s) do
    pos = s.next
    {events, s} = read_once(buf, batch, s)
    if events == [] and s.next == pos, do: s, else: final_drain(buf, batch, s)
  end

  defp read_once(buf, batch, s) do
    pos = s.next
    {events, next, missed} = RingBuffer.read_batch(buf, pos, batch, with_missed: true)
    n = length(events)

    s =
      cond do
        next < pos ->
          violation(s, {:position_went_back, pos, next})

        next - pos != n + missed ->
          violation(s, {:positions_not_accounted, pos, next, n, missed})

        true ->
          s
      end

    s = Enum.reduce(events, s, &check_event/2)

    {events,
     %{s | next: next, delivered: s.delivered + n, missed: s.missed + missed, calls: s.calls + 1}}
  end

  defp check_event({w, seq} = ev, s) when is_integer(w) and is_integer(seq) do
    s = %{s | per_writer: Map.update(s.per_writer, w, 1, &(&1 + 1))}

    case Map.fetch(s.last, w) do
      {:ok, last} when seq <= last ->
        violation(
          %{s | last: Map.put(s.last, w, max(last, seq))},
          {:out_of_order_or_dup, ev, last}
        )

      _ ->
        %{s | last: Map.put(s.last, w, seq)}
    end
  end

  defp check_event(other, s), do: violation(s, {:unexpected_event, other})

  defp violation(%{violations: v} = s, what) when length(v) < 20,
    do: %{s | violations: [what | v]}

  defp violation(s, _what), do: s
end

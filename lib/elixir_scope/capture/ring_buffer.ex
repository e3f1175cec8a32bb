defmodule ElixirScope.Capture.RingBuffer do
  @moduledoc """
  A bounded, lock-free, multi-producer event ring held natively (Rust).

  Any number of processes may `write/2` concurrently; a write never blocks
  the caller. When the ring holds `size` unconsumed events the overflow
  strategy decides:

    * `:drop_oldest` (default) — the oldest unconsumed event is overwritten;
    * `:drop_newest` — the new event is rejected with `{:error, :buffer_full}`;
    * `:block` — same as `:drop_newest`: it never blocks a scheduler, it
      returns `{:error, :buffer_full}` and the caller decides.

  Every drop is counted, by reason, in `stats/1`.

  ## Readers and positions

  Positions are monotonically increasing integers. Readers own their
  position: `read/2` and `read_batch/3` take one and return the next. The
  ring also keeps one *consumption
  cursor* (`read_position` in `stats/1`): every event before it has been
  consumed or dropped, for every reader. A read at the cursor consumes what
  it returns (frees the space, counts it in `total_reads`), so several
  readers draining one ring share its events, each processed once. A read
  from behind the cursor skips to it and reports what it missed; a read
  from ahead of it is a non-consuming peek.

  A reader that was lapped (its events were consumed by another reader,
  overwritten, or cleared) is never handed stale or duplicated events: it
  skips to the oldest live event and is told how many it missed: `read/2`
  returns `{:lapped, missed, event, next}`, and for `read_batch/3` the gap
  is `next - start - length(events)` (or ask for it explicitly with
  `read_batch/4` and `with_missed: true`).

  ## Stored form

  Events are copied into native memory as a compact term tape (immediates
  such as atoms, small integers and local pids are stored as raw words, so
  reading them back costs no atom-table lookup; 64-bit integers such as
  nanosecond timestamps take 9 bytes). A field larger than
  `:max_event_bytes` is replaced by `{:truncated, at_least_bytes, kind}`
  (kind is `:binary | :list | :map | :tuple | :term | :depth`) and counted in
  `truncated_events`. Fields of a struct/map (up to 32 keys) are truncated
  one by one, so the rest of the event stays intact.

  ## Accounting

      write_attempts = total_writes + dropped.buffer_full
      total_writes   = total_reads + (dropped_events - dropped.buffer_full) + available_events

  i.e. every event offered is either read, dropped for a counted reason, or
  still available.

  ## Example

      iex> {:ok, buf} = ElixirScope.Capture.RingBuffer.new(size: 8)
      iex> :ok = ElixirScope.Capture.RingBuffer.write(buf, {:hello, 1})
      iex> ElixirScope.Capture.RingBuffer.read(buf, 0)
      {:ok, {:hello, 1}, 1}
      iex> ElixirScope.Capture.RingBuffer.read_batch(buf, 1, 10)
      {[], 1}
  """

  import Bitwise, only: [<<<: 2, &&&: 2]

  alias ElixirScope.Native

  @enforce_keys [:ref, :size, :overflow_strategy]
  defstruct [:ref, :size, :overflow_strategy, :name, :max_event_bytes]

  @typedoc "A ring buffer handle. `ref` is the native resource."
  @type t :: %__MODULE__{
          ref: reference(),
          size: pos_integer(),
          overflow_strategy: overflow_strategy(),
          name: term(),
          max_event_bytes: pos_integer()
        }
  @type overflow_strategy :: :drop_oldest | :drop_newest | :block
  @type position :: non_neg_integer()

  @max_size 1 <<< 24
  @chunk 1000
  @chunk_bytes 4 <<< 20
  @strategies [:drop_oldest, :drop_newest, :block]
  @defaults [size: 1024, overflow_strategy: :drop_oldest, name: nil, max_event_bytes: 8192]

  @doc """
  Creates a ring buffer.

  Options:

  | option | default | meaning |
  |---|---|---|
  | `:size` | `1024` | slots, a power of 2, at most #{@max_size} |
  | `:overflow_strategy` | `:drop_oldest` | `:drop_oldest`, `:drop_newest` or `:block` |
  | `:name` | `nil` | any term, kept in the struct for identification |
  | `:max_event_bytes` | `8192` | stored bytes per event before fields are truncated (64..2^20) |

  Returns `{:error, :invalid_size | :size_must_be_power_of_2 |
  :invalid_overflow_strategy}` for bad values; unknown options raise
  `ArgumentError`.
  """
  @spec new(keyword()) ::
          {:ok, t()}
          | {:error, :invalid_size | :size_must_be_power_of_2 | :invalid_overflow_strategy}
  def new(opts \\ [])

  def new(opts) when is_list(opts) do
    opts = validate!(opts)
    size = opts[:size]
    strategy = opts[:overflow_strategy]
    max_bytes = opts[:max_event_bytes]

    cond do
      not is_integer(size) or size <= 0 or size > @max_size ->
        {:error, :invalid_size}

      (size &&& size - 1) != 0 ->
        {:error, :size_must_be_power_of_2}

      strategy not in @strategies ->
        {:error, :invalid_overflow_strategy}

      not is_integer(max_bytes) or max_bytes < 64 or max_bytes > 1 <<< 20 ->
        raise ArgumentError,
              "ring buffer option :max_event_bytes must be an integer in 64..#{1 <<< 20}, " <>
                "got: #{inspect(max_bytes)}"

      true ->
        case Native.rb_new(size, strategy, max_bytes) do
          {:ok, ref} ->
            {:ok,
             %__MODULE__{
               ref: ref,
               size: size,
               overflow_strategy: strategy,
               name: opts[:name],
               max_event_bytes: max_bytes
             }}

          {:error, _} = error ->
            error
        end
    end
  end

  def new(opts) do
    raise ArgumentError, "ring buffer options must be a keyword list, got: #{inspect(opts)}"
  end

  defp validate!(opts), do: ElixirScope.Args.keyword_opts!(opts, @defaults, "ring buffer")

  @doc """
  Writes one event (any term). Never blocks.

  Returns `:ok`, `{:error, :buffer_full}` (`:drop_newest`/`:block` when full;
  counted as dropped) or `{:error, :destroyed}`.
  """
  @spec write(t(), term()) :: :ok | {:error, :buffer_full | :destroyed}
  def write(%__MODULE__{ref: ref}, event), do: Native.rb_write(ref, event)
  def write(other, _event), do: bad_buffer!(other)

  @doc """
  Writes a list of events with one claim per 1,000 events.

  Returns `{:ok, n}` when all were accepted, or
  `{:error, {:partial_success, accepted, [buffer_full: rejected]}}` when the
  ring filled up (rejections are counted as dropped), or
  `{:error, :destroyed}`.
  """
  @spec write_batch(t(), [term()]) ::
          {:ok, non_neg_integer()}
          | {:error, {:partial_success, non_neg_integer(), [{:buffer_full, pos_integer()}]}}
          | {:error, :destroyed}
  def write_batch(%__MODULE__{ref: ref}, events) when is_list(events) do
    # An improper list must fail before anything is written.
    ElixirScope.Args.proper_list!(events, "events")
    write_chunks(ref, events, 0, 0, true)
  end

  def write_batch(%__MODULE__{}, events),
    do: raise(ArgumentError, "events must be a list, got: #{inspect(events)}")

  def write_batch(other, _events), do: bad_buffer!(other)

  defp write_chunks(_ref, [], accepted, 0, false), do: {:ok, accepted}

  defp write_chunks(_ref, [], accepted, rejected, false),
    do: {:error, {:partial_success, accepted, [buffer_full: rejected]}}

  defp write_chunks(ref, events, accepted, rejected, _first) do
    case Native.rb_write_batch(ref, events) do
      {a, r, rest} -> write_chunks(ref, rest, accepted + a, rejected + r, false)
      {:error, :destroyed} = error -> error
    end
  end

  @doc """
  Reads the event at `position` (or the oldest live one after it).

  Returns `{:ok, event, next_position}`, `:empty` when nothing is available
  at or after `position`, or `{:lapped, missed, event, next_position}` when
  the events from `position` on were overwritten: `event` is the oldest
  live one and `missed` says how many were lost to this reader.
  """
  @spec read(t(), position()) ::
          {:ok, term(), position()} | {:lapped, pos_integer(), term(), position()} | :empty
  def read(buffer, position \\ 0)

  def read(%__MODULE__{ref: ref}, position) when is_integer(position) and position >= 0,
    do: Native.rb_read(ref, position)

  def read(%__MODULE__{}, position), do: bad_position!(position)
  def read(other, _position), do: bad_buffer!(other)

  @doc """
  Reads up to `count` events starting at `start_position`.

  Returns `{events, new_position}`. Events a lapped reader missed are not
  returned: `new_position - start_position - length(events)` of them were
  skipped. With `with_missed: true` returns `{events, new_position, missed}`.
  Large counts are read in chunks of up to #{@chunk} events (fewer when
  `:max_event_bytes` is large: at most #{@chunk_bytes} bytes), so no NIF call holds a
  scheduler for long.
  """
  @spec read_batch(t(), position(), non_neg_integer(), keyword()) ::
          {[term()], position()} | {[term()], position(), non_neg_integer()}
  def read_batch(buffer, start_position, count, opts \\ [])

  def read_batch(%__MODULE__{ref: ref} = buffer, start, count, opts)
      when is_integer(start) and start >= 0 and is_integer(count) and count >= 0 and
             is_list(opts) do
    # Validate before reading: a read at the cursor consumes.
    opts = ElixirScope.Args.keyword_opts!(opts, [with_missed: false], "read_batch")
    with_missed = opts[:with_missed] == true

    {events, next, missed} = read_chunks(ref, chunk_size(buffer), start, count, [], 0)
    if with_missed, do: {events, next, missed}, else: {events, next}
  end

  def read_batch(%__MODULE__{}, start, count, opts) do
    cond do
      not (is_integer(start) and start >= 0) -> bad_position!(start)
      not (is_integer(count) and count >= 0) -> bad_count!(count)
      true -> raise ArgumentError, "read_batch options must be a list, got: #{inspect(opts)}"
    end
  end

  def read_batch(other, _start, _count, _opts), do: bad_buffer!(other)

  defp read_chunks(ref, _chunk, pos, 0, [], 0) do
    # Nothing asked for: still check the handle (a destroyed ring raises).
    Native.rb_read_batch(ref, pos, 0)
  end

  defp read_chunks(_ref, _chunk, pos, 0, acc, missed), do: {join(acc), pos, missed}

  defp read_chunks(ref, chunk, pos, remaining, acc, missed) do
    want = min(remaining, chunk)
    {events, next, m} = Native.rb_read_batch(ref, pos, want)

    case length(events) do
      ^want -> read_chunks(ref, chunk, next, remaining - want, [events | acc], missed + m)
      _ -> {join([events | acc]), next, missed + m}
    end
  end

  # Events per NIF call (the NIF applies the same rule). A hand-built struct
  # gets the default; the NIF then rejects its ref.
  defp chunk_size(%__MODULE__{max_event_bytes: bytes}) when is_integer(bytes) and bytes > 0,
    do: @chunk |> min(div(@chunk_bytes, bytes)) |> max(1)

  defp chunk_size(_), do: @chunk

  defp join([events]), do: events
  defp join(chunks), do: chunks |> Enum.reverse() |> Enum.concat()

  @doc """
  Counters and positions:

  `size`, `write_position`, `read_position` (the consumption cursor),
  `available_events`, `total_writes` (accepted), `total_reads` (consumed),
  `dropped_events` (all reasons), `dropped` (by reason: `:buffer_full`
  rejected writes, `:overflow` overwritten by `:drop_oldest`, `:failed`
  writes that raised, `:cleared`), `utilization` (available / size), `truncated_events`,
  `shed_events` (writes dropped by a pipeline's load shedding before reaching
  the ring; they return `:ok`), `max_event_bytes`, `overflow_strategy`.
  """
  @spec stats(t()) :: map()
  def stats(%__MODULE__{ref: ref}), do: Native.rb_stats(ref)
  def stats(other), do: bad_buffer!(other)

  @doc "Returns the number of slots."
  @spec size(t()) :: pos_integer()
  def size(%__MODULE__{size: size}), do: size
  def size(other), do: bad_buffer!(other)

  @doc """
  Discards every unconsumed event (counted in `dropped.cleared`); the ring
  is empty afterwards (`available_events` 0, `read(buf, 0)` is `:empty`).

  Positions and counters are *not* reset (the original set
  `write_position`, `read_position` and the counters back to 0): positions
  stay monotonic, so a reader still holding a position from before the
  clear (an `AsyncWriter`, a pool worker, any `read_batch/3` loop) reads
  the events written after it exactly once, and is told how many it
  missed. With positions reset, such a reader would wait at its old
  position while new events were written below it and then skip them
  silently, or read events twice. The counters keep the accounting
  (`total_writes = total_reads + dropped + available`) true across clears.
  """
  @spec clear(t()) :: :ok
  def clear(%__MODULE__{ref: ref}), do: Native.rb_clear(ref)
  def clear(other), do: bad_buffer!(other)

  @doc """
  Destroys the buffer: unread events are discarded and payload memory freed
  at once; the handle stops working (writes return `{:error, :destroyed}`,
  other calls raise `ArgumentError`). The rest is freed when the last
  handle is garbage-collected. Idempotent.
  """
  @spec destroy(t()) :: :ok
  def destroy(%__MODULE__{ref: ref}), do: Native.rb_destroy(ref)
  def destroy(other), do: bad_buffer!(other)

  @doc false
  @spec bad_buffer!(term()) :: no_return()
  def bad_buffer!(other) do
    raise ArgumentError,
          "expected an %ElixirScope.Capture.RingBuffer{} (from RingBuffer.new/1), got: " <>
            inspect(other, limit: 5, printable_limit: 40)
  end

  defp bad_position!(p),
    do: raise(ArgumentError, "position must be a non-negative integer, got: #{inspect(p)}")

  defp bad_count!(c),
    do: raise(ArgumentError, "count must be a non-negative integer, got: #{inspect(c)}")

  defimpl Inspect do
    import Inspect.Algebra

    def inspect(%{size: size, overflow_strategy: s, name: name}, opts) do
      fields = [size: size, overflow_strategy: s] ++ if(name, do: [name: name], else: [])
      concat(["#RingBuffer<", to_doc(fields, opts), ">"])
    end
  end
end

defmodule ElixirScope.Utils do
  @moduledoc """
  Timestamps, ids, safe inspection and truncation, measurement helpers,
  formatting and validation: the original ElixirScope's `Utils`, with the
  same names, arities and return shapes.

  ## Clocks

  `monotonic_timestamp/0` and `wall_timestamp/0` read the native clock the
  ring buffer stamps events with: the OS monotonic clock (a vDSO call) plus
  offsets to the VM's monotonic and wall clocks that are refreshed every
  millisecond. They return what `System.monotonic_time(:nanosecond)` and
  `System.system_time(:nanosecond)` return, give or take the VM's time
  correction over one millisecond (normally well under a microsecond), and
  are faster than the VM's own calls (see `bench/utils_bench.exs`).
  Monotonic timestamps never go backwards, across processes.

  ## Ids

  `generate_id/0` returns positive integers that are unique under any
  concurrency (the original's timestamp-plus-8-random-bits ids collided) and
  that are also timestamps: `id_to_timestamp/1` gives back the
  `monotonic_timestamp/0` at which the id was made (an id is a clock reading
  unless another id already took that nanosecond, then it is one more than
  the largest id so far). Ids are at least 2^58, so they never equal an event
  id from `ElixirScope.Events.generate_id/0` (a counter from 1), and they
  stay small integers (below 2^59) for nine years of VM uptime.

  ## Deliberate differences from the original

    * `format_timestamp/1` prints all nine digits of the nanoseconds (the
      original printed the last six in place of the microseconds).
    * `truncate_if_large/2` measures the external term size with
      `:erlang.external_size/1` instead of encoding the term, so a huge
      term is not copied to find out that it is huge.
    * Arguments of the wrong type raise `ArgumentError` naming the argument
      (the original raised `FunctionClauseError` or crashed inside), and
      `valid_pid?/1` answers for remote pids instead of raising.

  ## Examples

      iex> t0 = ElixirScope.Utils.monotonic_timestamp()
      iex> id = ElixirScope.Utils.generate_id()
      iex> ElixirScope.Utils.id_to_timestamp(id) >= t0
      true
      iex> ElixirScope.Utils.truncate_if_large(String.duplicate("x", 10_000), 1000)
      {:truncated, 10006, "binary data"}
      iex> ElixirScope.Utils.format_bytes(1_500_000)
      "1.4 MB"
      iex> ElixirScope.Utils.format_duration(1_500)
      "1.5 μs"
  """

  import Bitwise, only: [>>>: 2, <<<: 2, &&&: 2, |||: 2]

  alias ElixirScope.Native

  # Time ids are TIME_ID_BASE + ns since the NIF's origin (see utils_nif.rs).
  @time_id_base 1 <<< 58
  @time_id_limit 1 <<< 62

  #############################################################################
  # Timestamps
  #############################################################################

  @doc """
  The monotonic time in nanoseconds (`System.monotonic_time(:nanosecond)`'s
  clock), for ordering events and measuring durations. May be negative.

  Read natively: the OS monotonic clock plus an offset to the VM's clock,
  re-estimated at most every millisecond from the narrowest of a few
  bracketed VM readings. It never goes backwards (across processes too),
  is behind the VM's clock by at most the narrowest bracket seen (well
  under a microsecond once one re-estimate ran undisturbed) and ahead of
  it only by the VM's own time correction since the last re-estimate (at
  most 1%: 10 µs per millisecond), which it slews back at up to 1/16 of
  the elapsed time. The event timestamps of traces and pipelines are read
  from the same clock.
  """
  @spec monotonic_timestamp() :: integer()
  def monotonic_timestamp, do: Native.utils_monotonic_ns()

  @doc "Wall-clock time in nanoseconds since the Unix epoch (`System.system_time(:nanosecond)`'s clock)."
  @spec wall_timestamp() :: integer()
  def wall_timestamp, do: Native.utils_wall_ns()

  @doc """
  Formats a timestamp in nanoseconds since the Unix epoch (such as
  `wall_timestamp/0`) as `"YYYY-MM-DD hh:mm:ss.nnnnnnnnnZ"`, UTC.

      iex> ElixirScope.Utils.format_timestamp(1_609_459_200_123_456_789)
      "2021-01-01 00:00:00.123456789Z"
  """
  @spec format_timestamp(integer()) :: String.t()
  def format_timestamp(timestamp_ns) when is_integer(timestamp_ns) do
    seconds = Integer.floor_div(timestamp_ns, 1_000_000_000)
    nanos = Integer.mod(timestamp_ns, 1_000_000_000)

    case DateTime.from_unix(seconds, :second) do
      {:ok, dt} ->
        base = dt |> DateTime.to_naive() |> NaiveDateTime.to_string()
        base <> "." <> String.pad_leading(Integer.to_string(nanos), 9, "0") <> "Z"

      {:error, _} ->
        raise ArgumentError,
              "timestamp_ns is outside the range of dates, got: #{inspect(timestamp_ns)}"
    end
  end

  def format_timestamp(other), do: bad!("timestamp_ns", "an integer", other)

  @doc """
  Runs `fun` and returns `{result, duration_ns}`. Exceptions from `fun`
  propagate.
  """
  @spec measure((() -> result)) :: {result, non_neg_integer()} when result: term()
  def measure(fun) when is_function(fun, 0) do
    t0 = Native.utils_monotonic_ns()
    result = fun.()
    {result, Native.utils_monotonic_ns() - t0}
  end

  def measure(other), do: bad!("fun", "a zero-arity function", other)

  #############################################################################
  # Ids
  #############################################################################

  @doc """
  A unique, time-ordered integer id (see "Ids" above). Ids made one after
  the other by a process increase; across processes they are unique and
  ordered by their creation time to the nanosecond.
  """
  @spec generate_id() :: pos_integer()
  def generate_id, do: Native.utils_generate_id()

  @doc """
  The monotonic timestamp (ns, the clock of `monotonic_timestamp/0`) at
  which `id` was made by `generate_id/0`. Any other non-negative integer is
  decoded as the original implementation's ids were: its bits above the low
  16 (`id >>> 16`).
  """
  @spec id_to_timestamp(non_neg_integer()) :: integer()
  def id_to_timestamp(id) when is_integer(id) and id >= @time_id_base and id < @time_id_limit,
    do: Native.utils_id_timestamp(id)

  def id_to_timestamp(id) when is_integer(id) and id >= 0, do: id >>> 16
  def id_to_timestamp(other), do: bad!("id", "a non-negative integer", other)

  @doc """
  A random (version 4) UUID string, such as
  `"1b4e28ba-2fa1-4d2b-883f-0016d3cca427"`, for correlating with external
  systems.
  """
  @spec generate_correlation_id() :: String.t()
  def generate_correlation_id do
    <<a::32, b::16, c::16, d::16, e::48>> = :rand.bytes(16)
    c = (c &&& 0x0FFF) ||| 0x4000
    d = (d &&& 0x3FFF) ||| 0x8000

    IO.iodata_to_binary([
      hex(a, 8),
      ?-,
      hex(b, 4),
      ?-,
      hex(c, 4),
      ?-,
      hex(d, 4),
      ?-,
      hex(e, 12)
    ])
  end

  defp hex(n, digits),
    do: n |> Integer.to_string(16) |> String.downcase() |> String.pad_leading(digits, "0")

  #############################################################################
  # Inspection and truncation
  #############################################################################

  @doc """
  `inspect/2` with bounds: options `limit:` (default 100 items per
  collection) and `printable_limit:` (default 100 characters); structs are
  shown as maps.

      iex> ElixirScope.Utils.safe_inspect(%{key: "value"})
      ~s(%{key: "value"})
  """
  @spec safe_inspect(term(), keyword()) :: String.t()
  def safe_inspect(term, opts \\ [])

  def safe_inspect(term, opts) when is_list(opts) do
    unless Keyword.keyword?(opts), do: bad!("opts", "a keyword list", opts)
    limit = Keyword.get(opts, :limit, 100)
    printable = Keyword.get(opts, :printable_limit, 100)
    check_limit!(:limit, limit)
    check_limit!(:printable_limit, printable)
    inspect(term, limit: limit, printable_limit: printable, structs: false)
  end

  def safe_inspect(_term, opts), do: bad!("opts", "a keyword list", opts)

  defp check_limit!(_key, :infinity), do: :ok
  defp check_limit!(_key, n) when is_integer(n) and n >= 0, do: :ok

  defp check_limit!(key, other),
    do: bad!("option #{inspect(key)}", "a non-negative integer or :infinity", other)

  @doc """
  `term` itself if its external term format size is at most `max_size`
  bytes (default 5,000), else `{:truncated, size, type_hint}` with the size
  and a description such as `"binary data"`, `"list with 1000 elements"`,
  `"map with 3 entries"`, `"tuple with 2 elements"` or `"data"`.
  """
  @spec truncate_if_large(term(), non_neg_integer()) ::
          term() | {:truncated, pos_integer(), String.t()}
  def truncate_if_large(term, max_size \\ 5000)

  def truncate_if_large(term, max_size) when is_integer(max_size) and max_size >= 0 do
    size = :erlang.external_size(term)
    if size > max_size, do: {:truncated, size, type_hint(term)}, else: term
  end

  def truncate_if_large(_term, max_size),
    do: bad!("max_size", "a non-negative integer", max_size)

  @doc """
  `truncate_if_large/2` with the smaller default of 1,000 bytes, for event
  fields.
  """
  @spec truncate_data(term(), non_neg_integer()) ::
          term() | {:truncated, pos_integer(), String.t()}
  def truncate_data(term, max_size \\ 1000), do: truncate_if_large(term, max_size)

  defp type_hint(b) when is_binary(b), do: "binary data"
  defp type_hint(l) when is_list(l), do: list_hint(l, 0)
  defp type_hint(m) when is_map(m), do: "map with #{map_size(m)} entries"
  defp type_hint(t) when is_tuple(t), do: "tuple with #{tuple_size(t)} elements"
  defp type_hint(_), do: "data"

  defp list_hint([_ | rest], n), do: list_hint(rest, n + 1)
  defp list_hint([], n), do: "list with #{n} elements"
  defp list_hint(_improper_tail, n), do: "improper list with #{n} elements"

  @doc """
  The memory a term takes on a process heap, in bytes (its flat size in
  words times the word size; shared subterms are counted each time).
  """
  @spec term_size(term()) :: non_neg_integer()
  def term_size(term), do: :erts_debug.flat_size(term) * :erlang.system_info(:wordsize)

  #############################################################################
  # Measurement
  #############################################################################

  @doc """
  Runs `fun` between two garbage collections of the calling process and
  returns `{result, {memory_before, memory_after, memory_diff}}`, with the
  VM's total memory (`:erlang.memory(:total)`, bytes). Other processes
  allocate meanwhile too, so the difference can be negative.
  """
  @spec measure_memory((() -> result)) ::
          {result, {non_neg_integer(), non_neg_integer(), integer()}}
        when result: term()
  def measure_memory(fun) when is_function(fun, 0) do
    :erlang.garbage_collect()
    before = :erlang.memory(:total)
    result = fun.()
    :erlang.garbage_collect()
    after_ = :erlang.memory(:total)
    {result, {before, after_, after_ - before}}
  end

  def measure_memory(other), do: bad!("fun", "a zero-arity function", other)

  @process_keys [
    :memory,
    :reductions,
    :message_queue_len,
    :heap_size,
    :stack_size,
    :total_heap_size
  ]

  @doc """
  `%{memory, reductions, message_queue_len, heap_size, stack_size,
  total_heap_size, timestamp}` of a local process (default: the caller),
  or `%{error: :process_not_found}` if it is not alive.
  """
  @spec process_stats(pid()) :: map()
  def process_stats(pid \\ self())

  def process_stats(pid) when is_pid(pid) and node(pid) == node() do
    case Process.info(pid, @process_keys) do
      nil -> %{error: :process_not_found}
      info -> info |> Map.new() |> Map.put(:timestamp, monotonic_timestamp())
    end
  end

  def process_stats(pid), do: bad!("pid", "a local pid", pid)

  @doc """
  `%{timestamp, process_count, process_limit, total_memory,
  processes_memory, system_memory, ets_memory, atom_memory,
  scheduler_count, scheduler_count_online}` of the VM.
  """
  @spec system_stats() :: map()
  def system_stats do
    memory = :erlang.memory()

    %{
      timestamp: monotonic_timestamp(),
      process_count: :erlang.system_info(:process_count),
      process_limit: :erlang.system_info(:process_limit),
      total_memory: memory[:total],
      processes_memory: memory[:processes],
      system_memory: memory[:system],
      ets_memory: memory[:ets],
      atom_memory: memory[:atom],
      scheduler_count: :erlang.system_info(:schedulers),
      scheduler_count_online: :erlang.system_info(:schedulers_online)
    }
  end

  #############################################################################
  # Formatting
  #############################################################################

  @doc """
  A byte count as text: `"512 B"`, `"1.5 KB"`, `"1.4 MB"`, `"1.9 GB"`
  (binary units, one decimal).
  """
  @spec format_bytes(non_neg_integer()) :: String.t()
  def format_bytes(bytes) when is_integer(bytes) and bytes >= 0 do
    cond do
      bytes >= 1 <<< 30 -> scaled(bytes, 1 <<< 30, "GB")
      bytes >= 1 <<< 20 -> scaled(bytes, 1 <<< 20, "MB")
      bytes >= 1 <<< 10 -> scaled(bytes, 1 <<< 10, "KB")
      true -> "#{bytes} B"
    end
  end

  def format_bytes(other), do: bad!("bytes", "a non-negative integer", other)

  @doc """
  A duration in nanoseconds as text: `"500 ns"`, `"1.5 μs"`, `"1.5 ms"`,
  `"2.0 s"` (one decimal).
  """
  @spec format_duration(non_neg_integer()) :: String.t()
  def format_duration(ns) when is_integer(ns) and ns >= 0 do
    cond do
      ns >= 1_000_000_000 -> scaled(ns, 1_000_000_000, "s")
      ns >= 1_000_000 -> scaled(ns, 1_000_000, "ms")
      ns >= 1_000 -> scaled(ns, 1_000, "μs")
      true -> "#{ns} ns"
    end
  end

  def format_duration(other), do: bad!("nanoseconds", "a non-negative integer", other)

  defp scaled(n, unit, name), do: "#{Float.round(n / unit, 1)} #{name}"

  #############################################################################
  # Validation
  #############################################################################

  @doc "Is `value` an integer greater than 0?"
  @spec valid_positive_integer?(term()) :: boolean()
  def valid_positive_integer?(value), do: is_integer(value) and value > 0

  @doc "Is `value` a number between 0 and 1 (inclusive)?"
  @spec valid_percentage?(term()) :: boolean()
  def valid_percentage?(value), do: is_number(value) and value >= 0 and value <= 1

  @doc """
  Is `value` the pid of a live process? Remote pids are asked about on
  their node (false if the node is not connected or does not answer within
  a second).
  """
  @spec valid_pid?(term()) :: boolean()
  def valid_pid?(pid) when is_pid(pid) and node(pid) == node(), do: Process.alive?(pid)

  def valid_pid?(pid) when is_pid(pid) do
    node(pid) in Node.list() and :erpc.call(node(pid), :erlang, :is_process_alive, [pid], 1000)
  catch
    _, _ -> false
  end

  def valid_pid?(_), do: false

  defp bad!(what, expected, got),
    do:
      raise(
        ArgumentError,
        "#{what} must be #{expected}, got: #{inspect(got, limit: 5, printable_limit: 40)}"
      )
end

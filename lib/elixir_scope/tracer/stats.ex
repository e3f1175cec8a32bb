defmodule ElixirScope.Tracer.Stats do
  @moduledoc false
  # Stats sessions: `ElixirScope.trace(targets, mode: :stats | :counts)`.
  #
  # No event is recorded: the VM counts. `:stats` sets the `call_time`
  # trace pattern on the targets (a call count and the time spent in the
  # function itself, per process; only processes with the `call` trace
  # flag count, so they get it, with a tracer NIF that discards every
  # event), `:counts` sets `call_count` (a count per function, every
  # process; no process flag at all). Neither sends a trace message nor
  # calls a tracer per call. `ElixirScope.Tracer` runs the session; this
  # module validates options, switches the counters on and off, reads
  # them, and answers `ElixirScope.Analysis.call_stat/1` from them.
  #
  # Sampled `:stats` (`sample: s`, 0 < s < 1, `pids: :all`): the VM's
  # `call_time` costs ~190 ns per call (two clock reads and a per-process
  # hash update per call); `call_count` ~11. A sampled session keeps
  # `call_count` on all the time (exact counts) and `call_time` on in
  # windows only: 1 ms on, then paused for (1/s - 1) ms; at the next
  # window's start the session process adds what the counters hold to its
  # sums and restarts them (which zeroes them). Calls started in a window
  # keep their return hooks through the pause, so each is counted with its
  # whole own time (if it returned within the pause). A function's own
  # time is its sampled time × its exact count / its sampled count (a mean
  # per call over the windows: an estimate, exact for calls that all cost
  # alike); per-process rows are the sampled rows scaled the same way.

  alias ElixirScope.Native

  @modes [:stats, :counts]

  @defaults [mode: :stats, pids: :all, duration: 60_000, max_rows: 100_000, sample: 1.0]

  @doc false
  def modes, do: @modes

  @doc false
  # Is the last trace (started on this node) a stats session?
  def last?, do: :persistent_term.get({ElixirScope.Tracer, :mode}, :events) in @modes

  # ---- options -------------------------------------------------------------------

  @doc false
  # The session config from the options given to trace/2 (mode: :stats or
  # :counts); options of event tracing raise ArgumentError.
  def validate!(opts, event_keys) do
    if Keyword.get(opts, :nodes) != nil do
      raise ArgumentError,
            "mode: #{inspect(opts[:mode])} traces this node only: nodes: is not supported"
    end

    opts = Keyword.delete(opts, :nodes)
    keys = Keyword.keys(opts)
    misplaced = Enum.uniq(for k <- keys, k in event_keys, k not in Keyword.keys(@defaults), do: k)

    if misplaced != [] do
      raise ArgumentError,
            "option(s) #{inspect(misplaced)} make no sense in mode: #{inspect(opts[:mode])} " <>
              "(it records no events, the VM only counts calls); " <>
              "its options: #{inspect(Keyword.keys(@defaults))}"
    end

    opts = ElixirScope.Args.keyword_opts!(opts, @defaults, "ElixirScope.trace/2 (stats mode)")

    for k <- [:duration, :max_rows] do
      v = opts[k]

      unless is_integer(v) and v > 0,
        do: raise(ArgumentError, "#{k} must be a positive integer, got: #{inspect(v)}")
    end

    if opts[:mode] == :counts and opts[:pids] != :all do
      raise ArgumentError,
            "mode: :counts counts the calls of every process (the VM's call_count " <>
              "has no per-process filter): pids must be :all, got: #{inspect(opts[:pids])} " <>
              "(mode: :stats counts per process)"
    end

    sample = opts[:sample]

    unless is_number(sample) and sample > 0 and sample <= 1 do
      raise ArgumentError,
            "sample must be a number in (0, 1] (the fraction of the time call_time " <>
              "counts), got: #{inspect(sample)}"
    end

    if sample < 1 and (opts[:mode] != :stats or opts[:pids] != :all) do
      raise ArgumentError,
            "sample: #{inspect(sample)} needs mode: :stats and pids: :all (its exact " <>
              "counts come from the VM's call_count, which counts every process), got: " <>
              "mode: #{inspect(opts[:mode])}, pids: #{inspect(opts[:pids])}"
    end

    %{
      mode: opts[:mode],
      duration: opts[:duration],
      max_rows: opts[:max_rows],
      sample: sample
    }
  end

  # ---- sampled :stats ------------------------------------------------------------

  @doc false
  # Is `config` a sampled :stats session?
  def sampled?(config), do: config.mode == :stats and Map.get(config, :sample, 1.0) < 1

  @doc false
  # {on_ms, off_ms} of a sampled session's call_time windows.
  def windows(sample), do: {1, max(1, round(1 / sample) - 1)}

  @doc false
  # A sampled session's counters on: call_count (exact counts) and
  # call_time (on in windows); the number of functions matched.
  def sampled_on(patterns) do
    n = patterns_on(patterns, :stats)
    _ = patterns_on(patterns, :counts)
    n
  end

  @doc false
  def sampled_off(patterns) do
    patterns_off(patterns, :stats)
    patterns_off(patterns, :counts)
  end

  @doc false
  # Restarts call_time (zeroed: what it held was added to the sums).
  def time_on(patterns),
    do: Enum.each(patterns, &:erlang.trace_pattern(&1, :restart, [:call_time]))

  @doc false
  def time_off(patterns), do: pause(patterns, :stats)

  @doc false
  # Empty sums of sampled call_time windows.
  def new_sums, do: %{funs: %{}, rows: %{}, dropped: 0}

  @doc false
  # The call_time counters now added to `sums` (per function always; per
  # process and function up to `max_rows` keys, the rest counted in
  # `dropped`, once per window).
  def add_window(sums, functions, max_rows) do
    Enum.reduce(functions, sums, fn mfa, sums ->
      case :erlang.trace_info(mfa, :call_time) do
        {:call_time, per_pid} when is_list(per_pid) ->
          Enum.reduce(per_pid, sums, fn
            {pid, c, s, us}, sums when c > 0 ->
              t = (s * 1_000_000 + us) * 1000
              funs = Map.update(sums.funs, mfa, {c, t}, fn {c0, t0} -> {c0 + c, t0 + t} end)
              key = {pid, mfa}

              cond do
                Map.has_key?(sums.rows, key) ->
                  rows = Map.update!(sums.rows, key, fn {c0, t0} -> {c0 + c, t0 + t} end)
                  %{sums | funs: funs, rows: rows}

                map_size(sums.rows) < max_rows ->
                  %{sums | funs: funs, rows: Map.put(sums.rows, key, {c, t})}

                true ->
                  %{sums | funs: funs, dropped: sums.dropped + 1}
              end

            _, sums ->
              sums
          end)

        _ ->
          sums
      end
    end)
  end

  @doc false
  # A sampled session's data (the shape read/3 gives): counts from
  # call_count, times (and per-process counts) scaled from the sums;
  # `sampled_calls` the calls the windows timed. A function no window
  # timed has own_ns nil.
  def read_sampled(functions, sums) do
    counts =
      for mfa <- functions,
          {:call_count, n} <- [:erlang.trace_info(mfa, :call_count)],
          is_integer(n) and n > 0,
          into: %{},
          do: {mfa, n}

    scaled = fn mfa, x ->
      with n when is_integer(n) <- counts[mfa],
           {cs, _} when cs > 0 <- sums.funs[mfa],
           do: div(x * n, cs),
           else: (_ -> nil)
    end

    totals =
      for {mfa, n} <- counts do
        {mfa, n, with({_, t} <- sums.funs[mfa], do: scaled.(mfa, t))}
      end

    rows =
      for {{pid, mfa}, {c, t}} <- sums.rows,
          is_integer(counts[mfa]),
          do: {pid, mfa, scaled.(mfa, c), scaled.(mfa, t)}

    %{
      totals: totals,
      rows: rows,
      rows_dropped: sums.dropped,
      calls: Enum.reduce(totals, 0, fn {_, c, _}, n -> n + c end),
      sampled_calls: Enum.reduce(sums.funs, 0, fn {_, {c, _}}, n -> n + c end)
    }
  end

  # ---- counters on and off -------------------------------------------------------

  defp flag(:stats), do: :call_time
  defp flag(:counts), do: :call_count

  @doc false
  # Switches the counters on for `patterns` (fresh, zeroed); the number of
  # functions matched.
  def patterns_on(patterns, mode) do
    Enum.reduce(patterns, 0, fn p, n ->
      # Reset first: a counter left by an earlier session starts at zero.
      :erlang.trace_pattern(p, false, [flag(mode)])
      n + :erlang.trace_pattern(p, true, [flag(mode)])
    end)
  end

  @doc false
  # Freezes the counters (they keep their values, nothing more counts).
  def pause(patterns, mode),
    do: Enum.each(patterns, &:erlang.trace_pattern(&1, :pause, [flag(mode)]))

  @doc false
  # Switches the counters off and frees them.
  def patterns_off(patterns, mode),
    do: Enum.each(patterns, &:erlang.trace_pattern(&1, false, [flag(mode)]))

  @doc false
  # The `call` flag (with the discarding tracer) on the processes a
  # `:stats` session counts in, `own` excluded; `:ok` or `{:error, _}`.
  def procs_on(:counts, _pids, _tracer, _own), do: :ok

  def procs_on(:stats, pids, tracer, own) do
    flags = [:call, {:tracer, Native, tracer}]

    case pids do
      spec when spec in [:all, :new] ->
        _ = :erlang.trace(spec, true, flags)
        Enum.each(own, &untrace/1)

      list ->
        Enum.each(list, &:erlang.trace(&1, true, flags))
    end

    :ok
  rescue
    ArgumentError -> {:error, :trace_failed}
  end

  @doc false
  def procs_off(:counts, _pids), do: :ok

  def procs_off(:stats, spec) when spec in [:all, :new] do
    _ = :erlang.trace(:all, false, [:call])
    :ok
  end

  def procs_off(:stats, list), do: Enum.each(list, &untrace/1)

  defp untrace(pid) do
    _ = :erlang.trace(pid, false, [:call])
  rescue
    ArgumentError -> 0
  end

  # ---- reading -------------------------------------------------------------------

  @doc false
  # The functions `patterns` cover ({m, f, a}, locals included).
  def functions(patterns) do
    patterns
    |> Enum.flat_map(fn {m, f, a} ->
      for {fun, ar} <- module_functions(m), f in [:_, fun], a in [:_, ar], do: {m, fun, ar}
    end)
    |> Enum.uniq()
  end

  defp module_functions(m) do
    m.module_info(:functions)
  rescue
    _ -> []
  end

  @doc false
  # The counters now: `%{totals: [{mfa, count, ns | nil}], rows: [{pid,
  # mfa, count, ns}], rows_dropped:, calls:}` (functions and rows that
  # counted no call left out). `rows` (per process and function, `:stats`
  # only) keeps at most `max_rows`; `totals` always covers every function.
  def read(functions, mode, max_rows) do
    {totals, rows, _kept, dropped} =
      Enum.reduce(functions, {[], [], 0, 0}, fn mfa, acc -> read_one(mode, mfa, acc, max_rows) end)

    %{
      totals: totals,
      rows: rows,
      rows_dropped: dropped,
      calls: Enum.reduce(totals, 0, fn {_, c, _}, n -> n + c end)
    }
  end

  defp read_one(:counts, mfa, {totals, rows, kept, dropped}, _max) do
    case :erlang.trace_info(mfa, :call_count) do
      {:call_count, n} when is_integer(n) and n > 0 ->
        {[{mfa, n, nil} | totals], rows, kept, dropped}

      _ ->
        {totals, rows, kept, dropped}
    end
  end

  defp read_one(:stats, mfa, {totals, rows, kept, dropped}, max) do
    case :erlang.trace_info(mfa, :call_time) do
      {:call_time, per_pid} when is_list(per_pid) ->
        {count, ns, rows, kept, dropped} =
          Enum.reduce(per_pid, {0, 0, rows, kept, dropped}, fn
            {pid, c, s, us}, {count, ns, rows, kept, dropped} when c > 0 ->
              t = (s * 1_000_000 + us) * 1000

              if kept < max,
                do: {count + c, ns + t, [{pid, mfa, c, t} | rows], kept + 1, dropped},
                else: {count + c, ns + t, rows, kept, dropped + 1}

            _, acc ->
              acc
          end)

        totals = if count > 0, do: [{mfa, count, ns} | totals], else: totals
        {totals, rows, kept, dropped}

      _ ->
        {totals, rows, kept, dropped}
    end
  end

  # ---- call_stat -----------------------------------------------------------------

  @doc false
  # `ElixirScope.Analysis.call_stat/1` from the counters (`data` from
  # read/3, `mode` the session's): `acc_ns` is nil (the VM keeps no
  # inclusive time), `own_ns` the time in the function itself (nil under
  # `:counts`). By `own_ns`, then count, largest first.
  def call_stat(%{mode: mode, data: data}, by, modules) do
    keep? = fn {m, _, _} -> modules == [] or m in modules end

    if by in [:process, :process_function] and mode == :counts do
      raise ArgumentError,
            "by: #{inspect(by)} needs per-process counters: trace with mode: :stats " <>
              "(mode: :counts counts per function only)"
    end

    pairs =
      case by do
        :function ->
          for {mfa, c, t} <- data.totals, keep?.(mfa), do: {mfa, c, t}

        :module ->
          for({{m, _, _} = mfa, c, t} <- data.totals, keep?.(mfa), do: {m, c, t})
          |> merge()

        :process ->
          for({pid, mfa, c, t} <- data.rows, keep?.(mfa), do: {pid, c, t}) |> merge()

        :process_function ->
          for {pid, mfa, c, t} <- data.rows, keep?.(mfa), do: {{pid, mfa}, c, t}
      end

    pairs
    |> Enum.map(fn {key, c, t} -> %{key: key, count: c, acc_ns: nil, own_ns: t} end)
    |> Enum.sort_by(&{&1.own_ns || 0, &1.count}, :desc)
  end

  defp merge(triples) do
    triples
    |> Enum.reduce(%{}, fn {k, c, t}, acc ->
      Map.update(acc, k, {c, t}, fn {c0, t0} -> {c0 + c, t && t0 && t0 + t} end)
    end)
    |> Enum.map(fn {k, {c, t}} -> {k, c, t} end)
  end
end

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

  alias ElixirScope.Native

  @modes [:stats, :counts]

  @defaults [mode: :stats, pids: :all, duration: 60_000, max_rows: 100_000]

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

    %{mode: opts[:mode], duration: opts[:duration], max_rows: opts[:max_rows]}
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

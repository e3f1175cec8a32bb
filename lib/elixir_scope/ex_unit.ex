defmodule ElixirScope.ExUnit do
  @moduledoc """
  Trace a block of test code and assert on what happened: which functions
  were called (with argument patterns and counts), which messages went
  between which processes, what state a process was in, what a call tree
  looked like. A failing assertion prints the relevant call tree, message
  flow or state history.

      defmodule MyApp.BankTest do
        use ElixirScope.Case, async: true     # or: use ExUnit.Case; import ElixirScope.ExUnit

        test "a deposit reaches the auditor" do
          {:ok, bank} = start_supervised(MyApp.Bank)

          {{:ok, 150}, trace} =
            trace_block([MyApp.Bank, MyApp.Auditor], fn -> MyApp.Bank.deposit(bank, 150) end)

          assert_called(trace, {MyApp.Bank, :handle_call, [{:deposit, _}, _from, _state]}, times: 1)
          refute_called(trace, {MyApp.Bank, :withdraw, :_})
          assert_message(trace, bank, :_, {:"$gen_cast", {:audit, _}})
          assert_state(trace, bank, %{balance: 150})
          assert_call_tree(trace, {MyApp.Bank, :deposit, 2}, [{MyApp.Bank, :handle_call, 3}])
        end
      end

  ## What is traced, and async tests

  `trace_block/3` traces the calling (test) process and every process it
  spawns while the block runs (processes started with `start_supervised/1`
  inside the block included), plus the processes given as `pids:` (for
  example a server started in `setup`, whose state is then snapshotted
  when the block starts). Each block has its own tracer state, pipeline
  and store: the VM keeps one tracer per process, so the events of a
  test's processes go to that test's store and to no other, and any number
  of async tests trace at once. Call tracing patterns are node-wide, so
  each block's tracer keeps only the calls of its own `targets`. A process
  already traced by another running block (a shared, named server) is
  refused with `{:already_traced, pid}`: trace shared processes from one
  test at a time. A global `ElixirScope.trace/2` and `trace_block/3`
  exclude each other.

  The store lives as long as the returned trace (the block's pipeline is
  stopped when the block ends); query it with any `ElixirScope.Analysis`
  function and `store: trace.store`.
  """

  alias ElixirScope.Analysis
  alias ElixirScope.Analysis.{Format, State}
  alias ElixirScope.Tracer

  defmodule Trace do
    @moduledoc """
    What `ElixirScope.ExUnit.trace_block/3` recorded: `store` (a
    `%DataAccess{}` for `ElixirScope.Analysis` with `store:`), `root` (the
    process that ran the block), `pids` (the extra processes traced),
    `targets`, `started_at` / `stopped_at` (monotonic ns) and `summary`
    (the tracer's counters).
    """
    defstruct [:store, :root, :pids, :targets, :started_at, :stopped_at, :summary]

    @type t :: %__MODULE__{
            store: ElixirScope.Storage.DataAccess.t(),
            root: pid(),
            pids: [pid()],
            targets: term(),
            started_at: integer(),
            stopped_at: integer(),
            summary: map()
          }
  end

  @doc """
  Runs `fun` (in the calling process) traced, and returns `{fun_result,
  %Trace{}}`. `targets`: modules, `{m, f, a}` or `{:app, app}` as for
  `ElixirScope.trace/2`.

  Options: `:pids` (extra processes to trace), and as for
  `ElixirScope.trace/2`: `:events`, `:payload`, `:max_payload_bytes`,
  `:state`, `:max_state_bytes`, `:max_events` (200_000 here), `:max_rate`,
  `:duration` (300_000 ms here), `:ring_size` (16_384 here). If `fun`
  raises, exits or throws, the trace stops and the error goes on. A block
  that cannot start raises `ArgumentError` with the reason (a dead pid, a
  process another block traces, a global trace running).
  """
  @spec trace_block(term(), (() -> result), keyword()) :: {result, Trace.t()} when result: term()
  def trace_block(targets, fun, opts \\ [])

  def trace_block(targets, fun, opts) when is_function(fun, 0) do
    session =
      case Tracer.start_scoped(targets, self(), opts) do
        {:ok, session} ->
          session

        {:error, reason} ->
          raise ArgumentError, "trace_block/3 could not start tracing: #{inspect(reason)}"
      end

    # Tracing is on and the snapshots are taken. The block's bounds are read
    # from the clock the tracer stamps events with (the native clock, which
    # never goes backwards and can run a little ahead of the VM's), so the
    # start snapshot is never later than `started_at`.
    started = ElixirScope.Utils.monotonic_timestamp()

    result =
      try do
        fun.()
      after
        {:ok, summary} = Tracer.stop_scoped(session)
        Process.put({__MODULE__, session.id}, summary)
      end

    summary = Process.delete({__MODULE__, session.id})

    {result,
     %Trace{
       store: session.store,
       root: self(),
       pids: List.wrap(Keyword.get(opts, :pids, [])),
       targets: targets,
       started_at: started,
       stopped_at: ElixirScope.Utils.monotonic_timestamp(),
       summary: summary
     }}
  end

  def trace_block(_targets, fun, _opts),
    do: raise(ArgumentError, "trace_block/3 expects a function of arity 0, got: #{inspect(fun)}")

  # ---- assert_called / refute_called -----------------------------------------------

  @doc """
  Asserts that `module.function` was called in the trace, matching the
  third element: an arity, `:_` (any), or a list of argument patterns
  (`{Bank, :handle_call, [{:deposit, n}, _from, %{balance: b}]} when n > b`
  — pins and guards work as in `match?/2`).

  Options: `times:` exactly that many matching calls, `at_least:` (default
  1), `at_most:`. On failure, the message lists the recorded calls of that
  function and prints the block's call trees.
  """
  defmacro assert_called(trace, mfa, opts \\ []), do: called(trace, mfa, opts, :assert)

  @doc """
  Asserts that no call of `module.function` matching the third element
  (see `assert_called/3`) is in the trace; the failure lists the calls.
  """
  defmacro refute_called(trace, mfa), do: called(trace, mfa, [times: 0], :refute)

  # A literal `{m, f, args}` is taken apart at compile time (argument
  # patterns become a `match?/2`); anything else is an `{m, f, arity | :_}`
  # value taken apart at run time.
  # `{m, f, [patterns]} when guard`
  defp called(trace, {:when, meta, [{:{}, m3, [m, f, args]}, guard]}, opts, mode)
       when is_list(args),
       do: called(trace, {:{}, m3, [m, f, {:when, meta, [args, guard]}]}, opts, mode)

  defp called(trace, {:{}, _, [m, f, args]}, opts, mode) do
    {matcher, arity} = matcher(args)
    fname = if is_atom(f), do: Atom.to_string(f), else: Macro.to_string(f)
    text = "#{Macro.to_string(m)}.#{fname}" <> args_text(args)

    quote do
      ElixirScope.ExUnit.__check_called__(
        unquote(trace),
        unquote(m),
        unquote(f),
        unquote(arity),
        unquote(matcher),
        unquote(text),
        unquote(opts),
        unquote(mode)
      )
    end
  end

  defp called(trace, mfa, opts, mode) do
    quote do
      case unquote(mfa) do
        {m, f, a} when is_atom(m) and is_atom(f) and (a == :_ or is_integer(a)) ->
          ElixirScope.ExUnit.__check_called__(
            unquote(trace),
            m,
            f,
            if(a == :_, do: nil, else: a),
            fn _ -> true end,
            "#{inspect(m)}.#{f}/#{a}",
            unquote(opts),
            unquote(mode)
          )

        other ->
          raise ArgumentError,
                "expected {module, function, arity | :_ | [argument patterns]}, got: " <>
                  inspect(other)
      end
    end
  end

  defp matcher(:_), do: {quote(do: fn _ -> true end), nil}
  defp matcher(n) when is_integer(n), do: {quote(do: fn _ -> true end), n}

  defp matcher({:when, _, [list, _guard]} = pattern) when is_list(list),
    do: {list_matcher(pattern), length(list)}

  defp matcher(list) when is_list(list), do: {list_matcher(list), length(list)}
  # An arity computed at run time.
  defp matcher(other), do: {quote(do: fn _ -> true end), other}

  defp list_matcher(pattern) do
    quote do
      fn
        args when is_list(args) -> match?(unquote(pattern), args)
        _ -> :no_arguments
      end
    end
  end

  defp args_text(:_), do: "/_"
  defp args_text(n) when is_integer(n), do: "/#{n}"

  defp args_text({:when, _, [list, guard]}),
    do: "(#{list_text(list)}) when #{Macro.to_string(guard)}"

  defp args_text(list) when is_list(list), do: "(#{list_text(list)})"
  defp args_text(other), do: "/#{Macro.to_string(other)}"

  defp list_text(list), do: Enum.map_join(list, ", ", &Macro.to_string/1)

  @doc false
  def __check_called__(%Trace{} = trace, m, f, arity, matcher, text, opts, mode) do
    opts =
      ElixirScope.Args.keyword_opts!(
        opts,
        [times: nil, at_least: nil, at_most: nil],
        "assert_called"
      )

    calls =
      Analysis.select(types: [:call], module: m, function: f, store: trace.store)
      |> Enum.filter(&(arity == nil or &1.arity == arity))

    results = Enum.map(calls, &{&1, matcher.(&1.data)})

    if Enum.any?(results, fn {_, r} -> r == :no_arguments end) do
      raise ExUnit.AssertionError,
        message:
          "#{text}: the trace has no arguments to match (traced with payload: :arity?)\n" <>
            calls_text(calls)
    end

    matching = Enum.count(results, fn {_, r} -> r == true end)
    {ok, want} = count_ok(matching, opts)

    unless ok do
      verb = if mode == :refute, do: "expected no call of", else: "expected #{want} of"

      raise ExUnit.AssertionError,
        message:
          "#{verb} #{text}, got #{matching} matching call(s) (#{length(calls)} of #{inspect(m)}.#{f} in all)\n" <>
            calls_text(calls) <> "\n" <> trees_text(trace)
    end

    matching
  end

  def __check_called__(other, _m, _f, _a, _matcher, _text, _opts, _mode), do: bad_trace!(other)

  defp count_ok(n, opts) do
    cond do
      opts[:times] != nil ->
        {n == opts[:times], "exactly #{opts[:times]} call(s)"}

      opts[:at_most] != nil and opts[:at_least] != nil ->
        {n >= opts[:at_least] and n <= opts[:at_most],
         "#{opts[:at_least]} to #{opts[:at_most]} call(s)"}

      opts[:at_most] != nil ->
        {n <= opts[:at_most], "at most #{opts[:at_most]} call(s)"}

      true ->
        {n >= (opts[:at_least] || 1), "at least #{opts[:at_least] || 1} call(s)"}
    end
  end

  defp calls_text([]), do: "  (no such call recorded)"

  defp calls_text(calls) do
    shown = Enum.take(calls, 10)
    more = if length(calls) > 10, do: "\n  … #{length(calls) - 10} more", else: ""
    "recorded calls:\n" <> Enum.map_join(shown, "\n", &("  " <> Format.format_entry(&1))) <> more
  end

  # The call trees of the block's outermost calls.
  defp trees_text(trace) do
    roots =
      Analysis.select(types: [:call], store: trace.store)
      |> Enum.filter(&(&1.parent_id == nil))
      |> Enum.take(5)

    case roots do
      [] ->
        "call trees: (no traced call in the block)"

      _ ->
        "call trees:\n" <>
          Enum.map_join(roots, "\n", fn r ->
            r.id
            |> Analysis.call_tree(store: trace.store)
            |> Format.format_tree(max_depth: 3)
            |> indent()
          end)
    end
  end

  # ---- assert_message ---------------------------------------------------------------

  @doc """
  Asserts that a message matching `pattern` was sent from `from` to `to`
  in the trace. `from` and `to` are pids (`to` may be a registered name)
  or `:_` for any. On failure, prints the message flow of those processes.
  """
  defmacro assert_message(trace, from, to, pattern) do
    text = Macro.to_string(pattern)

    quote do
      ElixirScope.ExUnit.__check_message__(
        unquote(trace),
        unquote(from),
        unquote(to),
        fn msg -> match?(unquote(pattern), msg) end,
        unquote(text)
      )
    end
  end

  @doc false
  def __check_message__(%Trace{} = trace, from, to, matcher, text) do
    flows = Analysis.messages(store: trace.store)

    hit =
      Enum.find(flows, fn m ->
        (from == :_ or m.from == from) and (to == :_ or m.to == to) and matcher.(m.message)
      end)

    if hit == nil do
      related =
        Enum.filter(flows, fn m -> from == :_ or m.from == from or (to == :_ or m.to == to) end)

      shown = Enum.take(related, 20)

      raise ExUnit.AssertionError,
        message:
          "expected a message #{text} from #{who(from)} to #{who(to)}, none was recorded\n" <>
            "message flow (#{length(related)} messages of those processes):\n" <>
            if(shown == [], do: "  (none)", else: indent(Format.format_messages(shown)))
    end

    hit
  end

  def __check_message__(other, _from, _to, _matcher, _text), do: bad_trace!(other)

  defp who(:_), do: "any process"
  defp who(p), do: inspect(p)

  # ---- assert_state --------------------------------------------------------------------

  @doc """
  Asserts that the state of `pid` matches `pattern`: the last state
  recorded in the trace, or the state in force `at:` a monotonic time (or
  when an event, `%Entry{}` or `%State{}`, of any process happened). A gen_statem's state is matched as `{state_name,
  data}`. Returns the `%ElixirScope.Analysis.State{}`. On failure, prints
  the process's state history as diffs.
  """
  defmacro assert_state(trace, pid, pattern, opts \\ []) do
    text = Macro.to_string(pattern)

    quote do
      ElixirScope.ExUnit.__check_state__(
        unquote(trace),
        unquote(pid),
        fn value -> match?(unquote(pattern), value) end,
        unquote(text),
        unquote(opts)
      )
    end
  end

  @doc false
  def __check_state__(%Trace{} = trace, pid, matcher, text, opts) do
    opts = ElixirScope.Args.keyword_opts!(opts, [at: nil], "assert_state")

    found =
      case opts[:at] do
        nil ->
          case Analysis.state_history(pid, store: trace.store) do
            [] -> {:error, :no_state}
            {:error, _} = e -> e
            list -> {:ok, List.last(list)}
          end

        %{timestamp: t} when is_integer(t) ->
          Analysis.state_at(pid, t, store: trace.store)

        t ->
          Analysis.state_at(pid, t, store: trace.store)
      end

    case found do
      {:ok, %State{} = st} ->
        value = if st.name != nil, do: {st.name, st.state}, else: st.state

        unless matcher.(value) do
          raise ExUnit.AssertionError,
            message:
              "expected the state of #{inspect(pid)} to match #{text}, it was:\n" <>
                indent(inspect(value, pretty: true, limit: 50)) <>
                "\nstate history:\n" <> history_text(trace, pid)
        end

        st

      {:error, reason} ->
        raise ExUnit.AssertionError,
          message:
            "expected the state of #{inspect(pid)} to match #{text}, but there is none (#{reason})\n" <>
              "processes with states in the trace: " <>
              inspect(Analysis.state_processes(store: trace.store))
    end
  end

  def __check_state__(other, _pid, _matcher, _text, _opts), do: bad_trace!(other)

  defp history_text(trace, pid) do
    pid |> Analysis.state_history(store: trace.store) |> Format.format_state_history() |> indent()
  end

  # ---- assert_call_tree ----------------------------------------------------------------

  @doc """
  Asserts that some call of `root_mfa` (`{m, f, arity | :_}`) in the trace
  has the call tree `expected`: the list of its direct calls, in order,
  each `{m, f, a}` (its own calls not checked) or `{{m, f, a}, [children]}`
  (checked the same way). On failure, prints the tree of the first such
  call (or says there is none).
  """
  @spec assert_call_tree(Trace.t(), {module(), atom(), arity() | :_}, list()) :: map()
  def assert_call_tree(%Trace{} = trace, {m, f, a} = root, expected) when is_list(expected) do
    roots =
      Analysis.select(types: [:call], module: m, function: f, store: trace.store)
      |> Enum.filter(&(a == :_ or &1.arity == a))

    trees = Enum.map(roots, &Analysis.call_tree(&1, store: trace.store))

    case Enum.find(trees, &shape_matches?(&1, expected)) do
      nil ->
        shown =
          case trees do
            [] -> "  (no call of #{mfa_text(root)} recorded)"
            [t | _] -> indent(Format.format_tree(t, max_depth: 4))
          end

        raise ExUnit.AssertionError,
          message:
            "expected a call of #{mfa_text(root)} with the tree\n" <>
              indent(shape_text(expected, 0)) <>
              "\nrecorded (#{length(trees)} call(s); the first):\n" <> shown

      tree ->
        tree
    end
  end

  def assert_call_tree(%Trace{}, root, expected) do
    raise ArgumentError,
          "assert_call_tree/3 expects {m, f, arity | :_} and a list, got: " <>
            "#{inspect(root)}, #{inspect(expected)}"
  end

  def assert_call_tree(other, _root, _expected), do: bad_trace!(other)

  defp shape_matches?(%{children: kids}, expected) do
    calls = for %{call: _} = k <- kids, do: k

    length(calls) == length(expected) and
      Enum.all?(Enum.zip(calls, expected), fn {node, spec} -> node_matches?(node, spec) end)
  end

  defp node_matches?(node, {{_, _, _} = mfa, children}) when is_list(children),
    do: node_matches?(node, mfa) and shape_matches?(node, children)

  defp node_matches?(%{call: c}, {m, f, a}),
    do: c.module == m and c.function == f and (a == :_ or c.arity == a)

  defp node_matches?(_node, _spec), do: false

  defp shape_text([], _depth), do: "(no calls)"

  defp shape_text(specs, depth) do
    pad = String.duplicate("  ", depth)

    Enum.map_join(specs, "\n", fn
      {{_, _, _} = mfa, kids} when is_list(kids) and kids != [] ->
        "#{pad}#{mfa_text(mfa)}\n" <> shape_text(kids, depth + 1)

      {{_, _, _} = mfa, []} ->
        "#{pad}#{mfa_text(mfa)} (no calls)"

      mfa ->
        "#{pad}#{mfa_text(mfa)}"
    end)
  end

  defp mfa_text({m, f, a}), do: "#{inspect(m)}.#{f}/#{a}"
  defp mfa_text(other), do: inspect(other)

  defp indent(text), do: text |> String.split("\n") |> Enum.map_join("\n", &("  " <> &1))

  defp bad_trace!(other) do
    raise ArgumentError,
          "expected the %ElixirScope.ExUnit.Trace{} trace_block/3 returned, got: #{inspect(other)}"
  end
end

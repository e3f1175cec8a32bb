defmodule ElixirScope.Analysis.Format do
  @moduledoc """
  Pretty-printers for `ElixirScope.Analysis` results, for IEx. Each
  `print_*` function writes to standard output and returns `:ok`; the
  `format_*` functions return the text.
  """

  alias ElixirScope.Analysis
  alias ElixirScope.Analysis.{Entry, State}

  @doc "One event on one line."
  @spec format_entry(Entry.t()) :: String.t()
  def format_entry(%Entry{} = e) do
    case e.type do
      :call -> "#{mfa(e)}#{args(e)}"
      :return -> "#{mf(e)} returned #{short(e.data)}#{dur(e)}"
      :exception -> "#{mf(e)} raised #{exception(e.data)}#{dur(e)}"
      :send -> "#{who(e.pid)} → #{who(e.peer)}: #{short(e.data)}"
      :receive -> "#{who(e.pid)} ← #{short(e.data)}"
      :spawn -> "#{who(e.peer)} spawned #{who(e.pid)}"
      :exit -> "#{who(e.pid)} exited: #{short(e.data)}"
      :state_snapshot -> "snapshot of #{who(e.pid)}: #{short(e.data)}"
      t when t in [:link, :unlink] -> "#{who(e.pid)} #{t} #{who(e.peer)}"
      other -> "#{other} #{short(e.data)}"
    end
  end

  @doc "A call stack (from `Analysis.traceback/2`), innermost call first."
  @spec format_traceback([Entry.t()] | nil) :: String.t()
  def format_traceback(nil), do: "(unknown event)"
  def format_traceback([]), do: "(not inside a traced call)"

  def format_traceback(calls) do
    calls
    |> Enum.with_index()
    |> Enum.map_join("\n", fn {c, i} ->
      "#{String.pad_leading("#{i}", 3)}  #{mfa(c)}#{args(c)}  #{who(c.pid)}"
    end)
  end

  @doc "Prints `format_traceback/1`."
  @spec print_traceback([Entry.t()] | nil) :: :ok
  def print_traceback(calls), do: IO.puts(format_traceback(calls))

  @doc """
  A call tree (from `Analysis.call_tree/2`), indented, with message arrows
  (`→` sent, `←` received) where they happened. `max_depth:` (default
  unlimited) folds deeper calls into one "… N more calls" line.
  """
  @spec format_tree(map() | nil, keyword()) :: String.t()
  def format_tree(tree, opts \\ [])
  def format_tree(nil, _opts), do: "(no such call)"

  def format_tree(tree, opts) do
    max = Keyword.get(opts, :max_depth, :infinity)
    tree |> tree_lines(0, max) |> Enum.join("\n")
  end

  @doc "Prints `format_tree/2`."
  @spec print_tree(map() | nil, keyword()) :: :ok
  def print_tree(tree, opts \\ []), do: IO.puts(format_tree(tree, opts))

  defp tree_lines(%{call: c, result: r, children: kids} = tree, depth, max) do
    # A callback on another node (a cluster call tree): its node first.
    pad = String.duplicate("  ", depth) <> on_node(tree)

    head =
      case r do
        nil -> "#{pad}#{mfa(c)}#{args(c)}  (no return traced)"
        %Entry{type: :return} -> "#{pad}#{mfa(c)}#{args(c)} → #{short(r.data)}#{dur(r)}"
        %Entry{type: :exception} -> "#{pad}#{mfa(c)}#{args(c)} !! #{exception(r.data)}#{dur(r)}"
      end

    if max != :infinity and depth + 1 > max and kids != [] do
      [head, "#{pad}  … #{count_calls(kids)} more calls"]
    else
      [head | Enum.flat_map(kids, &child_lines(&1, depth + 1, max))]
    end
  end

  defp count_calls(kids) do
    Enum.reduce(kids, 0, fn
      %{call: _, children: k}, acc -> acc + 1 + count_calls(k)
      _, acc -> acc
    end)
  end

  defp child_lines(%{call: _} = node, depth, max), do: tree_lines(node, depth, max)

  defp child_lines(%Entry{} = e, depth, _max) do
    pad = String.duplicate("  ", depth)

    line =
      case e.type do
        :send -> "#{pad}→ #{who(e.peer)} #{short(e.data)}"
        :receive -> "#{pad}← #{short(e.data)}"
        _ -> "#{pad}#{format_entry(e)}"
      end

    [line]
  end

  defp on_node(%{node: n}) when is_atom(n) and n != nil, do: "[#{n}] "
  defp on_node(_), do: ""

  # A pid (or port, or alias reference) of another node, node-qualified:
  # `name@host<0.123.0>`; local ones as `inspect/1` shows them.
  defp who(p) when is_pid(p) or is_port(p) or is_reference(p) do
    if node(p) == node() do
      inspect(p)
    else
      local = p |> inspect() |> String.replace(~r/<\d+\./, "<0.", global: false)
      "#{node(p)}#{local}"
    end
  end

  defp who(other), do: inspect(other)

  @doc "The first `n` rows of `Analysis.call_stat/1` as a table."
  @spec format_call_stat([map()], pos_integer()) :: String.t()
  def format_call_stat(stats, n \\ 20) do
    rows =
      for s <- Enum.take(stats, n) do
        [key(s.key), "#{s.count}", us(s.acc_ns), us(s.own_ns)]
      end

    table(["function", "calls", "acc µs", "own µs"], rows)
  end

  @doc "Prints `format_call_stat/2`."
  @spec print_call_stat([map()], pos_integer()) :: :ok
  def print_call_stat(stats, n \\ 20), do: IO.puts(format_call_stat(stats, n))

  @doc "Messages (from `Analysis.messages/1`), one per line."
  @spec format_messages([map()]) :: String.t()
  def format_messages(flows) do
    Enum.map_join(flows, "\n", fn m ->
      where = if m.in_call, do: " in #{key(m.in_call)}", else: ""
      got = if m.receive, do: "received", else: "not received (in the trace)"
      "#{who(m.from)} → #{who(m.to)}: #{short(m.message)}#{where}, #{got}"
    end)
  end

  @doc "Prints `format_messages/1`."
  @spec print_messages([map()]) :: :ok
  def print_messages(flows), do: IO.puts(format_messages(flows))

  @doc "Top repeated call trees (from `Analysis.top_call_trees/1`)."
  @spec format_top_call_trees([map()]) :: String.t()
  def format_top_call_trees(tops) do
    Enum.map_join(tops, "\n\n", fn t ->
      "#{t.count} × #{t.size} calls, #{us(t.total_ns)} µs in all:\n" <>
        format_tree(t.tree, max_depth: 2)
    end)
  end

  @doc """
  One state (`%State{}`) on one line: when, what set it (the callback and
  its triggering message, a snapshot or a state change) and the state.
  """
  @spec format_state(State.t()) :: String.t()
  def format_state(%State{} = st) do
    name = if st.name != nil, do: "#{short(st.name)} ", else: ""
    cut = if st.truncated, do: " (cut at the state cap)", else: ""

    "#{clock(st.wall_time)}  #{inspect(st.pid)}  #{origin(st)}\n    #{name}#{short(st.state)}#{cut}"
  end

  @doc "Prints `format_state/1`."
  @spec print_state(State.t() | {:ok, State.t()} | {:error, atom()}) :: :ok
  def print_state({:ok, st}), do: print_state(st)
  def print_state({:error, reason}), do: IO.puts("(no state: #{reason})")
  def print_state(%State{} = st), do: IO.puts(format_state(st))

  @doc """
  A state history (from `Analysis.state_history/2`) as a sequence of
  diffs: the first state whole, then for each later state its time since
  the first, what set it (the callback and its triggering message), and
  what changed (`Analysis.state_diff/3`: `+` added, `-` removed, `~`
  changed, `?` cut at the state cap). `max_changes:` (default 10) per
  state.
  """
  @spec format_state_history([State.t()] | {:error, atom()}, keyword()) :: String.t()
  def format_state_history(history, opts \\ [])
  def format_state_history({:error, reason}, _opts), do: "(no states: #{reason})"
  def format_state_history([], _opts), do: "(no states)"

  def format_state_history([first | _] = history, opts) do
    max = Keyword.get(opts, :max_changes, 10)
    who = if first.module, do: " (#{inspect(first.module)})", else: ""

    head = [
      "#{inspect(first.pid)}#{who}: #{length(history)} states from #{clock(first.wall_time)}",
      "  +0.000 ms  #{origin(first)}",
      "      #{state_text(first)}"
    ]

    rest =
      history
      |> Enum.chunk_every(2, 1, :discard)
      |> Enum.flat_map(fn [prev, st] ->
        changes = Analysis.state_diff(prev, st)
        at = ms(st.timestamp - first.timestamp)

        lines =
          case changes do
            [] -> ["      (unchanged)"]
            cs -> Enum.map(Enum.take(cs, max), &("      " <> format_change(&1))) ++ more(cs, max)
          end

        ["  +#{at} ms  #{origin(st)}" | lines]
      end)

    Enum.join(head ++ rest, "\n")
  end

  @doc "Prints `format_state_history/2`."
  @spec print_state_history([State.t()] | {:error, atom()}, keyword()) :: :ok
  def print_state_history(history, opts \\ []), do: IO.puts(format_state_history(history, opts))

  @doc "One difference of `Analysis.state_diff/3` on one line."
  @spec format_change(ElixirScope.Analysis.Diff.change()) :: String.t()
  def format_change({:added, path, v}), do: "+ #{path(path)} #{short(v)}"
  def format_change({:removed, path, v}), do: "- #{path(path)} #{short(v)}"
  def format_change({:changed, path, a, b}), do: "~ #{path(path)} #{short(a)} → #{short(b)}"
  def format_change({:cut, path}), do: "? #{path(path)} (cut at the state cap: unknown)"

  @doc "The differences of `Analysis.state_diff/3`, one per line."
  @spec format_diff([ElixirScope.Analysis.Diff.change()]) :: String.t()
  def format_diff([]), do: "(no differences)"
  def format_diff(changes), do: Enum.map_join(changes, "\n", &format_change/1)

  @doc "Prints `format_diff/1`."
  @spec print_diff([ElixirScope.Analysis.Diff.change()]) :: :ok
  def print_diff(changes), do: IO.puts(format_diff(changes))

  @doc """
  A causal chain (from `Analysis.why/2`), the event first and the root
  last, one step per line with its process: the state, the callback, the
  message received and sent, the calls.
  """
  @spec format_why([{atom(), Entry.t()}] | nil) :: String.t()
  def format_why(nil), do: "(unknown event)"

  def format_why(chain) do
    chain
    |> Enum.with_index()
    |> Enum.map_join("\n", fn {{role, e}, i} ->
      arrow = if i == 0, do: "   ", else: "←  "

      "#{arrow}#{String.pad_trailing(Atom.to_string(role), 14)} #{who(e.pid)}  #{why_text(role, e)}"
    end)
  end

  @doc "Prints `format_why/1`."
  @spec print_why([{atom(), Entry.t()}] | nil) :: :ok
  def print_why(chain), do: IO.puts(format_why(chain))

  defp why_text(role, %Entry{type: :return} = e) when role in [:state, :previous_state],
    do: "#{mf(e)} returned #{short(e.data)}"

  defp why_text(_role, e), do: format_entry(e)

  # What set a state.
  defp origin(%State{kind: :snapshot}), do: "snapshot"
  defp origin(%State{kind: :state_change}), do: "state change"

  defp origin(%State{callback: {m, f, a}} = st) do
    ret = if st.returned, do: " → #{st.returned}", else: ""
    reply = if st.reply != nil, do: " #{short(st.reply)}", else: ""
    stop = if st.stop != nil, do: " (stop: #{short(st.stop)})", else: ""
    "#{inspect(m)}.#{f}/#{a}#{trigger_text(st.trigger)}#{ret}#{reply}#{stop}"
  end

  defp trigger_text({:"$gen_call", {from, _}, req}),
    do: " call #{short(req)} from #{inspect(from)}"

  defp trigger_text({:"$gen_cast", req}), do: " cast #{short(req)}"
  defp trigger_text(nil), do: ""
  defp trigger_text(msg), do: " message #{short(msg)}"

  defp state_text(%State{} = st) do
    name = if st.name != nil, do: "#{short(st.name)} ", else: ""
    cut = if st.truncated, do: " (cut at the state cap)", else: ""
    "#{name}#{short(st.state)}#{cut}"
  end

  defp more(cs, max) when length(cs) > max, do: ["      … #{length(cs) - max} more changes"]
  defp more(_cs, _max), do: []

  defp path([]), do: "(whole)"

  defp path(steps) do
    Enum.map_join(steps, "", fn
      {:at, i} -> "[#{i}]"
      {:elem, i} -> "{#{i}}"
      k when is_atom(k) -> ".#{k}"
      k -> "[#{inspect(k)}]"
    end)
  end

  defp ms(ns), do: :erlang.float_to_binary(ns / 1_000_000, decimals: 3)

  # Wall-clock ns as HH:MM:SS.micro (UTC).
  defp clock(ns) when is_integer(ns) and ns > 0 do
    case DateTime.from_unix(div(ns, 1000), :microsecond) do
      {:ok, dt} -> dt |> DateTime.to_time() |> Time.to_string()
      _ -> "?"
    end
  end

  defp clock(_), do: "?"

  # ---- helpers ------------------------------------------------------------------

  defp mf(%Entry{module: m, function: f}), do: "#{inspect(m)}.#{f}"
  defp mfa(%Entry{arity: a} = e), do: "#{mf(e)}/#{a}"

  defp args(%Entry{data: nil}), do: ""

  defp args(%Entry{data: list}) when is_list(list),
    do: "(" <> Enum.map_join(list, ", ", &short/1) <> ")"

  defp args(_), do: ""

  defp dur(%Entry{duration_ns: d}) when is_integer(d) and d > 0, do: "  [#{us(d)} µs]"
  defp dur(_), do: ""

  defp exception({class, reason}), do: "#{class} #{short(reason)}"
  defp exception(other), do: short(other)

  defp key({m, f, a}) when is_atom(m) and is_atom(f), do: "#{inspect(m)}.#{f}/#{a}"
  defp key({pid, {m, f, a}}), do: "#{inspect(pid)} #{key({m, f, a})}"
  defp key(other), do: inspect(other)

  # nil: not measured (a stats session keeps no inclusive time).
  defp us(nil), do: "–"
  defp us(ns), do: :erlang.float_to_binary(ns / 1000, decimals: 1)

  defp short(term), do: inspect(term, limit: 8, printable_limit: 60, width: :infinity)

  defp table(header, rows) do
    widths =
      Enum.reduce([header | rows], List.duplicate(0, length(header)), fn row, ws ->
        Enum.zip_with(row, ws, &max(String.length(&1), &2))
      end)

    line = fn row ->
      row
      |> Enum.zip(widths)
      |> Enum.with_index()
      |> Enum.map_join("  ", fn
        {{cell, w}, 0} -> String.pad_trailing(cell, w)
        {{cell, w}, _} -> String.pad_leading(cell, w)
      end)
    end

    Enum.map_join([header | rows], "\n", line)
  end
end

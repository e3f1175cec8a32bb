defmodule ElixirScope.Analysis.Format do
  @moduledoc """
  Pretty-printers for `ElixirScope.Analysis` results, for IEx. Each
  `print_*` function writes to standard output and returns `:ok`; the
  `format_*` functions return the text.
  """

  alias ElixirScope.Analysis.Entry

  @doc "One event on one line."
  @spec format_entry(Entry.t()) :: String.t()
  def format_entry(%Entry{} = e) do
    case e.type do
      :call -> "#{mfa(e)}#{args(e)}"
      :return -> "#{mf(e)} returned #{short(e.data)}#{dur(e)}"
      :exception -> "#{mf(e)} raised #{exception(e.data)}#{dur(e)}"
      :send -> "#{inspect(e.pid)} → #{inspect(e.peer)}: #{short(e.data)}"
      :receive -> "#{inspect(e.pid)} ← #{short(e.data)}"
      :spawn -> "#{inspect(e.peer)} spawned #{inspect(e.pid)}"
      :exit -> "#{inspect(e.pid)} exited: #{short(e.data)}"
      t when t in [:link, :unlink] -> "#{inspect(e.pid)} #{t} #{inspect(e.peer)}"
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
      "#{String.pad_leading("#{i}", 3)}  #{mfa(c)}#{args(c)}  #{inspect(c.pid)}"
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

  defp tree_lines(%{call: c, result: r, children: kids}, depth, max) do
    pad = String.duplicate("  ", depth)

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
        :send -> "#{pad}→ #{inspect(e.peer)} #{short(e.data)}"
        :receive -> "#{pad}← #{short(e.data)}"
        _ -> "#{pad}#{format_entry(e)}"
      end

    [line]
  end

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
      "#{inspect(m.from)} → #{inspect(m.to)}: #{short(m.message)}#{where}, #{got}"
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

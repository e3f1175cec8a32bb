defmodule ElixirScope.Analysis.Diff do
  @moduledoc """
  Structural differences between two terms (`ElixirScope.Analysis.state_diff/3`).

  A difference is one of

    * `{:added, path, value}` — in the new term only
    * `{:removed, path, value}` — in the old term only
    * `{:changed, path, old, new}`
    * `{:cut, path}` — unknown: one side was cut at the state cap there
      (a `{:truncated, at_least_bytes, kind}` marker of a truncated state)

  `path` is the list of steps from the top: a map or keyword key, `{:at,
  index}` into a list, `{:elem, index}` into a tuple (`[]` is the whole
  term). Maps and structs of the same module are compared key by key,
  keyword lists (unique atom keys on both sides) key by key, tuples of the
  same size element by element, and lists by their common prefix and
  suffix, then element by element over the rest when both rests have the
  same length (else as removed and added elements). Anything else differs
  as a whole.
  """

  @type path :: [term()]
  @type change ::
          {:added, path(), term()}
          | {:removed, path(), term()}
          | {:changed, path(), term(), term()}
          | {:cut, path()}

  @marker_kinds [:binary, :list, :map, :tuple, :term, :depth]

  @doc """
  The differences from `old` to `new`, in path order. `cut: true` treats
  truncation markers as unknown values (`{:cut, path}`) rather than as
  values.
  """
  @spec diff(term(), term(), keyword()) :: [change()]
  def diff(old, new, opts \\ []) do
    cut? = Keyword.get(opts, :cut, false)
    old |> walk(new, [], cut?, []) |> Enum.reverse()
  end

  defp walk(a, b, path, cut, acc) do
    cond do
      # Two markers may hide different values: unknown, even when equal.
      cut and (marker?(a) or marker?(b)) -> [{:cut, Enum.reverse(path)} | acc]
      a === b -> acc
      true -> node(a, b, path, cut, acc)
    end
  end

  defp node(%s{} = a, %s{} = b, path, cut, acc),
    do: walk_map(Map.from_struct(a), Map.from_struct(b), path, cut, acc)

  defp node(%{__struct__: _} = a, b, path, _cut, acc), do: changed(a, b, path, acc)
  defp node(a, %{__struct__: _} = b, path, _cut, acc), do: changed(a, b, path, acc)

  defp node(a, b, path, cut, acc) when is_map(a) and is_map(b), do: walk_map(a, b, path, cut, acc)

  defp node(a, b, path, cut, acc) when is_list(a) and is_list(b) do
    if keyword?(a) and keyword?(b),
      do: walk_map(Map.new(a), Map.new(b), path, cut, acc),
      else: walk_list(a, b, path, cut, acc)
  end

  defp node(a, b, path, cut, acc)
       when is_tuple(a) and is_tuple(b) and tuple_size(a) == tuple_size(b) do
    Enum.reduce(0..(tuple_size(a) - 1)//1, acc, fn i, acc ->
      walk(elem(a, i), elem(b, i), [{:elem, i} | path], cut, acc)
    end)
  end

  defp node(a, b, path, _cut, acc), do: changed(a, b, path, acc)

  defp changed(a, b, path, acc), do: [{:changed, Enum.reverse(path), a, b} | acc]

  defp walk_map(a, b, path, cut, acc) do
    keys = (Map.keys(a) ++ Map.keys(b)) |> Enum.uniq() |> Enum.sort()

    Enum.reduce(keys, acc, fn k, acc ->
      case {Map.fetch(a, k), Map.fetch(b, k)} do
        {{:ok, x}, {:ok, y}} -> walk(x, y, [k | path], cut, acc)
        {{:ok, x}, :error} -> [{:removed, Enum.reverse([k | path]), x} | acc]
        {:error, {:ok, y}} -> [{:added, Enum.reverse([k | path]), y} | acc]
      end
    end)
  end

  # Lists: proper ones by common prefix and suffix, then the rest.
  defp walk_list(a, b, path, cut, acc) do
    if proper?(a) and proper?(b) do
      {prefix, ra, rb} = common_prefix(a, b, 0)
      {ma, mb} = drop_common_suffix(ra, rb)

      if length(ma) == length(mb) do
        ma
        |> Enum.zip(mb)
        |> Enum.with_index(prefix)
        |> Enum.reduce(acc, fn {{x, y}, i}, acc -> walk(x, y, [{:at, i} | path], cut, acc) end)
      else
        acc =
          ma
          |> Enum.with_index(prefix)
          |> Enum.reduce(acc, fn {x, i}, acc ->
            [{:removed, Enum.reverse([{:at, i} | path]), x} | acc]
          end)

        mb
        |> Enum.with_index(prefix)
        |> Enum.reduce(acc, fn {y, i}, acc ->
          [{:added, Enum.reverse([{:at, i} | path]), y} | acc]
        end)
      end
    else
      changed(a, b, path, acc)
    end
  end

  defp common_prefix([x | a], [x | b], n), do: common_prefix(a, b, n + 1)
  defp common_prefix(a, b, n), do: {n, a, b}

  defp drop_common_suffix(a, b) do
    {_, ra, rb} = common_prefix(Enum.reverse(a), Enum.reverse(b), 0)
    {Enum.reverse(ra), Enum.reverse(rb)}
  end

  defp proper?([]), do: true
  defp proper?([_ | t]), do: proper?(t)
  defp proper?(_), do: false

  defp keyword?([]), do: false

  defp keyword?(l) do
    proper?(l) and Enum.all?(l, &match?({k, _} when is_atom(k), &1)) and
      length(Enum.uniq_by(l, &elem(&1, 0))) == length(l)
  end

  @doc "Is `t` a truncation marker `{:truncated, at_least_bytes, kind}`?"
  @spec marker?(term()) :: boolean()
  def marker?({:truncated, n, kind}) when is_integer(n) and kind in @marker_kinds, do: true
  def marker?(_), do: false
end

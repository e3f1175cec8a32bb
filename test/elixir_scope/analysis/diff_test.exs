defmodule ElixirScope.Analysis.DiffTest do
  use ExUnit.Case, async: true

  alias ElixirScope.Analysis.Diff

  test "equal terms have no differences" do
    for t <- [1, "a", [], %{a: [1, {2}]}, %URI{host: "h"}, {1, [2 | 3]}] do
      assert Diff.diff(t, t) == []
    end
  end

  test "maps and structs key by key, with nested paths" do
    assert Diff.diff(%{a: %{b: 1, c: 2}}, %{a: %{b: 1, c: 3, d: 4}}) == [
             {:changed, [:a, :c], 2, 3},
             {:added, [:a, :d], 4}
           ]

    assert Diff.diff(%URI{host: "a"}, %URI{host: "b"}) == [{:changed, [:host], "a", "b"}]
    # Structs of different modules, or a struct and a map, differ whole.
    assert [{:changed, [], %URI{}, %{}}] = Diff.diff(%URI{}, %{})

    assert [{:changed, [], %URI{}, %Version{}}] =
             Diff.diff(%URI{}, %Version{major: 1, minor: 0, patch: 0})
  end

  test "keyword lists by key, other lists by common prefix and suffix" do
    assert Diff.diff([a: 1, b: 2], b: 3, a: 1) == [{:changed, [:b], 2, 3}]
    # Duplicate keys: a plain list.
    assert Diff.diff([a: 1, a: 2], a: 1, a: 3) == [{:changed, [{:at, 1}, {:elem, 1}], 2, 3}]
    # Prepending to a log is one addition, not a change of every element.
    assert Diff.diff([2, 1], [3, 2, 1]) == [{:added, [{:at, 0}], 3}]
    assert Diff.diff([1, 2, 3], [1, 3]) == [{:removed, [{:at, 1}], 2}]
    assert Diff.diff([1, 2, 3], [1, 9, 3]) == [{:changed, [{:at, 1}], 2, 9}]
    # Improper lists differ whole.
    assert Diff.diff([1 | 2], [1 | 3]) == [{:changed, [], [1 | 2], [1 | 3]}]
  end

  test "tuples element by element when of the same size" do
    assert Diff.diff({:ok, 1}, {:ok, 2}) == [{:changed, [{:elem, 1}], 1, 2}]
    assert Diff.diff({1}, {1, 2}) == [{:changed, [], {1}, {1, 2}}]
  end

  test "truncation markers are unknown with cut: true, values otherwise" do
    a = %{big: {:truncated, 100, :binary}, n: 1}
    b = %{big: {:truncated, 100, :binary}, n: 2}
    assert Diff.diff(a, b, cut: true) == [{:cut, [:big]}, {:changed, [:n], 1, 2}]
    assert Diff.diff(a, b) == [{:changed, [:n], 1, 2}]
    assert Diff.diff(%{big: "x"}, a, cut: true) == [{:cut, [:big]}, {:added, [:n], 1}]
    assert Diff.marker?({:truncated, 1, :map})
    refute Diff.marker?({:truncated, 1, :other})
  end
end

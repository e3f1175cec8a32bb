defmodule ElixirScope.CaseTest do
  use ElixirScope.Case, async: true

  test "imports the ExUnit helpers and passes options to ExUnit.Case" do
    assert function_exported?(ElixirScope.ExUnit, :trace_block, 3)
    {3, trace} = trace_block(ElixirScope.CaseTest, fn -> add(1, 2) end)
    assert_called(trace, {ElixirScope.CaseTest, :add, [1, 2]}, times: 1)
    assert ExUnit.configuration() |> is_list()
  end

  def add(a, b), do: a + b
end

defmodule ElixirScope.Case do
  @moduledoc """
  An ExUnit case template with `ElixirScope.ExUnit` imported:

      defmodule MyApp.BankTest do
        use ElixirScope.Case, async: true

        test "..." do
          {_result, trace} = trace_block(MyApp.Bank, fn -> ... end)
          assert_called(trace, {MyApp.Bank, :deposit, 2})
        end
      end

  Options go to `ExUnit.Case` (`async: true` is safe: every
  `trace_block/3` records into a store of its own).
  """
  use ExUnit.CaseTemplate

  using do
    quote do
      import ElixirScope.ExUnit
    end
  end
end

defmodule ElixirScope.Args do
  @moduledoc false
  # Argument checks shared by the public modules.

  @doc "Raises `ArgumentError` unless `list` is a proper list (O(length))."
  @spec proper_list!(list(), String.t()) :: :ok
  def proper_list!(list, what) do
    _ = length(list)
    :ok
  rescue
    ArgumentError -> raise ArgumentError, "#{what} must be a proper list"
  end
end

defmodule ElixirScope.Args do
  @moduledoc false
  # Argument checks shared by the public modules.

  @doc """
  `opts` (a keyword list) completed with `defaults`, or `ArgumentError`:
  "<what> options must be a keyword list, got: ..." or "unknown <what>
  option(s) [...]; known: [...]".
  """
  @spec keyword_opts!(term(), keyword(), String.t()) :: keyword()
  def keyword_opts!(opts, defaults, what) do
    unless is_list(opts) and Keyword.keyword?(opts) do
      raise ArgumentError,
            "#{what} options must be a keyword list, got: #{inspect(opts, limit: 5)}"
    end

    case Keyword.validate(opts, defaults) do
      {:ok, opts} ->
        opts

      {:error, unknown} ->
        raise ArgumentError,
              "unknown #{what} option(s) #{inspect(unknown)}; " <>
                "known: #{inspect(Keyword.keys(defaults))}"
    end
  end

  @doc "Raises `ArgumentError` unless `list` is a proper list (O(length))."
  @spec proper_list!(list(), String.t()) :: :ok
  def proper_list!(list, what) do
    _ = length(list)
    :ok
  rescue
    ArgumentError -> raise ArgumentError, "#{what} must be a proper list"
  end
end

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

  @doc "`path` as a string (a non-empty string or charlist), or `ArgumentError` naming `what`."
  @spec path!(term(), String.t()) :: String.t()
  def path!(path, _what) when is_binary(path) and path != "", do: path
  def path!(path, what) when is_list(path) and path != [], do: path!(List.to_string(path), what)

  def path!(path, what),
    do: raise(ArgumentError, "#{what} must be a non-empty path string, got: #{inspect(path)}")

  @doc "`v` if it is an integer in `range`, else `ArgumentError` naming `key`."
  @spec int!(term(), Range.t(), atom()) :: integer()
  def int!(v, range, key) do
    unless is_integer(v) and v in range do
      raise ArgumentError, "#{key} must be an integer in #{inspect(range)}, got: #{inspect(v)}"
    end

    v
  end
end

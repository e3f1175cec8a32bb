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

  @doc """
  Where to call the `module` server named by `server` (a pid, a registered
  name, `{:global, term}`, `{:via, mod, term}` or `{name, node}`): its pid,
  or `nil` when no process runs under that name (or the pid is dead).
  A local process of another kind raises `ArgumentError` (calling it would
  hang or crash the caller), and so does a term that names no server.
  Remote servers are returned as given.
  """
  @spec server(term(), module()) :: pid() | {atom(), node()} | nil
  def server(server, module) do
    pid =
      case server do
        pid when is_pid(pid) ->
          pid

        name when is_atom(name) and name != nil ->
          Process.whereis(name)

        {:global, _} ->
          GenServer.whereis(server)

        {:via, mod, _} when is_atom(mod) ->
          via(server, module)

        {name, node} when is_atom(name) and node == node() ->
          Process.whereis(name)

        {name, node} when is_atom(name) and is_atom(node) ->
          remote(server, module)

        other ->
          raise ArgumentError,
                "expected a #{inspect(module)} pid or name, got: #{inspect(other, limit: 5)}"
      end

    cond do
      pid == :remote -> server
      pid == nil -> nil
      node(pid) != node() -> pid
      true -> local(pid, module)
    end
  end

  defp via({:via, mod, _} = server, module) do
    GenServer.whereis(server)
  rescue
    UndefinedFunctionError ->
      reraise ArgumentError,
              "#{inspect(mod)} is not a registry, in #{inspect(module)} server #{inspect(server)}",
              __STACKTRACE__
  end

  defp remote({_name, node} = server, module) do
    if node in Node.list(),
      do: :remote,
      else:
        raise(
          ArgumentError,
          "node #{inspect(node)} of #{inspect(module)} server #{inspect(server)} is not connected"
        )
  end

  defp local(pid, module) do
    case Process.info(pid, :dictionary) do
      nil ->
        nil

      {:dictionary, dict} ->
        case List.keyfind(dict, :"$initial_call", 0) do
          {_, {^module, :init, 1}} ->
            pid

          _ ->
            raise ArgumentError,
                  "#{inspect(pid)} is not a #{inspect(module)} process"
        end
    end
  end

  @doc """
  The local pid of `server` (a pid, a registered name, `{:global, _}` or
  `{:via, _, _}`) if it is a running process started by `module`'s
  `init/1` (a `GenServer` of that module), else `ArgumentError`.
  """
  @spec server!(term(), module()) :: pid()
  def server!(server, module) do
    pid = whereis(server)

    unless is_pid(pid) and node(pid) == node() and started_by?(pid, module) do
      raise ArgumentError,
            "expected a running #{inspect(module)} (a pid or a name), got: " <>
              inspect(server, limit: 5)
    end

    pid
  end

  @doc """
  `GenServer.call/3` (infinite timeout) to `server!(server, module)`; a
  server that stops before it replies raises `ArgumentError` too.
  """
  @spec call_server!(term(), module(), term()) :: term()
  def call_server!(server, module, msg) do
    GenServer.call(server!(server, module), msg, :infinity)
  catch
    :exit, {reason, _} when reason in [:noproc, :normal, :shutdown] ->
      raise ArgumentError, "#{inspect(module)} #{inspect(server, limit: 5)} is not running"

    :exit, {{:shutdown, _}, _} ->
      raise ArgumentError, "#{inspect(module)} #{inspect(server, limit: 5)} is not running"
  end

  defp whereis(pid) when is_pid(pid), do: pid
  defp whereis(name) when is_atom(name), do: Process.whereis(name)
  defp whereis({:global, _} = name), do: GenServer.whereis(name)
  defp whereis({:via, mod, _} = name) when is_atom(mod), do: GenServer.whereis(name)
  defp whereis(_other), do: nil

  defp started_by?(pid, module) do
    case Process.info(pid, :dictionary) do
      {:dictionary, d} -> Keyword.get(d, :"$initial_call") == {module, :init, 1}
      nil -> false
    end
  end
end

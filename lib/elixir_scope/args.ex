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

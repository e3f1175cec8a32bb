defmodule ElixirScope.Cluster.Remote do
  @moduledoc false
  # What a cluster trace runs on each of its nodes, over `:erpc` (the
  # coordinator's node included). Everything returned crosses distribution,
  # so native handles (the store) stay behind: a node's store is only read
  # on its node.

  alias ElixirScope.Tracer

  # The library is here and works: the application runs and the NIF loaded.
  def check do
    with {:ok, _} <- Application.ensure_all_started(:elixir_scope),
         {:module, _} <- Code.ensure_loaded(ElixirScope.Native),
         true <- function_exported?(ElixirScope.Native, :tracer_new, 11) do
      {:ok, %{otp: :erlang.system_info(:otp_release), schedulers: System.schedulers_online()}}
    else
      {:error, {:elixir_scope, reason}} -> {:error, {:app_not_started, reason}}
      {:error, reason} -> {:error, {:nif_not_loaded, reason}}
      false -> {:error, {:nif_not_loaded, :no_tracer}}
    end
  end

  def start(targets, opts, owner) do
    case Tracer.trace_local(targets, Keyword.put(opts, :owner, owner)) do
      {:ok, info} -> {:ok, clean(info)}
      other -> other
    end
  end

  # Stops this node's part (or, stopped already by a limit or because the
  # coordinator went away, reports it).
  def stop do
    case Tracer.stop_trace() do
      {:ok, summary} ->
        {:ok, clean(summary)}

      {:error, :not_tracing} ->
        case Tracer.status() do
          %{state: :stopped} = status -> {:ok, clean(status)}
          _ -> {:error, :not_tracing}
        end
    end
  end

  def status, do: clean(Tracer.status())

  defp clean(map), do: Map.drop(map, [:store, :options])
end

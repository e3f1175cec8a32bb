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

  # The start of this node's part did not answer in time: stop it once it
  # is done, if it is this coordinator's (the tracer handles one request at
  # a time, so this waits for the start).
  def stop_owned(owner), do: Tracer.stop_owned(owner)

  def status, do: clean(Tracer.status())

  # ---- queries (ElixirScope.Analysis with nodes:) ----------------------------------

  alias ElixirScope.Analysis
  alias ElixirScope.Analysis.Entry
  alias ElixirScope.Storage.QueryCoordinator

  @analysis [
    :select,
    :filter,
    :get,
    :traceback,
    :range,
    :replay,
    :next,
    :prev,
    :call_stat,
    :top_call_trees,
    :state_at,
    :state_history,
    :state_processes,
    :messages,
    :call_tree,
    :why
  ]

  # `{:ok, value}` of a query on this node's last trace's store, or
  # `{:error, :no_trace}`.
  def query(f, args) do
    case ElixirScope.trace_store() do
      nil -> {:error, :no_trace}
      store -> {:ok, run(f, args, store)}
    end
  end

  # A select the query planner answers (its indexes, the limit honoured
  # natively): the same events, in store order.
  defp run(:select, [opts], store) do
    if planned?(opts) do
      spec = Keyword.take(opts, [:pid, :module, :function, :types, :from, :to])
      limit = Keyword.get(opts, :limit, 100_000)
      {:ok, %{events: events}} = QueryCoordinator.query(store, spec ++ [limit: limit, as: :entry])
      events
    else
      Analysis.select(Keyword.put(opts, :store, store))
    end
  end

  defp run(f, args, store) when f in @analysis do
    {opts, rest} = List.pop_at(args, -1)
    apply(Analysis, f, rest ++ [Keyword.put(opts, :store, store)])
  end

  # The events next to a time: after it (`from:`), or before it (`to:`,
  # found in growing windows, as `Analysis.prev/2` with `scope: :global`).
  defp run(:neighbours, [[from: t], true], store),
    do: Analysis.select(from: t, limit: 16, store: store)

  defp run(:neighbours, [[to: t], false], store), do: before(t, 1_000_000, store)

  # Receives on this node that no send of this node explains.
  defp run(:unexplained_receives, [limit], store) do
    run(:select, [[types: [:receive], limit: limit]], store)
    |> Enum.filter(&(&1.link_id == nil))
  end

  # Unexplained receives of this message.
  defp run(:receives_like, [data, limit], store) do
    Analysis.filter(&(&1.link_id == nil and &1.data == data),
      types: [:receive],
      limit: limit,
      store: store
    )
  end

  # Sends of this message to a process on node `dest`.
  defp run(:sends_like, [data, dest, limit], store) do
    Analysis.filter(&(&1.data == data and dest_node(&1.peer) == dest),
      types: [:send],
      limit: limit,
      store: store
    )
  end

  # The call tree of the OTP callback a receive triggered (nil if none).
  defp run(:callback_tree, [recv_id], store) do
    with %Entry{pid: pid, timestamp: t} <- Analysis.get(recv_id, store: store),
         %Entry{id: id} <-
           Analysis.select(pid: pid, from: t, types: [:call], limit: 64, store: store)
           |> Enum.find(&(&1.link_id == recv_id)) do
      Analysis.call_tree(id, store: store)
    else
      _ -> nil
    end
  end

  defp before(t, window, store) when window > 1_000_000_000_000_000 do
    Analysis.select(to: t, limit: 100_000, store: store) |> Enum.take(-16)
  end

  defp before(t, window, store) do
    hits = Analysis.select(from: t - window, to: t, limit: 100_000, store: store)
    if length(hits) >= 16, do: Enum.take(hits, -16), else: before(t, window * 16, store)
  end

  @planned_types [:call, :return, :exception, :send, :receive, :spawn, :exit, :link, :unlink] ++
                   [:state_change]

  defp planned?(opts) do
    Enum.all?(opts, fn
      {:pid, p} ->
        p == nil or is_pid(p)

      {k, v} when k in [:module, :function] ->
        v == nil or is_atom(v)

      {k, v} when k in [:from, :to] ->
        v == nil or is_integer(v)

      {:limit, l} ->
        is_integer(l) and l > 0

      {:types, t} ->
        t == nil or (is_list(t) and t != [] and Enum.all?(t, &(&1 in @planned_types)))

      _ ->
        false
    end)
  end

  defp dest_node(p) when is_pid(p) or is_reference(p) or is_port(p), do: node(p)
  defp dest_node({name, n}) when is_atom(name) and is_atom(n), do: n
  defp dest_node(_), do: nil

  defp clean(map), do: Map.drop(map, [:store, :options])
end

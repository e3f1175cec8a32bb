defmodule ElixirScope.EventStore do
  @moduledoc """
  The node's shared event store with the original's three-argument API
  (`store_event(component, event_type, data)`), drop-in for the original
  `ElixirScope.EventStore`: one `ElixirScope.Storage.EventStore` process
  registered as `ElixirScope.EventStore`, started on first use.

      :ok = ElixirScope.EventStore.store_event(:file_watcher, :changes_processed, %{files: 3})
      {:ok, [event]} = ElixirScope.EventStore.query_events(event_type: :changes_processed)
      event.component #=> :file_watcher

  Stored events are maps `%{component, event_type, timestamp, wall_time,
  pid, data}`: `timestamp` is `System.monotonic_time(:nanosecond)` (so
  time-range filters work) and `wall_time` the `DateTime` the original
  put in `timestamp` (documented difference: a `DateTime` cannot be
  range-queried).

  The store is started under `ElixirScope.Supervisor` when the
  application runs, unlinked otherwise (the original linked it to
  whichever process called first, so it died with that process). Its
  bound comes from `config :elixir_scope, :event_store, max_events: n`
  (default 1,000,000).
  """

  alias ElixirScope.Storage.EventStore, as: Store

  @doc """
  Stores an event from `component` (an atom) of `event_type` (an atom)
  with `data` (any term): `:ok` or `{:error, reason}` (see
  `ElixirScope.Storage.EventStore.store_event/2`). Other arguments raise
  `ArgumentError`.
  """
  @spec store_event(atom(), atom(), term()) :: :ok | {:error, term()}
  def store_event(component, event_type, data)
      when is_atom(component) and is_atom(event_type) do
    {:ok, store} = get_or_create_event_store()

    Store.store_event(store, %{
      component: component,
      event_type: event_type,
      timestamp: System.monotonic_time(:nanosecond),
      wall_time: DateTime.utc_now(),
      pid: self(),
      data: data
    })
  end

  def store_event(component, event_type, _data) do
    bad = if is_atom(component), do: {"event_type", event_type}, else: {"component", component}
    raise ArgumentError, "#{elem(bad, 0)} must be an atom, got: #{inspect(elem(bad, 1))}"
  end

  @doc "The shared store's pid, starting it if needed: `{:ok, pid}` or `{:error, reason}`."
  @spec get_or_create_event_store() :: {:ok, pid()} | {:error, term()}
  def get_or_create_event_store do
    case Process.whereis(__MODULE__) do
      pid when is_pid(pid) -> {:ok, pid}
      nil -> start()
    end
  end

  defp start do
    opts = Keyword.put(config(), :name, __MODULE__)

    result =
      if Process.whereis(ElixirScope.Supervisor) do
        Supervisor.start_child(ElixirScope.Supervisor, %{
          id: __MODULE__,
          start: {Store, :start_link, [opts]}
        })
      else
        Store.start(opts)
      end

    case result do
      {:ok, pid} -> {:ok, pid}
      {:error, {:already_started, pid}} -> {:ok, pid}
      # A child stopped earlier: restart it.
      {:error, :already_present} -> restart()
      {:error, reason} -> {:error, reason}
    end
  end

  defp restart do
    case Supervisor.restart_child(ElixirScope.Supervisor, __MODULE__) do
      {:ok, pid} -> {:ok, pid}
      {:error, {:already_started, pid}} -> {:ok, pid}
      {:error, :running} -> get_or_create_event_store()
      {:error, reason} -> {:error, reason}
    end
  end

  defp config do
    case Application.get_env(:elixir_scope, :event_store, []) do
      opts when is_list(opts) ->
        Keyword.take(opts, [:max_events])

      other ->
        raise ArgumentError,
              "config :elixir_scope, :event_store must be a keyword list, got: #{inspect(other)}"
    end
  end

  @doc "`ElixirScope.Storage.EventStore.query_events/2` on the shared store."
  @spec query_events(keyword() | map()) :: {:ok, [map()]} | {:error, term()}
  def query_events(filters) do
    with {:ok, store} <- get_or_create_event_store(), do: Store.query_events(store, filters)
  end

  @doc "`ElixirScope.Storage.EventStore.get_index_stats/1` of the shared store."
  @spec get_stats() :: map() | {:error, term()}
  def get_stats do
    with {:ok, store} <- get_or_create_event_store(), do: Store.get_index_stats(store)
  end
end

defmodule ElixirScope.Query.Engine do
  @moduledoc """
  Query analysis and execution over an `ElixirScope.Storage.EventStore`,
  drop-in for the original `ElixirScope.Query.Engine`, backed by the
  native query planner (`ElixirScope.Storage.QueryCoordinator.query/2`).

      Engine.analyze_query(pid: pid, event_type: :function_entry)
      #=> %Engine{index_type: :process, estimated_cost: 30, post_filters: [:event_type, :temporal], ...}

      {:ok, events, metrics} = Engine.execute_query_with_metrics(store, pid: pid, limit: 10)
      metrics.index_used #=> :process

  Queries are `ElixirScope.Storage.EventStore.query_events/2` filters
  (keyword lists or maps).

  ## Two analyses

    * `analyze_query/1` sees only the query, as the original did: the first
      of `:pid` (`:process`), `:event_type`, `:ast_node_id` (`:ast_node`),
      a time bound (`:temporal`), else `:full_scan`, with the original's
      cost units (25, 50, 40, 75, 150, times 1.0–2.0 for the number of
      filters).
    * `analyze_query/2` asks the store's planner, which estimates each
      usable index on the events actually stored and walks the smallest:
      `index_type` is the index it will walk (`:process`, `:event_type`,
      `:ast_node`, `:temporal`, `:function`, `:correlation` or
      `:full_scan`) and `estimated_cost` the number of stored events it
      expects to visit. `estimate_query_cost/2` and
      `execute_query_with_metrics/2` use it.

  ## Differences from the original

    * `estimate_query_cost/2` returns the planner's estimate of the events
      visited (the original scaled its fixed cost units by the store size);
      for a store that is not running it falls back to `analyze_query/1`'s
      units, as the original did.
    * `execute_query_with_metrics/2`'s `index_used` is the index the
      planner chose and `events_scanned` its estimate of the events it
      visited (the original derived both from fixed multipliers).
    * A limit that is not a non-negative integer is `{:error,
      :invalid_limit}` (the original rejected only `-1` and ignored the
      rest).
  """

  alias ElixirScope.Storage.{EventStore, QueryCoordinator}

  @typedoc "A query analysis."
  @type t :: %__MODULE__{
          index_type: atom(),
          estimated_cost: non_neg_integer(),
          post_filters: [atom()],
          optimization_suggestions: [String.t()] | nil
        }

  defstruct [:index_type, :estimated_cost, :post_filters, :optimization_suggestions]

  @base_cost %{process: 25, ast_node: 40, event_type: 50, temporal: 75, full_scan: 150}
  @plan_index %{
    pid: :process,
    event_type: :event_type,
    ast_node: :ast_node,
    time: :temporal,
    scan: :full_scan,
    function: :function,
    correlation: :correlation,
    linked_to: :linked_to
  }

  @doc """
  The original's static analysis of `query` (see "Two analyses"), with
  `optimization_suggestions` filled in (`get_optimization_suggestions/2`).
  """
  @spec analyze_query(keyword() | map()) :: t()
  def analyze_query(query) do
    q = to_list!(query)
    index = static_index(q)

    %__MODULE__{
      index_type: index,
      estimated_cost: round(@base_cost[index] * complexity(q)),
      post_filters: post_filters(index, q),
      optimization_suggestions: suggestions(index, q)
    }
  end

  @doc """
  The planner's analysis of `query` on `store` (addition; see "Two
  analyses"). Bad queries raise `ArgumentError`.
  """
  @spec analyze_query(GenServer.server(), keyword() | map()) :: t()
  def analyze_query(store, query) do
    q = to_list!(query)
    {index, estimate} = plan(store, q)

    %__MODULE__{
      index_type: index,
      estimated_cost: estimate,
      post_filters: post_filters(index, q),
      optimization_suggestions: suggestions(index, q)
    }
  end

  @doc """
  The planner's estimate of the stored events `query` visits on `store`;
  for a store that is not running, `analyze_query/1`'s cost.
  """
  @spec estimate_query_cost(GenServer.server(), keyword() | map()) :: non_neg_integer()
  def estimate_query_cost(store, query) do
    q = to_list!(query)

    try do
      store |> plan(q) |> elem(1)
    rescue
      ArgumentError -> analyze_query(q).estimated_cost
    end
  end

  @doc """
  Runs `query` on `store`: `{:ok, events}`, `{:error, :invalid_pid |
  :invalid_limit | :invalid_timestamp | :invalid_query}` or
  `{:error, :store_unavailable}` (not a running store).
  """
  @spec execute_query(GenServer.server(), keyword() | map()) :: {:ok, [term()]} | {:error, atom()}
  def execute_query(store, query) do
    with {:ok, q} <- validate(query), {:ok, _} <- alive(store) do
      try do
        EventStore.query_events(store, q)
      rescue
        ArgumentError ->
          if alive?(store), do: {:error, :invalid_query}, else: {:error, :store_unavailable}
      end
    end
  end

  @doc """
  `execute_query/2` with metrics: `{:ok, events, metrics}` where metrics
  has `execution_time_us` (measured, planning included), `index_used`,
  `events_scanned` (the planner's estimate), `events_returned`,
  `filter_efficiency` (returned / scanned, 1.0 when nothing is scanned)
  and, when that is below 0.5, `optimization_suggestions`.
  """
  @spec execute_query_with_metrics(GenServer.server(), keyword() | map()) ::
          {:ok, [term()], map()} | {:error, atom()}
  def execute_query_with_metrics(store, query) do
    t0 = System.monotonic_time(:microsecond)

    with {:ok, q} <- validate(query),
         {:ok, _} <- alive(store),
         {:ok, {index, estimate}} <- safe_plan(store, q),
         {:ok, results} <- execute_query(store, q) do
      us = System.monotonic_time(:microsecond) - t0
      returned = length(results)
      efficiency = if estimate > 0, do: min(returned / estimate, 1.0), else: 1.0

      metrics = %{
        execution_time_us: us,
        index_used: index,
        events_scanned: estimate,
        events_returned: returned,
        filter_efficiency: efficiency
      }

      metrics =
        if efficiency < 0.5,
          do: Map.put(metrics, :optimization_suggestions, suggestions(index, q)),
          else: metrics

      {:ok, results, metrics}
    end
  end

  @doc """
  Suggestions for `query`, as the original made them (`store` is not
  used: pass `nil`): a selective filter for a full scan, a limit, a pid
  with an event type, a narrower time window than an hour; else
  `["Query is already well optimized"]`.
  """
  @spec get_optimization_suggestions(term(), keyword() | map()) :: [String.t()]
  def get_optimization_suggestions(_store, query) do
    q = to_list!(query)
    suggestions(static_index(q), q)
  end

  # ---- helpers ---------------------------------------------------------------------

  defp to_list!(query) when is_map(query), do: to_list!(Map.to_list(query))

  defp to_list!(query) when is_list(query) do
    unless Keyword.keyword?(query),
      do:
        raise(
          ArgumentError,
          "a query must be a keyword list or a map, got: #{inspect(query, limit: 5)}"
        )

    query
  end

  defp to_list!(other),
    do:
      raise(
        ArgumentError,
        "a query must be a keyword list or a map, got: #{inspect(other, limit: 5)}"
      )

  defp static_index(q) do
    cond do
      Keyword.has_key?(q, :pid) ->
        :process

      Keyword.has_key?(q, :event_type) ->
        :event_type

      Keyword.has_key?(q, :ast_node_id) ->
        :ast_node

      Enum.any?([:since, :until, :timestamp_since, :timestamp_until], &Keyword.has_key?(q, &1)) ->
        :temporal

      true ->
        :full_scan
    end
  end

  defp complexity(q) do
    case length(q) do
      n when n <= 1 -> 1.0
      n when n <= 3 -> 1.2
      n when n <= 5 -> 1.5
      _ -> 2.0
    end
  end

  defp post_filters(index, q) do
    present = [
      pid: Keyword.has_key?(q, :pid),
      event_type: Keyword.has_key?(q, :event_type),
      ast_node: Keyword.has_key?(q, :ast_node_id),
      temporal:
        Enum.any?([:since, :until, :timestamp_since, :timestamp_until], &Keyword.has_key?(q, &1))
    ]

    primary =
      %{process: :pid, event_type: :event_type, ast_node: :ast_node, temporal: :temporal}[index]

    # The original listed pid, event type and time; an AST-node filter joins them when given.
    base = [:pid, :event_type, :temporal] ++ if(present[:ast_node], do: [:ast_node], else: [])
    base -- [primary]
  end

  defp suggestions(index, q) do
    s =
      [
        {index == :full_scan,
         "Consider adding a pid, event_type, or time range filter to improve performance"},
        {not Keyword.has_key?(q, :limit),
         "Consider adding a limit to reduce memory usage and improve response time"},
        {index == :event_type and not Keyword.has_key?(q, :pid),
         "Consider adding a pid filter for more selective queries"},
        {broad_window?(q), "Consider narrowing the time range for better performance"}
      ]
      |> Enum.filter(&elem(&1, 0))
      |> Enum.map(&elem(&1, 1))
      |> Enum.reverse()

    if s == [], do: ["Query is already well optimized"], else: s
  end

  defp broad_window?(q) do
    case {Keyword.get(q, :since), Keyword.get(q, :until)} do
      {a, b} when is_integer(a) and is_integer(b) -> b - a > 3_600_000
      _ -> false
    end
  end

  # {index, estimate} from the native planner (a limit-0 query plans and
  # returns nothing).
  defp plan(store, q) do
    %{spec: spec} = EventStore.compile!(q)
    s = EventStore.data_access(store)
    {:ok, %{plan: p, estimate: e}} = QueryCoordinator.query(s, spec ++ [limit: 0])
    {Map.fetch!(@plan_index, p), e}
  end

  defp safe_plan(store, q) do
    {:ok, plan(store, q)}
  rescue
    ArgumentError ->
      if alive?(store), do: {:error, :invalid_query}, else: {:error, :store_unavailable}
  end

  defp validate(query) do
    q = to_list!(query)

    cond do
      not (is_nil(q[:pid]) or is_pid(q[:pid])) ->
        {:error, :invalid_pid}

      not (is_nil(q[:limit]) or (is_integer(q[:limit]) and q[:limit] >= 0)) ->
        {:error, :invalid_limit}

      not Enum.all?([:since, :until, :timestamp_since, :timestamp_until], &ts_ok?(q[&1])) ->
        {:error, :invalid_timestamp}

      true ->
        {:ok, q}
    end
  rescue
    ArgumentError -> {:error, :invalid_query}
  end

  defp ts_ok?(t), do: is_nil(t) or is_integer(t) or t == :infinity

  defp alive(store), do: if(alive?(store), do: {:ok, store}, else: {:error, :store_unavailable})

  defp alive?(store) do
    _ = EventStore.data_access(store)
    true
  rescue
    ArgumentError -> false
  end
end

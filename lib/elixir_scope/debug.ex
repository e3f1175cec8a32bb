defmodule ElixirScope.Debug do
  @moduledoc """
  Health checks and debug views of a pipeline (seed 002 §10.2–10.3), for
  IEx and for operators. Every function takes the pipeline (a
  `PipelineManager` name or pid; default `ElixirScope.Capture.PipelineManager`)
  and returns plain data.

  | function | answers |
  |---|---|
  | `check_health/1` | is every part working? `{:ok, report}` or `{:error, problems, report}` |
  | `get_pipeline_state/1` | workers, ring shards with positions, correlation summary, circuit, shedding, recent errors |
  | `worker_stats/1` | per worker: events, batches, shards; pool counters |
  | `trace_event/2` | what happened to one event: shard and worker, stored or not, correlation and links |
  | `dump_correlation_state/2` | the correlator's open call stacks and message tables |
  | `backpressure_analysis/1` | the BackpressureManager's pressure, signals and history |
  """

  alias ElixirScope.Capture.{BackpressureManager, Pipeline, PipelineManager}
  alias ElixirScope.Native
  alias ElixirScope.Storage.DataAccess

  @type pipeline :: PipelineManager.server()

  @doc """
  Checks the worker pool (workers alive), the ring (not full), the
  correlator (below its bound), the store (reachable), the circuit breaker
  (closed) and the accounting (nothing unaccounted once quiet).
  """
  @spec check_health(pipeline()) :: {:ok, map()} | {:error, [String.t()], map()}
  def check_health(pm \\ PipelineManager) do
    m = PipelineManager.get_metrics(pm)
    n = m.native
    dump = Native.pipe_correlation_dump(handles(pm).pipe, 0)

    checks = [
      worker_pool: if(n.pool.workers > 0, do: :ok, else: {:error, "no active workers"}),
      buffer:
        if(n.ring.utilization < 0.95,
          do: :ok,
          else: {:error, "ring #{round(n.ring.utilization * 100)}% full"}
        ),
      correlation:
        if(dump.active < dump.max_correlations,
          do: :ok,
          else: {:error, "correlator at its bound (#{dump.max_correlations})"}
        ),
      storage: storage_check(PipelineManager.data_access(pm)),
      circuit:
        if(n.breaker.state == :closed,
          do: :ok,
          else: {:error, "circuit breaker #{n.breaker.state}"}
        ),
      accounting:
        if(m.accounting.unaccounted == 0 or m.accounting.in_flight > 0,
          do: :ok,
          else: {:error, "#{m.accounting.unaccounted} events unaccounted"}
        )
    ]

    report = %{checks: Map.new(checks), accounting: Pipeline.accounting_line(m.accounting)}

    case for({_, {:error, why}} <- checks, do: why) do
      [] -> {:ok, report}
      problems -> {:error, problems, report}
    end
  end

  defp storage_check(store) do
    %{} = DataAccess.get_stats(store)
    :ok
  rescue
    e -> {:error, "store: #{Exception.message(e)}"}
  end

  @doc """
  The whole pipeline at a glance: `:workers` (see `worker_stats/1`),
  `:buffers` (per shard: write and read positions, events waiting,
  capacity), `:correlation_state` (counts from `dump_correlation_state/2`),
  `:circuit`, `:shedding`, `:recent_errors` (dead-letter reasons, newest
  last) and the accounting line.
  """
  @spec get_pipeline_state(pipeline()) :: map()
  def get_pipeline_state(pm \\ PipelineManager) do
    m = PipelineManager.get_metrics(pm)
    n = m.native

    buffers =
      n.ring.per_shard
      |> Enum.with_index()
      |> Enum.map(fn {{w, r, avail, cap}, i} ->
        %{shard: i, write_position: w, read_position: r, waiting: avail, capacity: cap}
      end)

    %{
      workers: worker_stats(pm),
      buffers: buffers,
      correlation_state: Map.delete(dump_correlation_state(pm, 0), :stacks),
      circuit: n.breaker,
      shedding: n.shedding,
      recent_errors:
        for(
          {reason, shard, first, events} <- PipelineManager.dead_letters(pm, 10),
          do: %{reason: reason, shard: shard, first_position: first, events: length(events)}
        ),
      accounting: Pipeline.accounting_line(m.accounting)
    }
  end

  @doc """
  Per worker: events and batches handled and the shards it drains
  (shard `i` belongs to worker `i rem workers`); and the pool's counters
  (panics, retries, dead letters).
  """
  @spec worker_stats(pipeline()) :: map()
  def worker_stats(pm \\ PipelineManager) do
    pool = PipelineManager.get_metrics(pm).native.pool
    workers = max(pool.workers, 1)

    per_worker =
      pool.per_worker
      |> Enum.with_index()
      |> Enum.map(fn {{events, batches}, w} ->
        %{
          worker: w,
          events: events,
          batches: batches,
          shards: Enum.filter(0..(pool.shards - 1)//1, &(rem(&1, workers) == w))
        }
      end)

    %{
      workers: pool.workers,
      per_worker: per_worker,
      batch_size: pool.batch_size,
      panics: pool.panics,
      retries: pool.retries,
      dead_lettered_events: pool.dead_lettered_events
    }
  end

  @doc """
  What happened to event `id`: `:status` (`:stored`, or `:not_stored`:
  still in a ring, dropped, shed, dead-lettered or evicted — the pipeline's
  counters say how many of each), the time it was captured, the ring shard
  its process writes to and the worker draining that shard, and, once
  stored, its correlation (`correlation_id`, `parent_id`, `root_id`,
  `links`) and the time between capture and the query.
  """
  @spec trace_event(pipeline(), term()) :: map()
  def trace_event(pm \\ PipelineManager, id) do
    store = PipelineManager.data_access(pm)
    m = PipelineManager.get_metrics(pm)

    case DataAccess.get_correlated(store, id) do
      {:ok, c} ->
        pid = event_pid(c.event)
        shards = m.native.pool.shards

        shard = if is_pid(pid) and shards > 0, do: Native.shard_of_pid(pid, shards), else: nil

        %{
          id: id,
          status: :stored,
          captured_at: Map.get(c.event, :timestamp),
          shard: shard,
          worker: shard && rem(shard, max(m.native.pool.workers, 1)),
          correlation_type: c.correlation_type,
          correlation_id: c.correlation_id,
          parent_id: c.parent_id,
          root_id: c.root_id,
          links: c.links,
          event: c.event
        }

      _ ->
        %{
          id: id,
          status: :not_stored,
          counters:
            Map.take(m.accounting, [
              :in_flight,
              :buffer_full,
              :shed,
              :dead_lettered,
              :evicted,
              :expired
            ])
        }
    end
  end

  defp event_pid(%{caller_pid: p}) when is_pid(p), do: p
  defp event_pid(%{pid: p}) when is_pid(p), do: p
  defp event_pid(%{from_pid: p}) when is_pid(p), do: p
  defp event_pid(%{to_pid: p}) when is_pid(p), do: p
  defp event_pid(%{server_pid: p}) when is_pid(p), do: p
  defp event_pid(_), do: nil

  @doc """
  The correlator's state: open call stacks (the `limit` deepest, each with
  its innermost `limit` call ids), queued sends, pending receives, the
  spawn tree size, entries in use and the bound.
  """
  @spec dump_correlation_state(pipeline(), non_neg_integer()) :: map()
  def dump_correlation_state(pm \\ PipelineManager, limit \\ 20)
      when is_integer(limit) and limit >= 0 do
    d = Native.pipe_correlation_dump(handles(pm).pipe, limit)

    %{
      d
      | stacks:
          for {pid, depth, untracked, ids} <- d.stacks do
            %{pid: pid, depth: depth, untracked: untracked, innermost_call_ids: ids}
          end
    }
  end

  @doc "The pipeline's BackpressureManager state (nil if it has none)."
  @spec backpressure_analysis(pipeline()) :: map() | nil
  def backpressure_analysis(pm \\ PipelineManager) do
    case PipelineManager.backpressure_manager(pm) do
      nil ->
        nil

      bpm ->
        case BackpressureManager.get_state(bpm) do
          %{} = state -> state
          {:error, :not_running} -> nil
        end
    end
  end

  defp handles(pm), do: PipelineManager.handles(pm)
end

defmodule ElixirScope.Capture.AsyncWriter do
  @moduledoc """
  One writer process draining a plain `%RingBuffer{}` into the correlator
  and the store, on its own schedule (every `poll_interval_ms`).

  Unlike `AsyncWriterPool` (native threads), this is an Elixir process: each
  poll it consumes up to `max_backlog` events from the ring's consumption
  cursor, in NIF calls of up to `batch_size` events, each correlated and
  stored natively (events never become Elixir terms on the way). The events
  go to the `pipeline:` given (a `PipelineManager` name or pid; they count
  as accepted there) or, without one, to a private pipeline store
  (`data_access/1`).

      {:ok, buf} = RingBuffer.new(size: 4096)
      {:ok, w} = AsyncWriter.start_link(%{ring_buffer: buf, poll_interval_ms: 10})
      Ingestor.ingest_function_call(buf, M, :f, [], self(), :c)
      AsyncWriter.drain(w)
      {:ok, [_]} = DataAccess.query_by_process(AsyncWriter.data_access(w), self())

  The ring should have no other consuming reader: events another reader
  consumes are not seen here.
  """
  use GenServer

  alias ElixirScope.Capture.{Pipeline, PipelineManager, RingBuffer}
  alias ElixirScope.Native
  alias ElixirScope.Storage.DataAccess

  @defaults %{batch_size: 50, poll_interval_ms: 100, max_backlog: 1000}

  @doc """
  Starts a writer. Config (map or keyword list): `ring_buffer:` (required),
  `batch_size: 50`, `poll_interval_ms: 100`, `max_backlog: 1000` (most
  events per poll), `pipeline:` (a `PipelineManager`; default: a private
  store), `max_events:` (private store bound, default 1,000,000), `name:`.
  """
  @spec start_link(map() | keyword()) :: GenServer.on_start()
  def start_link(config) do
    config = Pipeline.to_map!(config, "AsyncWriter")
    {name, config} = Map.pop(config, :name)
    config = Map.merge(@defaults, config)

    case Map.get(config, :ring_buffer) do
      %RingBuffer{} -> :ok
      other -> RingBuffer.bad_buffer!(other)
    end

    for k <- [:batch_size, :poll_interval_ms, :max_backlog] do
      v = config[k]

      unless is_integer(v) and v >= 1 do
        raise ArgumentError, "#{inspect(k)} must be a positive integer, got: #{inspect(v)}"
      end
    end

    gen_opts = if name, do: [name: name], else: []
    GenServer.start_link(__MODULE__, config, gen_opts)
  end

  @doc "The writer's state: config, position, counters."
  @spec get_state(GenServer.server()) :: map()
  def get_state(w), do: GenServer.call(w, :get_state)

  @doc """
  `%{events_read, events_processed, batches_processed, processing_rate,
  error_count, skipped, missed}`; `processing_rate` is events/s since start.
  """
  @spec get_metrics(GenServer.server()) :: map()
  def get_metrics(w), do: GenServer.call(w, :get_metrics)

  @doc """
  Moves the writer to ring position `position`. The writer reads at the
  ring's consumption cursor: a position ahead of it makes the writer skip
  (consume without storing, counted in `skipped`) the events up to it; a
  position at or behind it changes nothing (those events are already
  consumed). `:ok`.
  """
  @spec set_position(GenServer.server(), non_neg_integer()) :: :ok
  def set_position(w, position) when is_integer(position) and position >= 0,
    do: GenServer.call(w, {:set_position, position})

  def set_position(_w, position),
    do: raise(ArgumentError, "position must be a non-negative integer, got: #{inspect(position)}")

  @doc "Processes everything in the ring now (up to the write position at the call): `:ok`."
  @spec drain(GenServer.server()) :: :ok
  def drain(w), do: GenServer.call(w, :drain, :infinity)

  @doc "A read-only `%DataAccess{}` over the store this writer writes to."
  @spec data_access(GenServer.server()) :: DataAccess.t()
  def data_access(w), do: GenServer.call(w, :data_access)

  @doc """
  Adds processing metadata to an event map (or struct): `correlation_id`
  if absent (a fresh id), `enriched_at` (monotonic ns), `processed_by`
  (this process) and `processing_order` (a unique increasing integer).
  """
  @spec enrich_event(map()) :: map()
  def enrich_event(%{} = event) do
    correlation_id =
      case Map.get(event, :correlation_id) do
        nil -> Native.next_event_id()
        id -> id
      end

    Map.merge(event, %{
      correlation_id: correlation_id,
      enriched_at: System.monotonic_time(:nanosecond),
      processed_by: self(),
      processing_order: System.unique_integer([:positive, :monotonic])
    })
  end

  def enrich_event(other),
    do: raise(ArgumentError, "expected an event map, got: #{inspect(other, limit: 5)}")

  @doc "Stops the writer after a last drain: `:ok`."
  @spec stop(GenServer.server()) :: :ok
  def stop(w), do: GenServer.stop(w, :normal, :infinity)

  # ---------------------------------------------------------------------------

  @impl GenServer
  def init(config) do
    Process.flag(:trap_exit, true)

    {pipeline, owned} =
      case Map.get(config, :pipeline) do
        nil ->
          sizing = %{
            shards: 1,
            ring_size: 64,
            async_writer_pool_size: 1,
            flush_interval_us: 1_000_000,
            max_events: Map.get(config, :max_events, 1_000_000)
          }

          {:ok, p} = Pipeline.start(Pipeline.validate!(sizing))
          {p, true}

        pm ->
          {PipelineManager.handles(pm), false}
      end

    schedule(config.poll_interval_ms)

    {:ok,
     %{
       config: config,
       pipeline: pipeline,
       owned: owned,
       started_at: System.monotonic_time(:millisecond),
       events_read: 0,
       events_processed: 0,
       batches_processed: 0,
       error_count: 0,
       skipped: 0,
       missed: 0,
       skip_to: 0
     }}
  end

  @impl GenServer
  def handle_call(:get_state, _from, s) do
    stats = RingBuffer.stats(s.config.ring_buffer)

    {:reply,
     %{
       config: s.config,
       position: stats.read_position,
       owned_store: s.owned,
       events_read: s.events_read,
       events_processed: s.events_processed,
       error_count: s.error_count
     }, s}
  end

  def handle_call(:get_metrics, _from, s) do
    secs = max(System.monotonic_time(:millisecond) - s.started_at, 1) / 1000

    {:reply,
     %{
       events_read: s.events_read,
       events_processed: s.events_processed,
       batches_processed: s.batches_processed,
       processing_rate: s.events_processed / secs,
       error_count: s.error_count,
       skipped: s.skipped,
       missed: s.missed
     }, s}
  end

  def handle_call({:set_position, pos}, _from, s) do
    {:reply, :ok, poll(%{s | skip_to: pos}, :infinity)}
  end

  def handle_call(:drain, _from, s), do: {:reply, :ok, poll(s, :infinity)}

  def handle_call(:data_access, _from, s), do: {:reply, s.pipeline.data_access, s}

  @impl GenServer
  def handle_info(:poll, s) do
    s = poll(s, s.config.max_backlog)
    schedule(s.config.poll_interval_ms)
    {:noreply, s}
  end

  def handle_info(_other, s), do: {:noreply, s}

  @impl GenServer
  def terminate(_reason, s) do
    s = poll(s, :infinity)

    if s.owned do
      _ = Native.pipe_shutdown(s.pipeline.pipe, 5000)
    end

    :ok
  end

  defp schedule(ms), do: Process.send_after(self(), :poll, ms)

  # Consume up to `budget` events (`:infinity`: up to the write position
  # seen now) in batches of `batch_size`.
  defp poll(s, budget) do
    ring = s.config.ring_buffer
    stats = RingBuffer.stats(ring)
    s = skip(s, ring, stats.read_position)
    available = stats.write_position - max(stats.read_position, s.skip_to)
    budget = if budget == :infinity, do: available, else: min(budget, available)
    consume(s, ring, budget)
  end

  # Skipped events are consumed (read at the cursor) and discarded.
  defp skip(%{skip_to: to} = s, ring, cursor) when to > cursor do
    {events, next} = RingBuffer.read_batch(ring, cursor, to - cursor)
    s = %{s | skipped: s.skipped + length(events)}

    if events == [] or next >= to,
      do: %{s | skip_to: 0},
      else: skip(s, ring, next)
  end

  defp skip(s, _ring, _cursor), do: %{s | skip_to: 0}

  defp consume(s, _ring, budget) when budget <= 0, do: s

  defp consume(s, ring, budget) do
    n = min(budget, s.config.batch_size)

    case Native.pipe_process_ring(s.pipeline.pipe, ring.ref, n) do
      {:error, _reason} ->
        %{s | error_count: s.error_count + 1}

      {0, missed} ->
        %{s | missed: s.missed + missed}

      {k, missed} ->
        s = %{
          s
          | events_read: s.events_read + k,
            events_processed: s.events_processed + k,
            batches_processed: s.batches_processed + 1,
            missed: s.missed + missed
        }

        consume(s, ring, budget - k)
    end
  end
end

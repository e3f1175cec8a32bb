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

  ## Kept positions, restarts and replays

  The writer's read position and its counters are kept with the ring (under
  the writer's cursor key, `cursor:`, default its `name:` or `:default`),
  not in the process, and each NIF call updates them together with the
  read it makes. A writer that is killed and started again over the same
  ring (by its supervisor, say) therefore resumes exactly where the last
  call stopped — not at 0, not skipping — and its counters go on from
  there (`get_state/1`'s `resumed` says so). A private store is the
  process's own, so it starts empty after a restart; give `pipeline:` to
  keep the store across restarts.

  `set_position/2` moves the writer. Behind the ring's cursor it *replays*:
  the events from that position up to the cursor, as long as the ring
  still holds them (a ring holds its last `size` positions, consumed or
  not, until they are overwritten), are read again without consuming and
  handed to the store again — stored anew if the store no longer has them,
  otherwise counted by the store as `duplicates` (same id) — then the
  writer carries on at the cursor. Ahead of the cursor it skips (consumes
  without storing). The counters add up exactly (`get_metrics/1`):

      events_read    = consumed + replayed = events_processed + dead_lettered
      ring reads     = consumed + skipped         (the writer as only consumer)
      each replay    = replayed + replay_missed   (its positions)

  The ring should have no other consuming reader: events another reader
  consumes are not seen here. Two writers over one ring need distinct
  `cursor:` keys (a key held by a live writer is refused).

  ## A missing or invalid ring

  As in the original, a writer whose `ring_buffer` is nil or not a usable
  ring (not a `%RingBuffer{}`, destroyed, or a pipeline's sharded ring)
  still starts: every poll counts a read error (`error_count`, with the
  reason in `get_state/1`'s `last_error`) and nothing is read.
  """
  use GenServer

  alias ElixirScope.Capture.{Pipeline, PipelineManager, RingBuffer}
  alias ElixirScope.{Native, Utils}
  alias ElixirScope.Storage.DataAccess

  # Timer and count bound (Process.send_after/3's longest timeout).
  @max_int 4_294_967_295
  @defaults %{batch_size: 50, poll_interval_ms: 100, max_backlog: 1000, ring_buffer: nil}

  @doc """
  Starts a writer. Config (map or keyword list): `ring_buffer:` (a
  single-shard `%RingBuffer{}`; nil or an invalid value starts a writer
  that counts read errors), `batch_size: 50`, `poll_interval_ms: 100`,
  `max_backlog: 1000` (most events per poll), `pipeline:` (a
  `PipelineManager`; default: a private store), `max_events:` (private
  store bound, default 1,000,000), `cursor:` (the key its position is kept
  under in the ring, any term; default `name:` or `:default`), `name:`.

  Returns `{:error, {:cursor_in_use, key}}` while another live writer holds
  the same cursor key of the same ring.
  """
  @spec start_link(map() | keyword()) :: GenServer.on_start()
  def start_link(config) do
    config = Pipeline.to_map!(config, "AsyncWriter")
    {name, config} = Map.pop(config, :name)
    config = Map.merge(@defaults, config)

    for k <- [:batch_size, :poll_interval_ms, :max_backlog] do
      v = config[k]

      unless is_integer(v) and v >= 1 and v <= @max_int do
        raise ArgumentError,
              "#{inspect(k)} must be an integer in 1..#{@max_int}, got: #{inspect(v)}"
      end
    end

    config = Map.put_new(config, :cursor, name || :default)
    # Resolved here, in the caller: a bad `pipeline:` raises at once.
    pipeline = with pm when pm != nil <- config[:pipeline], do: resolve_pipeline!(pm)
    gen_opts = if name, do: [name: name], else: []
    GenServer.start_link(__MODULE__, {config, pipeline}, gen_opts)
  end

  defp resolve_pipeline!(pm) do
    PipelineManager.handles(pm)
  rescue
    _ -> bad_pipeline!(pm)
  catch
    :exit, _ -> bad_pipeline!(pm)
  end

  defp bad_pipeline!(pm) do
    raise ArgumentError,
          "pipeline: must be a running PipelineManager (name or pid), got: " <>
            inspect(pm, limit: 5, printable_limit: 40)
  end

  @doc """
  The writer's state: `config`, `current_position` (where its next read
  starts: the ring's cursor, or inside a replay; also as `position`),
  `replay_end` (nil outside a replay), `events_read`, `events_processed`,
  `batches_processed`, `processing_rate`, `error_count`, `last_error`,
  `resumed` (an earlier writer left this cursor), `owned_store`,
  `start_time` (when this process started) and `last_poll_time` (when its
  last poll or drain ended; `start_time` before the first), both on
  `ElixirScope.Utils.monotonic_timestamp/0`'s clock (ns), as in the
  original.
  """
  @spec get_state(GenServer.server()) :: map()
  def get_state(w), do: GenServer.call(w, :get_state)

  @doc """
  `%{events_read, events_processed, batches_processed, processing_rate,
  error_count, consumed, replayed, replay_missed, skipped, missed,
  dead_lettered}` (see the module docs for how they add up);
  `processing_rate` is events/s since this process started.
  """
  @spec get_metrics(GenServer.server()) :: map()
  def get_metrics(w), do: GenServer.call(w, :get_metrics)

  @doc """
  Moves the writer to ring position `position`, then processes from there
  (see "Kept positions, restarts and replays"): behind the ring's cursor it
  replays what the ring still holds, ahead of it it skips (counted in
  `skipped`), at it it ends a replay. `:ok`, `{:error, {:not_held,
  oldest}}` if the ring no longer holds `position` (nothing changes), or
  `{:error, reason}` when the writer has no usable ring.
  """
  @spec set_position(GenServer.server(), non_neg_integer()) :: :ok | {:error, term()}
  def set_position(w, position)
      when is_integer(position) and position >= 0 and position < 18_446_744_073_709_551_616,
      do: GenServer.call(w, {:set_position, position}, :infinity)

  def set_position(_w, position),
    do:
      raise(ArgumentError, "position must be an integer in 0..2^64-1, got: #{inspect(position)}")

  @doc """
  Processes everything in the ring now (up to the write position at the
  call, a replay in progress included): `:ok`.
  """
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
  def init({config, resolved}) do
    Process.flag(:trap_exit, true)

    case claim(config) do
      {:error, :in_use} ->
        {:stop, {:cursor_in_use, config.cursor}}

      claimed ->
        {pipeline, owned} =
          case resolved do
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

            %Pipeline{} = p ->
              {p, false}
          end

        {cursor, resumed, ring_error} =
          case claimed do
            {:ok, cursor, resumed} -> {cursor, resumed, nil}
            {:ring_error, reason} -> {nil, false, reason}
          end

        schedule(config.poll_interval_ms)
        now = Utils.monotonic_timestamp()

        {:ok,
         %{
           config: config,
           pipeline: pipeline,
           owned: owned,
           cursor: cursor,
           resumed: resumed,
           ring_error: ring_error,
           last_error: ring_error,
           started_at: System.monotonic_time(:millisecond),
           start_time: now,
           last_poll_time: now,
           # Read errors counted here (no cursor to count them in).
           local_errors: 0,
           processed_at_start: processed_at_start(config, cursor)
         }}
    end
  end

  defp claim(%{ring_buffer: %RingBuffer{ref: ref}, cursor: key}) do
    case Native.rb_writer_claim(ref, :erlang.term_to_binary(key)) do
      {:ok, cursor, resumed} -> {:ok, cursor, resumed}
      {:error, :in_use} -> {:error, :in_use}
    end
  rescue
    e in ArgumentError -> {:ring_error, {:invalid_ring_buffer, Exception.message(e)}}
  end

  defp claim(%{ring_buffer: nil}), do: {:ring_error, :no_ring_buffer}

  defp claim(%{ring_buffer: other}),
    do: {:ring_error, {:invalid_ring_buffer, inspect(other, limit: 5, printable_limit: 40)}}

  defp processed_at_start(_config, nil), do: 0

  defp processed_at_start(config, cursor),
    do: Native.rb_writer_info(config.ring_buffer.ref, cursor).processed

  @impl GenServer
  def handle_call(:get_state, _from, s) do
    m = metrics(s)

    {:reply,
     %{
       config: s.config,
       current_position: m.position,
       position: m.position,
       replay_end: m.replay_end,
       owned_store: s.owned,
       resumed: s.resumed,
       events_read: m.events_read,
       events_processed: m.events_processed,
       batches_processed: m.batches_processed,
       processing_rate: m.processing_rate,
       error_count: m.error_count,
       last_error: s.last_error,
       start_time: s.start_time,
       last_poll_time: s.last_poll_time
     }, s}
  end

  def handle_call(:get_metrics, _from, s),
    do: {:reply, Map.drop(metrics(s), [:position, :replay_end]), s}

  def handle_call({:set_position, _pos}, _from, %{cursor: nil} = s) do
    {:reply, {:error, s.ring_error}, s}
  end

  def handle_call({:set_position, pos}, _from, s) do
    case guarded(s, fn ->
           Native.rb_writer_set_position(s.config.ring_buffer.ref, s.cursor, pos)
         end) do
      {:ok, :ok, s} -> {:reply, :ok, poll(s, :infinity)}
      {:ok, {:error, _} = err, s} -> {:reply, err, s}
      {:error, reason, s} -> {:reply, {:error, reason}, s}
    end
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

  defp metrics(s) do
    c =
      case s.cursor &&
             guarded(s, fn -> Native.rb_writer_info(s.config.ring_buffer.ref, s.cursor) end) do
        {:ok, info, _s} -> info
        _ -> nil
      end

    c =
      c ||
        %{
          position: 0,
          replay_end: nil,
          consumed: 0,
          replayed: 0,
          replay_missed: 0,
          skipped: 0,
          missed: 0,
          processed: 0,
          dead_lettered: 0,
          batches: 0,
          errors: 0
        }

    secs = max(System.monotonic_time(:millisecond) - s.started_at, 1) / 1000

    %{
      position: c.position,
      replay_end: c.replay_end,
      events_read: c.consumed + c.replayed,
      events_processed: c.processed,
      batches_processed: c.batches,
      processing_rate: (c.processed - s.processed_at_start) / secs,
      error_count: c.errors + s.local_errors,
      consumed: c.consumed,
      replayed: c.replayed,
      replay_missed: c.replay_missed,
      skipped: c.skipped,
      missed: c.missed,
      dead_lettered: c.dead_lettered
    }
  end

  # A NIF call that may find the ring destroyed or the pipeline shut down.
  defp guarded(s, fun) do
    {:ok, fun.(), s}
  rescue
    e in ArgumentError -> {:error, {:read_error, Exception.message(e)}, s}
  end

  # One poll (or drain): its end is `last_poll_time`.
  defp poll(s, budget), do: %{do_poll(s, budget) | last_poll_time: Utils.monotonic_timestamp()}

  # No usable ring: a read error per poll.
  defp do_poll(%{cursor: nil} = s, _budget),
    do: %{s | local_errors: s.local_errors + 1, last_error: s.ring_error}

  # Up to `budget` events (`:infinity`: up to the write position seen now).
  defp do_poll(s, budget) do
    budget =
      case budget do
        :infinity ->
          case guarded(s, fn -> RingBuffer.stats(s.config.ring_buffer) end) do
            {:ok, stats, _} -> remaining(s, stats.write_position)
            {:error, _, _} -> 1
          end

        n ->
          n
      end

    step(s, budget)
  end

  # Positions between the writer's next read and `head` (a replay's span
  # included).
  defp remaining(s, head) do
    case guarded(s, fn -> Native.rb_writer_info(s.config.ring_buffer.ref, s.cursor) end) do
      {:ok, info, _} -> max(head - info.position, 0) + max(info.skip_to - info.cursor, 0)
      {:error, _, _} -> 1
    end
  end

  defp step(s, budget) when budget <= 0, do: s

  defp step(s, budget) do
    ring = s.config.ring_buffer
    n = min(budget, s.config.batch_size)

    case guarded(s, fn -> Native.pipe_writer_step(s.pipeline.pipe, ring.ref, s.cursor, n) end) do
      {:ok, {:idle, _, _}, s} ->
        s

      {:ok, {:consume, read, gone}, s} when read + gone < n ->
        # The ring is empty for now.
        s

      {:ok, {_what, read, gone}, s} ->
        step(s, budget - max(read + gone, 1))

      {:error, reason, s} ->
        %{s | local_errors: s.local_errors + 1, last_error: reason}
    end
  end
end

defmodule ElixirScope.Capture.Pipeline do
  @moduledoc false
  # The native pipeline's handles and its option handling, shared by
  # PipelineManager, AsyncWriterPool and AsyncWriter.

  import Bitwise, only: [<<<: 2, &&&: 2]

  alias ElixirScope.Capture.RingBuffer
  alias ElixirScope.Native
  alias ElixirScope.Storage.DataAccess

  @enforce_keys [:pipe, :ring_buffer, :data_access, :config]
  defstruct [:pipe, :ring_buffer, :data_access, :config]

  @type t :: %__MODULE__{
          pipe: reference(),
          ring_buffer: RingBuffer.t(),
          data_access: DataAccess.t(),
          config: map()
        }

  # Native options and their defaults.
  @native_defaults %{
    shards: 16,
    ring_size: 16_384,
    overflow_strategy: :drop_newest,
    max_event_bytes: 4096,
    async_writer_pool_size: 4,
    batch_size: 50,
    flush_interval_us: 1000,
    max_dead_letters: 100,
    correlation_ttl_ms: 300_000,
    max_correlations: 100_000,
    max_events: 1_000_000,
    max_age_ms: nil,
    cleanup_interval_ms: 60_000,
    correlation_enabled: true,
    breaker_threshold: 5,
    breaker_open_ms: 1000
  }

  def native_defaults, do: @native_defaults

  @doc false
  # Starts a native pipeline from a validated config map; `over` is a
  # `%RingBuffer{}` to drain instead of fresh shards, or nil.
  @spec start(map(), RingBuffer.t() | nil, term()) :: {:ok, t()} | {:error, term()}
  def start(config, over \\ nil, name \\ nil) do
    c = Map.merge(@native_defaults, config)

    over_ref =
      case over do
        nil -> nil
        %RingBuffer{ref: ref} -> ref
      end

    result =
      Native.pipe_new(
        over_ref,
        c.shards,
        c.ring_size,
        c.overflow_strategy,
        c.max_event_bytes,
        c.async_writer_pool_size,
        c.batch_size,
        c.flush_interval_us,
        c.max_dead_letters,
        c.correlation_ttl_ms,
        c.max_correlations,
        c.max_events,
        c.max_age_ms || 0,
        c.cleanup_interval_ms,
        c.correlation_enabled
      )

    case result do
      {:ok, pipe, ring_ref, store_ref} ->
        :ok = Native.pipe_configure(pipe, :breaker_threshold, c.breaker_threshold)
        :ok = Native.pipe_configure(pipe, :breaker_open_ms, c.breaker_open_ms)

        ring =
          over ||
            %RingBuffer{
              ref: ring_ref,
              size: c.shards * c.ring_size,
              overflow_strategy: c.overflow_strategy,
              name: name,
              max_event_bytes: c.max_event_bytes
            }

        {:ok,
         %__MODULE__{
           pipe: pipe,
           ring_buffer: ring,
           data_access: DataAccess.from_pipeline(store_ref, c.max_events, name),
           config: c
         }}

      {:error, _} = err ->
        err
    end
  end

  @doc false
  # Validates the native options present in `opts` (a map); raises
  # ArgumentError naming the bad option.
  def validate!(opts) do
    Enum.each(opts, fn {k, v} -> check!(k, v) end)
    opts
  end

  defp check!(:shards, v), do: int!(:shards, v, 1, 256)
  defp check!(:ring_size, v), do: pow2!(:ring_size, v)
  defp check!(:max_event_bytes, v), do: int!(:max_event_bytes, v, 64, 1 <<< 20)
  defp check!(:async_writer_pool_size, v), do: int!(:async_writer_pool_size, v, 1, 64)
  defp check!(:pool_size, v), do: int!(:pool_size, v, 1, 64)
  defp check!(:batch_size, v), do: int!(:batch_size, v, 1, 1 <<< 20)
  defp check!(:flush_interval_us, v), do: int!(:flush_interval_us, v, 1, 60_000_000)
  defp check!(:max_dead_letters, v), do: int!(:max_dead_letters, v, 0, 1_000_000)
  defp check!(:correlation_ttl_ms, v), do: int!(:correlation_ttl_ms, v, 1, 1 <<< 40)
  defp check!(:max_correlations, v), do: int!(:max_correlations, v, 1, 1 <<< 32)
  defp check!(:max_events, v), do: int!(:max_events, v, 1, 1 <<< 29)
  defp check!(:max_age_ms, nil), do: :ok
  defp check!(:max_age_ms, v), do: int!(:max_age_ms, v, 1, 1 <<< 40)
  defp check!(:cleanup_interval_ms, v), do: int!(:cleanup_interval_ms, v, 1, 1 <<< 40)
  defp check!(:correlation_enabled, v), do: bool!(:correlation_enabled, v)
  defp check!(:breaker_threshold, v), do: int!(:breaker_threshold, v, 0, 1_000_000)
  defp check!(:breaker_open_ms, v), do: int!(:breaker_open_ms, v, 1, 3_600_000)

  defp check!(:overflow_strategy, v) when v in [:drop_oldest, :drop_newest, :block], do: :ok

  defp check!(:overflow_strategy, v),
    do: bad!(:overflow_strategy, v, ":drop_oldest, :drop_newest or :block")

  defp check!(_other, _v), do: :ok

  defp int!(_k, v, lo, hi) when is_integer(v) and v >= lo and v <= hi, do: :ok
  defp int!(k, v, lo, hi), do: bad!(k, v, "an integer in #{lo}..#{hi}")

  defp pow2!(_k, v) when is_integer(v) and v >= 1 and v <= 1 <<< 24 and (v &&& v - 1) == 0,
    do: :ok

  defp pow2!(k, v), do: bad!(k, v, "a power of two in 1..#{1 <<< 24}")

  defp bool!(_k, v) when is_boolean(v), do: :ok
  defp bool!(k, v), do: bad!(k, v, "a boolean")

  defp bad!(k, v, what) do
    raise ArgumentError, "option #{inspect(k)} must be #{what}, got: #{inspect(v, limit: 5)}"
  end

  @doc false
  # Options as a map; keyword lists and maps accepted.
  def to_map!(opts, who) when is_list(opts) do
    if Keyword.keyword?(opts) do
      Map.new(opts)
    else
      raise ArgumentError, "#{who} options must be a keyword list or a map, got: #{inspect(opts)}"
    end
  end

  def to_map!(%{} = opts, _who) when not is_struct(opts), do: opts

  def to_map!(opts, who),
    do:
      raise(
        ArgumentError,
        "#{who} options must be a keyword list or a map, got: #{inspect(opts, limit: 5)}"
      )

  @doc false
  # The seeds' pipeline statistics from the native metrics.
  def summarize(native, rate) do
    acc = Map.put(native.accounting, :shed, native.shedding.total)
    cor = native.correlator
    eng = native.engine

    eligible = cor.receives + cor.returns
    matched = cor.matched_receives + (cor.returns - cor.unmatched_returns)

    %{
      events_processed: eng.handled,
      processing_rate: rate,
      events_per_second: rate,
      backlog_size: acc.in_flight,
      latency: %{
        p50_ns: eng.latency_p50_ns,
        p95_ns: eng.latency_p95_ns,
        p99_ns: eng.latency_p99_ns,
        samples: eng.latency_samples
      },
      buffer_utilization: native.ring.utilization,
      dropped: %{
        buffer_full: acc.buffer_full,
        overflow: acc.overflow,
        failed: acc.failed,
        cleared: acc.cleared,
        dead_lettered: acc.dead_lettered,
        evicted: acc.evicted,
        expired: acc.expired,
        duplicates: acc.duplicates,
        store_rejected: acc.store_rejected,
        shed_sampled: native.shedding.sampled,
        shed_low_priority: native.shedding.low_priority,
        circuit_rejected: native.breaker.rejected_events
      },
      circuit: native.breaker,
      shedding: native.shedding,
      active_workers: native.pool.workers,
      correlation_success_rate: if(eligible == 0, do: 1.0, else: matched / eligible),
      orphaned: cor.orphaned_calls,
      memory_bytes: native.store.memory_bytes,
      accounting: acc,
      native: native
    }
  end

  @doc false
  # "accepted 10 = stored 8 + evicted 0 + ... + in flight 0" — one line.
  def accounting_line(acc) do
    parts =
      for k <- [
            :stored,
            :evicted,
            :expired,
            :duplicates,
            :store_rejected,
            :dead_lettered,
            :overflow,
            :failed,
            :cleared,
            :in_flight
          ],
          do: "#{k} #{Map.fetch!(acc, k)}"

    "accepted #{acc.accepted} = " <>
      Enum.join(parts, " + ") <>
      " (unaccounted #{acc.unaccounted}; refused as buffer_full #{acc.buffer_full}" <>
      if(Map.has_key?(acc, :shed), do: "; shed #{acc.shed})", else: ")")
  end
end

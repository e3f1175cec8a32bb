defmodule ElixirScope do
  @moduledoc """
  ElixirScope Native: the capture-and-correlation engine of a time-travel
  debugger for Elixir.

  Trace a running application without recompiling it, then ask what
  happened:

      {:ok, _info} = ElixirScope.trace(MyApp.Worker, pids: :all)
      # ... exercise the app ...
      {:ok, summary} = ElixirScope.stop_trace()

      alias ElixirScope.Analysis
      [crash | _] = Analysis.select(types: [:exception])
      Analysis.traceback(crash) |> Analysis.Format.print_traceback()
      Analysis.call_stat() |> Analysis.Format.print_call_stat()

  Lower-level building blocks: `ElixirScope.Capture.PipelineManager` (the
  native pipeline), `ElixirScope.Capture.Ingestor` (record events by hand),
  `ElixirScope.Storage.DataAccess` (query a store).
  """

  alias ElixirScope.Tracer

  @doc """
  Starts tracing `targets` into a fresh native pipeline (or the running
  pipeline given as `pipeline:`).

  `targets`: a module, `{module, function, arity}` (`function` and `arity`
  may be `:_`), `{:app, app}` (every module of an OTP application), or a
  list of these. Calls are traced locally (recursive and private calls
  included).

  Options (defaults in brackets):

    * `:pids` — `:all` processes, `:new` ones, a pid or a list of pids [`:all`]
    * `:events` — any of `:calls`, `:returns` (returns and exceptions),
      `:messages` (or `:send` / `:receive` alone), `:procs` (spawn, exit,
      link, unlink) [`[:calls, :returns, :messages, :procs]`]
    * `:payload` — `:full` (arguments, return values, messages, each cut at
      `:max_payload_bytes` with a visible marker) or `:arity` (arities only:
      no arguments, return values or message contents; exception reasons and
      exit reasons are kept) [`:full`]
    * `:max_payload_bytes` — cap per event [512]
    * `:state` — capture OTP states: `:snapshot` (every traced OTP
      callback's return is a state record, and each traced OTP process of a
      target module records its current state when the trace starts),
      `:callbacks` (no snapshot), `false` [`:snapshot` when a target
      implements `GenServer`, `:gen_server` or `:gen_statem` callbacks,
      else `false`]. See `ElixirScope.Analysis.state_at/3`.
    * `:max_state_bytes` — cap for what matters most: states, exception
      values and exit reasons [65_536; with `pipeline:`, at most its
      `max_event_bytes`]
    * `:max_events` — stop after this many events [1_000_000]
    * `:max_rate` — stop when more events than this arrive within one
      second [500_000]
    * `:duration` — stop after this many ms [60_000]
    * `:max_stored` — the trace store's bound [`:max_events`]
    * `:ring_size` — ring slots per scheduler shard [131_072]
    * `:pipeline` — the name of a running `PipelineManager` to write into
      instead of a fresh one [nil]
    * `:nodes` — trace a cluster: a list of node names (`[node() |
      Node.list()]`); see below [nil: this node only]
    * `:mode` — `:events` (record events), or `:stats` / `:counts`
      (count calls only, see below) [`:events`]

  ## Stats mode: call counts and times without events

  `mode: :stats` records no event: the VM counts, with its `call_time`
  counters (what `eprof` uses), the calls of every traced function and the
  time spent in the function itself, per process; nothing is sent or
  called per call, so it costs the traced code a fraction of event
  tracing (the README's bench table has the figures).
  `ElixirScope.Analysis.call_stat/1` then answers from those counters,
  read live while the session runs (`by: :function`, `:module`,
  `:process`, `:process_function`; `acc_ns` is nil). `mode: :counts` uses
  `call_count` instead: counts per function only, in every process, the
  cheapest (no process flag at all). Start, `stop_trace/0` and
  `trace_status/0` work as for events, one session at a time (OTP 25 has
  one tracer per process, and the counters are per node); the status
  has `:mode`, `:calls` (counted so far), `:rows` and `:rows_dropped`.
  Options: `:mode`, `:pids` (`:stats` only; `:counts` needs `:all`),
  `:duration` [60_000], `:max_rows` — per-process-and-function rows kept
  when the counters are read, the per-function totals always complete
  [100_000]. Event options (`:payload`, `:events`, `:max_events`, ...)
  and `:nodes` raise `ArgumentError`. The counters live in the VM: one per
  function, and under `:stats` one per process and function, freed when
  the session stops.

  `sample:` (`:stats` with `pids: :all` only) [1.0]: below 1, `call_time`
  (~190 ns per call in the VM) counts in windows only, 1 ms on and
  `1/sample - 1` ms off, while `call_count` (~11 ns) counts every call:
  counts stay exact, own times are estimated as the timed time × the
  exact count / the timed count (exact for calls that cost alike; a
  function no window timed has `own_ns` nil), and per-process rows are
  the timed rows scaled the same way. The status then also has
  `:sampled_calls` (the calls the windows timed).

  ## Cluster traces

  With `nodes:`, every named node runs its own tracer with these options
  and records into its own local pipeline and store (see
  `ElixirScope.Cluster`): no event crosses the network while tracing, and
  limits hold per node. `:pids` is then `:all`, `:new`, or pids of the
  traced nodes (each node traces its own). Further options:

    * `:on_missing` — a node without the library, or whose tracer refuses:
      `:skip` it (the others trace; it is named under `:missing`) or
      `:abort` (nothing starts) [`:skip`]
    * `:timeout` — ms for each node's answer to the start, and to the
      stop [30_000]; a node whose start does not answer in time is reported
      missing (`:timeout`) and stopped once its start completes
    * `:clock_samples` — pings per node for its clock offset [16]

  Returns `{:ok, %{nodes: %{node => info}, missing: %{node => reason},
  clocks: %{node => sample}}}` (see `ElixirScope.Cluster.Clock`), or
  `{:error, reason}`: `{:not_connected, nodes}`, `{:nodes_failed, [{node,
  reason}]}` (no node could trace, or one could not with `on_missing:
  :abort`), `:already_tracing`; a bad node list (not node names,
  duplicates) raises `ArgumentError`. A missing node's reason is
  `:library_missing` (the beam files are not on its code path),
  `{:nif_not_loaded, _}`, or the tracer's error there. `stop_trace/0`
  then stops every node; `ElixirScope.Analysis` queries every node.

  When a limit trips, recording stops at once (in the tracer NIF), the VM's
  tracing is switched off within milliseconds and the reason is kept:
  `trace_status/0` reports it. Returns `{:ok, info}`, or `{:error, reason}`:
  `:already_tracing`, `{:unknown_module, m}`, `{:unknown_application, app}`,
  `{:dead_pid, pid}`, `{:remote_pid, pid}`, `{:no_pipeline, name}`.
  Malformed options raise `ArgumentError`.
  """
  @spec trace(module() | mfa() | {:app, atom()} | list(), keyword()) ::
          {:ok, map()} | {:error, term()}
  def trace(targets, opts \\ []), do: Tracer.trace(targets, opts)

  @doc """
  Stops tracing and waits until every captured event is stored and
  queryable. `{:ok, summary}` (see `trace_status/0`), or
  `{:error, :not_tracing}`.

  After a cluster trace, every node is stopped at once and the summary
  has `:nodes` (each node's summary, with `:node`; a node that went down
  or did not answer: `%{state: :down, events: :unavailable}`), `:totals`
  (the counters summed over the nodes that answered, `:unavailable` the
  others), `:missing`, `:down`, `:trips` (`%{node => reason}` of limits
  that tripped) and `:clocks` (`%{node => %{start:, stop:, offset_ns:,
  error_ns:}}`, see `ElixirScope.Cluster.Clock`).
  """
  @spec stop_trace() :: {:ok, map()} | {:error, :not_tracing}
  def stop_trace do
    if ElixirScope.Cluster.active?(),
      do: ElixirScope.Cluster.stop(),
      else: Tracer.stop_trace()
  end

  @doc """
  The current or last trace: `%{state: :idle}` before any, else a map with
  `:state` (`:tracing` / `:stopped`), `:reason` (`:stopped`, `:max_events`,
  `:max_rate`, `:duration`, `:pipeline_down`), and the counters `:traced`
  (events written), `:dropped` (ring full), `:shed` (load shedding),
  `:over_limit` (offered past a limit), `:after_stop`, `:truncated`, plus
  the pipeline and store. `offered = traced + dropped + shed + over_limit`.
  After a cluster trace: per node, as `stop_trace/0` describes, with
  `cluster: true`; `:reason` `:owner_down` on a node means it stopped
  itself because the coordinator went away.
  """
  @spec trace_status() :: map()
  def trace_status do
    if ElixirScope.Cluster.last() != nil,
      do: ElixirScope.Cluster.status(),
      else: Tracer.status()
  end

  @doc """
  Waits (up to `timeout_ms`) until every event captured so far by the
  current or last trace is queryable. `:ok`, `{:error, :timeout}`,
  `{:error, :no_trace}` or `{:error, :pipeline_down}`.
  """
  @spec flush_trace(non_neg_integer()) :: :ok | {:error, term()}
  def flush_trace(timeout_ms \\ 5000), do: Tracer.flush(timeout_ms)

  @doc "The `%DataAccess{}` store of the current or last trace (nil if none)."
  @spec trace_store() :: ElixirScope.Storage.DataAccess.t() | nil
  def trace_store, do: Tracer.store()

  @doc "The `PipelineManager` of the current or last trace (nil if none)."
  @spec trace_pipeline() :: pid() | nil
  def trace_pipeline, do: Tracer.pipeline()
end

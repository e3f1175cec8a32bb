defmodule ElixirScope.Metrics.Prometheus do
  @moduledoc """
  Pipeline metrics in the Prometheus text exposition format (version
  0.0.4), and an optional `/metrics` endpoint served by OTP's own `:httpd`.

      IO.puts(ElixirScope.Metrics.Prometheus.render(MyApp.Trace))

      # An endpoint, bound to 127.0.0.1 unless told otherwise:
      {:ok, _} = ElixirScope.Metrics.Prometheus.start_link(port: 9568, pipelines: [MyApp.Trace])
      # ... or as a pipeline option: PipelineManager.start_link(name: MyApp.Trace, metrics_port: 9568)

  ## Metrics

  Every series has a `pipeline` label (the pipeline's registered name, or
  its pid). The seeds' five (appendix D.2, without their `layer2_` infix):

  | metric | type | meaning |
  |---|---|---|
  | `elixir_scope_events_processed_total` | counter | events through the correlate-and-store stage |
  | `elixir_scope_processing_duration_seconds` | histogram | write → stored latency of each event |
  | `elixir_scope_correlation_success_rate` | gauge | matched (receives + returns) / eligible, 0..1 |
  | `elixir_scope_worker_pool_size` | gauge | native workers running |
  | `elixir_scope_buffer_utilization_percent` | gauge | events in the ring / its capacity, 0..100 |

  The accounting identity, term by term (`accepted = stored + Σ removed +
  Σ dropped + in_flight + unaccounted`, and `offered = accepted + Σ
  refused`):

  | metric | type | labels |
  |---|---|---|
  | `elixir_scope_events_offered_total`, `elixir_scope_events_accepted_total` | counter | |
  | `elixir_scope_events_refused_total` | counter | `reason`: `buffer_full`, `shed_sampled`, `shed_low_priority` |
  | `elixir_scope_events_dropped_total` | counter | `reason`: `overflow`, `failed`, `cleared`, `dead_lettered`, `duplicates`, `store_rejected` |
  | `elixir_scope_events_removed_total` | counter | `reason`: `evicted`, `expired` (stored, then removed by the store's bounds) |
  | `elixir_scope_events_stored`, `elixir_scope_events_in_flight`, `elixir_scope_events_unaccounted` | gauge | |

  Other drop counters: `elixir_scope_circuit_rejected_events_total` (the
  part of `dead_lettered` rejected by an open breaker),
  `elixir_scope_dead_letter_overflow_total`,
  `elixir_scope_correlator_entries_dropped_total{reason="expired|evicted|refused"}`,
  `elixir_scope_correlator_orphaned_calls_total`,
  `elixir_scope_correlator_unmatched_returns_total`,
  `elixir_scope_subscription_events_dropped_total{reason="slow_subscriber"}`.
  Also `elixir_scope_subscription_events_delivered_total`,
  `elixir_scope_subscriptions`, `elixir_scope_store_memory_bytes`,
  `elixir_scope_circuit_state` (0 closed, 1 open, 2 half open),
  `elixir_scope_backpressure_level` (0 normal .. 3 critical) and, once per
  page, `elixir_scope_beam_memory_bytes`.

  The latency histogram's buckets are the native histogram's power-of-two
  edges, so its counts are exact: bucket `le` = (2^k − 1) ns for k =
  10..34 (about 1 µs to 17 s), then `+Inf`.
  """

  alias ElixirScope.Capture.{BackpressureManager, PipelineManager}
  alias ElixirScope.Native

  @levels %{normal: 0, elevated: 1, high: 2, critical: 3}

  @doc """
  The exposition text (iodata) for one pipeline or a list of them (each
  a `PipelineManager` name or pid). Raises `ArgumentError` for an unknown
  pipeline.
  """
  @spec render(PipelineManager.server() | [PipelineManager.server()]) :: iodata()
  def render(pipelines) when is_list(pipelines) do
    samples = Enum.map(pipelines, &sample!/1)
    families(samples)
  end

  def render(pipeline), do: render([pipeline])

  # ---- sampling ------------------------------------------------------------------

  defp sample!(pm) do
    handles = PipelineManager.handles(pm)
    m = PipelineManager.get_metrics(pm)
    {buckets, count, sum_ns} = Native.pipe_latency_buckets(handles.pipe)
    subs = Native.sub_list(handles.pipe)

    level =
      case PipelineManager.backpressure_manager(pm) do
        nil -> nil
        bp -> safe_level(bp)
      end

    %{
      label: label(pm),
      m: m,
      buckets: buckets,
      count: count,
      sum_ns: sum_ns,
      subs: subs,
      level: level
    }
  catch
    :exit, _ ->
      raise ArgumentError, "unknown pipeline: #{inspect(pm)} (not a running PipelineManager)"
  end

  defp safe_level(bp) do
    case BackpressureManager.get_state(bp) do
      %{level: level} -> Map.get(@levels, level)
      {:error, :not_running} -> nil
    end
  catch
    :exit, _ -> nil
  end

  defp label(pm) when is_atom(pm),
    do: pm |> Atom.to_string() |> String.replace_prefix("Elixir.", "")

  defp label(pm) when is_pid(pm) do
    case Process.info(pm, :registered_name) do
      {:registered_name, name} when is_atom(name) and name != [] -> label(name)
      _ -> inspect(pm)
    end
  end

  defp label(pm), do: inspect(pm)

  # ---- families --------------------------------------------------------------------

  defp families(samples) do
    fam = fn name, type, help, fun ->
      lines = Enum.flat_map(samples, fun)
      ["# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n", lines]
    end

    one = fn name, value_fun ->
      fn s -> [line(name, s.label, [], value_fun.(s))] end
    end

    by = fn name, key, pairs_fun ->
      fn s -> for {r, v} <- pairs_fun.(s), do: line(name, s.label, [{key, r}], v) end
    end

    acc = fn s -> s.m.accounting end
    native = fn s -> s.m.native end

    [
      fam.(
        "elixir_scope_events_processed_total",
        "counter",
        "Events through the correlate-and-store stage.",
        one.("elixir_scope_events_processed_total", & &1.m.events_processed)
      ),
      histogram(samples),
      fam.(
        "elixir_scope_correlation_success_rate",
        "gauge",
        "Matched receives and returns over those eligible (0..1).",
        one.("elixir_scope_correlation_success_rate", & &1.m.correlation_success_rate)
      ),
      fam.(
        "elixir_scope_worker_pool_size",
        "gauge",
        "Native worker threads running.",
        one.("elixir_scope_worker_pool_size", & &1.m.active_workers)
      ),
      fam.(
        "elixir_scope_buffer_utilization_percent",
        "gauge",
        "Events in the ring buffer over its capacity, percent.",
        one.("elixir_scope_buffer_utilization_percent", &(&1.m.buffer_utilization * 100))
      ),
      fam.(
        "elixir_scope_events_offered_total",
        "counter",
        "Writes offered: accepted plus refused.",
        one.("elixir_scope_events_offered_total", fn s ->
          a = acc.(s)
          a.accepted + a.buffer_full + a.shed
        end)
      ),
      fam.(
        "elixir_scope_events_accepted_total",
        "counter",
        "Events accepted by the ring (or handed in directly).",
        one.("elixir_scope_events_accepted_total", &acc.(&1).accepted)
      ),
      fam.(
        "elixir_scope_events_refused_total",
        "counter",
        "Writes not accepted, by reason.",
        by.("elixir_scope_events_refused_total", "reason", fn s ->
          d = s.m.dropped

          [
            {"buffer_full", d.buffer_full},
            {"shed_sampled", d.shed_sampled},
            {"shed_low_priority", d.shed_low_priority}
          ]
        end)
      ),
      fam.(
        "elixir_scope_events_dropped_total",
        "counter",
        "Accepted events never stored, by reason.",
        by.("elixir_scope_events_dropped_total", "reason", fn s ->
          a = acc.(s)

          for k <- [:overflow, :failed, :cleared, :dead_lettered, :duplicates, :store_rejected],
              do: {Atom.to_string(k), Map.fetch!(a, k)}
        end)
      ),
      fam.(
        "elixir_scope_events_removed_total",
        "counter",
        "Stored events removed by the store's bounds, by reason.",
        by.("elixir_scope_events_removed_total", "reason", fn s ->
          a = acc.(s)
          [{"evicted", a.evicted}, {"expired", a.expired}]
        end)
      ),
      fam.(
        "elixir_scope_events_stored",
        "gauge",
        "Events in the store.",
        one.("elixir_scope_events_stored", &acc.(&1).stored)
      ),
      fam.(
        "elixir_scope_events_in_flight",
        "gauge",
        "Events in the rings or a worker's hands.",
        one.("elixir_scope_events_in_flight", &acc.(&1).in_flight)
      ),
      fam.(
        "elixir_scope_events_unaccounted",
        "gauge",
        "accepted minus every accounted term (0 once flushed).",
        one.("elixir_scope_events_unaccounted", &acc.(&1).unaccounted)
      ),
      fam.(
        "elixir_scope_circuit_rejected_events_total",
        "counter",
        "Events dead-lettered by an open circuit breaker (part of dead_lettered).",
        one.("elixir_scope_circuit_rejected_events_total", & &1.m.dropped.circuit_rejected)
      ),
      fam.(
        "elixir_scope_dead_letter_overflow_total",
        "counter",
        "Dead letters evicted from the bounded dead-letter queue.",
        one.("elixir_scope_dead_letter_overflow_total", &native.(&1).pool.dead_letter_overflow)
      ),
      fam.(
        "elixir_scope_correlator_entries_dropped_total",
        "counter",
        "Correlation entries dropped, by reason.",
        by.("elixir_scope_correlator_entries_dropped_total", "reason", fn s ->
          c = native.(s).correlator
          [{"expired", c.expired}, {"evicted", c.evicted}, {"refused", c.refused}]
        end)
      ),
      fam.(
        "elixir_scope_correlator_orphaned_calls_total",
        "counter",
        "Open calls discarded by a process exit.",
        one.(
          "elixir_scope_correlator_orphaned_calls_total",
          &native.(&1).correlator.orphaned_calls
        )
      ),
      fam.(
        "elixir_scope_correlator_unmatched_returns_total",
        "counter",
        "Returns that completed no open call.",
        one.(
          "elixir_scope_correlator_unmatched_returns_total",
          &native.(&1).correlator.unmatched_returns
        )
      ),
      fam.(
        "elixir_scope_subscriptions",
        "gauge",
        "Live subscriptions.",
        one.("elixir_scope_subscriptions", &length(&1.subs))
      ),
      fam.(
        "elixir_scope_subscription_events_delivered_total",
        "counter",
        "Events sent to live subscribers (current subscriptions).",
        one.("elixir_scope_subscription_events_delivered_total", &sum_subs(&1.subs, :delivered))
      ),
      fam.(
        "elixir_scope_subscription_events_dropped_total",
        "counter",
        "Events not sent to a subscriber whose backlog was full (current subscriptions).",
        by.("elixir_scope_subscription_events_dropped_total", "reason", fn s ->
          [{"slow_subscriber", sum_subs(s.subs, :dropped)}]
        end)
      ),
      fam.(
        "elixir_scope_store_memory_bytes",
        "gauge",
        "Native store memory.",
        one.("elixir_scope_store_memory_bytes", & &1.m.memory_bytes)
      ),
      fam.(
        "elixir_scope_circuit_state",
        "gauge",
        "Circuit breaker: 0 closed, 1 open, 2 half open.",
        one.("elixir_scope_circuit_state", fn s ->
          case s.m.circuit.state do
            :closed -> 0
            :open -> 1
            :half_open -> 2
          end
        end)
      ),
      fam.(
        "elixir_scope_backpressure_level",
        "gauge",
        "BackpressureManager level: 0 normal, 1 elevated, 2 high, 3 critical.",
        fn s ->
          if s.level,
            do: [line("elixir_scope_backpressure_level", s.label, [], s.level)],
            else: []
        end
      ),
      "# HELP elixir_scope_beam_memory_bytes Memory allocated by the BEAM.\n",
      "# TYPE elixir_scope_beam_memory_bytes gauge\n",
      "elixir_scope_beam_memory_bytes ",
      Integer.to_string(:erlang.memory(:total)),
      "\n"
    ]
  end

  defp sum_subs(subs, k), do: Enum.reduce(subs, 0, &(&2 + Map.fetch!(&1, k)))

  @name "elixir_scope_processing_duration_seconds"

  defp histogram(samples) do
    lines =
      Enum.flat_map(samples, fn s ->
        bucket_lines =
          s.buckets
          |> Enum.with_index(10)
          |> Enum.map(fn {n, k} ->
            line(@name <> "_bucket", s.label, [{"le", float((Bitwise.bsl(1, k) - 1) / 1.0e9)}], n)
          end)

        bucket_lines ++
          [
            line(@name <> "_bucket", s.label, [{"le", "+Inf"}], s.count),
            line(@name <> "_sum", s.label, [], s.sum_ns / 1.0e9),
            line(@name <> "_count", s.label, [], s.count)
          ]
      end)

    [
      "# HELP ",
      @name,
      " Write to stored latency of each event.\n",
      "# TYPE ",
      @name,
      " histogram\n",
      lines
    ]
  end

  # ---- text format ------------------------------------------------------------------

  defp line(name, pipeline, labels, value) do
    labels = [{"pipeline", pipeline} | labels]

    [
      name,
      "{",
      Enum.intersperse(Enum.map(labels, fn {k, v} -> [k, "=\"", escape(v), "\""] end), ","),
      "} ",
      number(value),
      "\n"
    ]
  end

  defp escape(v) do
    v
    |> String.replace("\\", "\\\\")
    |> String.replace("\"", "\\\"")
    |> String.replace("\n", "\\n")
  end

  defp number(v) when is_integer(v), do: Integer.to_string(v)
  defp number(v) when is_float(v), do: float(v)

  defp float(v), do: :erlang.float_to_binary(v, [:short])

  # ---- endpoint -------------------------------------------------------------------

  @doc """
  Starts a `/metrics` endpoint (OTP `:httpd`) for `pipelines:` (a list of
  `PipelineManager` names or pids). Options: `:port` (required; `0` picks
  a free one, see `port/1`), `:ip` (default `{127, 0, 0, 1}`). Returns
  `{:ok, pid}`, or `{:error, {:port_in_use, port}}` /
  `{:error, reason}`; bad options raise `ArgumentError`.
  """
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts), do: __MODULE__.Endpoint.start_link(opts)

  @doc false
  def child_spec(opts), do: %{id: __MODULE__.Endpoint, start: {__MODULE__, :start_link, [opts]}}

  @doc "The port an endpoint listens on."
  @spec port(GenServer.server()) :: :inet.port_number()
  def port(endpoint), do: GenServer.call(endpoint, :port)

  defmodule Endpoint do
    @moduledoc false
    use GenServer

    def start_link(opts) do
      o =
        ElixirScope.Args.keyword_opts!(
          opts,
          [port: nil, ip: {127, 0, 0, 1}, pipelines: []],
          "metrics endpoint"
        )

      port = o[:port]

      unless is_integer(port) and port >= 0 and port <= 65_535,
        do:
          raise(
            ArgumentError,
            "metrics endpoint option :port must be an integer in 0..65535, got: #{inspect(port)}"
          )

      unless is_tuple(o[:ip]) and tuple_size(o[:ip]) in [4, 8],
        do:
          raise(
            ArgumentError,
            "metrics endpoint option :ip must be an IP address tuple, got: #{inspect(o[:ip])}"
          )

      unless is_list(o[:pipelines]),
        do:
          raise(
            ArgumentError,
            "metrics endpoint option :pipelines must be a list, got: #{inspect(o[:pipelines])}"
          )

      GenServer.start_link(__MODULE__, o)
    end

    @impl GenServer
    def init(o) do
      {:ok, _} = Application.ensure_all_started(:inets)
      Process.flag(:trap_exit, true)
      dir = Path.join(System.tmp_dir!(), "elixir_scope_httpd")
      File.mkdir_p!(dir)

      config = [
        port: o[:port],
        bind_address: o[:ip],
        server_name: ~c"elixir_scope_metrics",
        server_root: String.to_charlist(dir),
        document_root: String.to_charlist(dir),
        modules: [ElixirScope.Metrics.Prometheus.Httpd],
        ipfamily: if(tuple_size(o[:ip]) == 8, do: :inet6, else: :inet)
      ]

      case :inets.start(:httpd, config, :stand_alone) do
        {:ok, httpd} ->
          # A stand-alone httpd's instance supervisor is named by its port
          # (the one the OS picked for port 0).
          [port] =
            for {{:httpd_instance_sup, _addr, port, _profile}, _, _, _} <-
                  Supervisor.which_children(httpd),
                do: port

          :persistent_term.put({ElixirScope.Metrics.Prometheus, port}, o[:pipelines])
          {:ok, %{httpd: httpd, port: port}}

        {:error, reason} ->
          if in_use?(reason), do: {:stop, {:port_in_use, o[:port]}}, else: {:stop, reason}
      end
    end

    # The OS refused the port, or this VM already serves httpd on it.
    defp in_use?(reason), do: inspect(reason) =~ ~r/eaddrinuse|already_started/

    @impl GenServer
    def handle_call(:port, _from, s), do: {:reply, s.port, s}

    @impl GenServer
    def handle_info({:EXIT, pid, reason}, %{httpd: pid} = s), do: {:stop, reason, s}
    def handle_info(_other, s), do: {:noreply, s}

    @impl GenServer
    def terminate(_reason, s) do
      :persistent_term.erase({ElixirScope.Metrics.Prometheus, s.port})
      :inets.stop(:stand_alone, s.httpd)
    end
  end

  defmodule Httpd do
    @moduledoc false
    # The :httpd module serving GET /metrics.
    require Record
    Record.defrecordp(:mod, Record.extract(:mod, from_lib: "inets/include/httpd.hrl"))

    def unquote(:do)(data) do
      path = mod(data, :request_uri) |> to_string() |> String.split("?") |> hd()

      if mod(data, :method) == ~c"GET" and path == "/metrics" do
        port = :httpd_util.lookup(mod(data, :config_db), :port)
        pipelines = :persistent_term.get({ElixirScope.Metrics.Prometheus, port}, [])

        {code, body} =
          try do
            {200, IO.iodata_to_binary(ElixirScope.Metrics.Prometheus.render(pipelines))}
          rescue
            e -> {500, "# " <> Exception.message(e) <> "\n"}
          end

        headers = [
          code: code,
          content_type: ~c"text/plain; version=0.0.4; charset=utf-8",
          content_length: Integer.to_charlist(byte_size(body))
        ]

        {:proceed, [response: {:response, headers, body}]}
      else
        body = "not found: GET /metrics\n"

        {:proceed,
         [
           response:
             {:response,
              [
                code: 404,
                content_type: ~c"text/plain",
                content_length: Integer.to_charlist(byte_size(body))
              ], body}
         ]}
      end
    end
  end
end

defmodule ElixirScope.Metrics.PrometheusTest do
  use ExUnit.Case, async: true

  import ElixirScope.PipelineTestHelpers, only: [start_pipeline!: 1]

  alias ElixirScope.Capture.{Ingestor, PipelineManager}
  alias ElixirScope.Metrics.Prometheus
  alias ElixirScope.Storage.QueryCoordinator

  @moduletag timeout: 60_000

  # A parser of the text exposition format 0.0.4 of our own: every line is
  # a HELP, a TYPE or a sample; every sample's family was declared; label
  # values are quoted and escaped; values are numbers.
  defp parse!(text) do
    text
    |> String.split("\n", trim: true)
    |> Enum.reduce(%{types: %{}, help: %{}, samples: []}, fn line, acc ->
      cond do
        String.starts_with?(line, "# HELP ") ->
          [name, help] = String.split(String.trim_leading(line, "# HELP "), " ", parts: 2)
          assert valid_name?(name), line
          refute Map.has_key?(acc.help, name), "HELP twice for #{name}"
          put_in(acc.help[name], help)

        String.starts_with?(line, "# TYPE ") ->
          [name, type] = String.split(String.trim_leading(line, "# TYPE "), " ")
          assert type in ~w(counter gauge histogram summary untyped), line
          refute Map.has_key?(acc.types, name), "TYPE twice for #{name}"
          put_in(acc.types[name], type)

        String.starts_with?(line, "#") ->
          flunk("unexpected comment: #{line}")

        true ->
          [_, name, labels, value] =
            Regex.run(~r/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$/, line) ||
              flunk("bad sample line: #{inspect(line)}")

          family = Regex.replace(~r/_(bucket|sum|count)$/, name, "")

          type =
            acc.types[name] || acc.types[family] ||
              flunk("sample before its TYPE: #{line}")

          if type != "histogram", do: assert(Map.has_key?(acc.types, name), line)
          %{acc | samples: [{name, labels(labels), number!(value)} | acc.samples]}
      end
    end)
    |> Map.update!(:samples, &Enum.reverse/1)
  end

  defp valid_name?(n), do: n =~ ~r/^[a-zA-Z_:][a-zA-Z0-9_:]*$/

  defp labels(""), do: %{}

  defp labels("{" <> rest) do
    body = String.trim_trailing(rest, "}")

    Regex.scan(~r/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)/, body)
    |> tap(fn found ->
      rebuilt = Enum.map_join(found, "", fn [whole | _] -> whole end)
      assert rebuilt == body, "bad labels: #{body}"
    end)
    |> Map.new(fn [_, k, v, _] -> {k, v} end)
  end

  defp number!("+Inf"), do: :inf

  defp number!(v) do
    case Float.parse(v) do
      {f, ""} -> f
      _ -> flunk("bad value #{v}")
    end
  end

  defp value(parsed, name, labels) do
    found =
      for {^name, l, v} <- parsed.samples, Enum.all?(labels, fn {k, x} -> l[k] == x end), do: v

    assert [v] = found, "#{name} #{inspect(labels)}: #{inspect(found)}"
    v
  end

  defp sum(parsed, name, pipeline) do
    for({^name, %{"pipeline" => ^pipeline}, v} <- parsed.samples, do: v) |> Enum.sum()
  end

  defp workload(pm, n) do
    buf = PipelineManager.ring_buffer(pm)

    for i <- 1..n do
      :ok = Ingestor.ingest_function_call(buf, __MODULE__, :f, [i], self(), i)
      :ok = Ingestor.ingest_function_return(buf, i, 10, i)
      :ok = Ingestor.ingest_message_send(buf, self(), self(), {:m, i})
    end

    :ok = PipelineManager.flush(pm)
  end

  test "render/1: the seeds' metrics, drops by reason, the identity, a histogram, per pipeline" do
    a = start_pipeline!(shards: 2, async_writer_pool_size: 1, max_events: 500)
    b = start_pipeline!(shards: 2, async_writer_pool_size: 2)
    workload(a, 400)
    workload(b, 10)
    {:ok, _sub} = QueryCoordinator.subscribe(b, types: [:send])
    workload(b, 5)
    :ok = QueryCoordinator.flush(b)

    text = IO.iodata_to_binary(Prometheus.render([a, b]))
    p = parse!(text)

    for name <- ~w(elixir_scope_events_processed_total elixir_scope_processing_duration_seconds
                   elixir_scope_correlation_success_rate elixir_scope_worker_pool_size
                   elixir_scope_buffer_utilization_percent) do
      assert Map.has_key?(p.types, name), name
    end

    assert p.types["elixir_scope_processing_duration_seconds"] == "histogram"

    for {pm, n, workers} <- [{a, 1200, 1}, {b, 45, 2}] do
      l = inspect(pm)
      assert value(p, "elixir_scope_events_processed_total", %{"pipeline" => l}) == n
      assert value(p, "elixir_scope_worker_pool_size", %{"pipeline" => l}) == workers

      # The identity, term by term.
      accepted = value(p, "elixir_scope_events_accepted_total", %{"pipeline" => l})
      stored = value(p, "elixir_scope_events_stored", %{"pipeline" => l})
      in_flight = value(p, "elixir_scope_events_in_flight", %{"pipeline" => l})
      unacc = value(p, "elixir_scope_events_unaccounted", %{"pipeline" => l})
      removed = sum(p, "elixir_scope_events_removed_total", l)
      dropped = sum(p, "elixir_scope_events_dropped_total", l)
      refused = sum(p, "elixir_scope_events_refused_total", l)
      assert accepted == n
      assert accepted == stored + removed + dropped + in_flight + unacc
      assert unacc == 0 and in_flight == 0

      assert value(p, "elixir_scope_events_offered_total", %{"pipeline" => l}) ==
               accepted + refused

      # A real histogram: cumulative buckets, +Inf = count.
      buckets =
        for {"elixir_scope_processing_duration_seconds_bucket", %{"pipeline" => ^l} = lb, v} <-
              p.samples,
            do: {lb["le"], v}

      assert length(buckets) == 26
      counts = Enum.map(buckets, &elem(&1, 1))
      assert counts == Enum.sort(counts)
      assert {"+Inf", ^n} = List.last(buckets) |> then(fn {le, v} -> {le, trunc(v)} end)
      assert value(p, "elixir_scope_processing_duration_seconds_count", %{"pipeline" => l}) == n
      assert value(p, "elixir_scope_processing_duration_seconds_sum", %{"pipeline" => l}) > 0
    end

    # Pipeline a's store holds 500 of 1,200: 700 evicted.
    assert value(p, "elixir_scope_events_removed_total", %{
             "pipeline" => inspect(a),
             "reason" => "evicted"
           }) ==
             700

    assert value(p, "elixir_scope_subscription_events_delivered_total", %{
             "pipeline" => inspect(b)
           }) == 5

    assert value(p, "elixir_scope_subscriptions", %{"pipeline" => inspect(b)}) == 1

    # Every drop counter appears with its reason.
    for {name, reasons} <- [
          {"elixir_scope_events_refused_total", ~w(buffer_full shed_sampled shed_low_priority)},
          {"elixir_scope_events_dropped_total",
           ~w(overflow failed cleared dead_lettered duplicates store_rejected)},
          {"elixir_scope_events_removed_total", ~w(evicted expired)},
          {"elixir_scope_correlator_entries_dropped_total", ~w(expired evicted refused)},
          {"elixir_scope_subscription_events_dropped_total", ~w(slow_subscriber)}
        ],
        r <- reasons do
      assert is_number(value(p, name, %{"pipeline" => inspect(a), "reason" => r})), "#{name} #{r}"
    end
  end

  test "label values are escaped and names of registered pipelines are used" do
    name = :"prom \"quoted\\ pipeline"
    pm = start_pipeline!(name: name, shards: 1, async_writer_pool_size: 1)
    workload(pm, 3)
    p = parse!(IO.iodata_to_binary(Prometheus.render(pm)))

    assert value(p, "elixir_scope_events_processed_total", %{
             "pipeline" => ~S(prom \"quoted\\ pipeline)
           }) == 9
  end

  test "promtool check metrics accepts the rendered text" do
    promtool =
      System.find_executable("promtool") ||
        flunk(
          "promtool not found: scripts/ensure_toolchain.sh installs it (Debian package prometheus)"
        )

    pm = start_pipeline!(shards: 2, async_writer_pool_size: 1)
    workload(pm, 50)
    path = Path.join(System.tmp_dir!(), "es_metrics_#{System.unique_integer([:positive])}.prom")
    File.write!(path, Prometheus.render(pm))

    {out, status} =
      System.cmd("sh", ["-c", "#{promtool} check metrics < #{path}"], stderr_to_stdout: true)

    File.rm(path)
    assert status == 0, out
    # promtool prints lint findings (if any) and exits non-zero on errors.
    refute out =~ "error", out
  end

  test "the /metrics endpoint over loopback; a port in use; bad options" do
    pm = start_pipeline!(shards: 1, async_writer_pool_size: 1)
    workload(pm, 4)
    ep = start_supervised!({Prometheus, port: 0, pipelines: [pm]})
    port = Prometheus.port(ep)
    {:ok, _} = Application.ensure_all_started(:inets)
    url = ~c"http://127.0.0.1:#{port}/metrics"

    {:ok, {{_, 200, _}, headers, body}} =
      :httpc.request(:get, {url, []}, [], body_format: :binary)

    assert {~c"content-type", ~c"text/plain; version=0.0.4; charset=utf-8"} in headers
    p = parse!(body)
    assert value(p, "elixir_scope_events_processed_total", %{"pipeline" => inspect(pm)}) == 12

    {:ok, {{_, 404, _}, _, _}} =
      :httpc.request(:get, {~c"http://127.0.0.1:#{port}/other", []}, [], [])

    # Bound to loopback only.
    {:ok, addrs} = :inet.getifaddrs()

    other = for {_, o} <- addrs, {:addr, {a, _, _, _} = ip} <- o, a != 127, do: ip

    for ip <- other do
      assert {:error, _} = :gen_tcp.connect(ip, port, [], 500)
    end

    # The same port again: a clear error.
    Process.flag(:trap_exit, true)
    assert {:error, {:port_in_use, ^port}} = Prometheus.start_link(port: port, pipelines: [pm])
    # A port another socket holds.
    {:ok, l} = :gen_tcp.listen(0, ip: {127, 0, 0, 1})
    {:ok, held} = :inet.port(l)
    assert {:error, {:port_in_use, ^held}} = Prometheus.start_link(port: held, pipelines: [pm])
    :gen_tcp.close(l)

    assert_raise ArgumentError, ~r/:port/, fn -> Prometheus.start_link(port: -1) end
    assert_raise ArgumentError, ~r/:ip/, fn -> Prometheus.start_link(port: 0, ip: "0.0.0.0") end
    assert_raise ArgumentError, ~r/unknown/, fn -> Prometheus.start_link(port: 0, bogus: 1) end

    assert_raise ArgumentError, ~r/metrics_port/, fn ->
      PipelineManager.start_link(name: nil, metrics_port: 70_000)
    end
  end

  test "a pipeline started with metrics_port: serves itself" do
    pm = start_pipeline!(shards: 1, async_writer_pool_size: 1, metrics_port: 0)
    workload(pm, 2)
    port = PipelineManager.metrics_port(pm)
    {:ok, _} = Application.ensure_all_started(:inets)

    {:ok, {{_, 200, _}, _, body}} =
      :httpc.request(:get, {~c"http://127.0.0.1:#{port}/metrics", []}, [], body_format: :binary)

    assert value(parse!(body), "elixir_scope_events_processed_total", %{"pipeline" => inspect(pm)}) ==
             6

    assert PipelineManager.metrics_port(start_pipeline!(shards: 1)) == nil
  end

  test "the Grafana dashboard has the seeds' panels and only uses metrics we render" do
    json = File.read!(Path.expand("../../../dashboards/elixir_scope_grafana.json", __DIR__))

    for title <- [
          "Events/sec (rate)",
          "Processing Latency (p50, p95, p99)",
          "Worker Pool Status",
          "Correlation Success Rate",
          "Buffer Utilization",
          "Memory Usage"
        ] do
      assert json =~ ~s("title": "#{title}"), title
    end

    pm = start_pipeline!(shards: 1, async_writer_pool_size: 1)
    p = parse!(IO.iodata_to_binary(Prometheus.render(pm)))

    for [name] <- Regex.scan(~r/elixir_scope_[a-z_]+/, json) |> Enum.uniq() do
      family = String.replace_suffix(name, "_bucket", "")
      assert Map.has_key?(p.types, family), "dashboard uses #{name}, not rendered"
    end
  end

  test "render/1 of an unknown pipeline raises ArgumentError" do
    assert_raise ArgumentError, ~r/unknown pipeline/, fn ->
      Prometheus.render(:no_such_pipeline)
    end

    assert_raise ArgumentError, ~r/unknown pipeline/, fn -> Prometheus.render([self()]) end
  end
end

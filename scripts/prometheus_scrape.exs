# A real Prometheus server scrapes this node's /metrics endpoint.
#
#   bash scripts/prometheus_scrape.sh        (installs prometheus if missing)
#
# Starts a pipeline with `metrics_port:` (a free port on 127.0.0.1), keeps a
# producer writing into it, starts `prometheus` on loopback with a 1 s
# scrape interval against that endpoint, waits SCRAPE_SECONDS (default 6),
# then asks Prometheus' HTTP API for elixir_scope_events_processed_total and
# prints the answer beside the pipeline's own count. Exits non-zero when
# Prometheus has no such series.
alias ElixirScope.Capture.{Ingestor, PipelineManager}

seconds = String.to_integer(System.get_env("SCRAPE_SECONDS", "6"))
prometheus = System.find_executable("prometheus") || raise "prometheus not found"
{:ok, _} = Application.ensure_all_started(:inets)

{:ok, pm} =
  PipelineManager.start_link(
    name: :scrape_demo,
    shards: 2,
    async_writer_pool_size: 1,
    metrics_port: 0
  )

port = PipelineManager.metrics_port(pm)
IO.puts("metrics endpoint: http://127.0.0.1:#{port}/metrics")

buf = PipelineManager.ring_buffer(pm)

producer =
  spawn_link(fn ->
    Stream.iterate(1, &(&1 + 1))
    |> Enum.each(fn i ->
      :ok = Ingestor.ingest_function_call(buf, Demo, :work, [i], self(), i)
      :ok = Ingestor.ingest_function_return(buf, :ok, 1000, i)
      if rem(i, 1000) == 0, do: Process.sleep(10)
    end)
  end)

free_port = fn ->
  {:ok, s} = :gen_tcp.listen(0, ip: {127, 0, 0, 1})
  {:ok, p} = :inet.port(s)
  :gen_tcp.close(s)
  p
end

prom_port = free_port.()
dir = Path.join(System.tmp_dir!(), "es_prometheus_#{System.unique_integer([:positive])}")
File.mkdir_p!(Path.join(dir, "data"))

File.write!(Path.join(dir, "prometheus.yml"), """
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: elixir_scope
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:#{port}"]
""")

server =
  Port.open({:spawn_executable, prometheus}, [
    :binary,
    :exit_status,
    :stderr_to_stdout,
    args: [
      "--config.file=#{Path.join(dir, "prometheus.yml")}",
      "--storage.tsdb.path=#{Path.join(dir, "data")}",
      "--web.listen-address=127.0.0.1:#{prom_port}"
    ]
  ])

{:os_pid, os_pid} = Port.info(server, :os_pid)

IO.puts(
  "prometheus (os pid #{os_pid}) on 127.0.0.1:#{prom_port}, scraping every 1 s for #{seconds} s"
)

drain = fn drain ->
  receive do
    {^server, {:data, _}} -> drain.(drain)
  after
    0 -> :ok
  end
end

Process.sleep(seconds * 1000)
drain.(drain)

api = fn q ->
  url = ~c"http://127.0.0.1:#{prom_port}/api/v1/query?query=#{URI.encode_www_form(q)}"
  {:ok, {{_, 200, _}, _, body}} = :httpc.request(:get, {url, []}, [], body_format: :binary)
  body
end

body = api.("elixir_scope_events_processed_total")
IO.puts("\nGET /api/v1/query?query=elixir_scope_events_processed_total\n#{body}")
IO.puts("\nGET /api/v1/query?query=up\n#{api.("up")}")
ours = PipelineManager.get_metrics(pm).events_processed
IO.puts("\npipeline's own events_processed now: #{ours}")

Process.unlink(producer)
Process.exit(producer, :kill)
System.cmd("kill", [Integer.to_string(os_pid)])
File.rm_rf(dir)

if body =~ ~s("__name__":"elixir_scope_events_processed_total") do
  IO.puts("OK: Prometheus scraped elixir_scope_events_processed_total")
else
  IO.puts("FAILED: no elixir_scope_events_processed_total series in Prometheus")
  System.halt(1)
end

defmodule ElixirScope.Application do
  @moduledoc false
  # Starts `ElixirScope.Supervisor` with `ElixirScope.Tracer` (idle until
  # `ElixirScope.trace/2`) and `ElixirScope.Cluster` (idle until a trace
  # with `nodes:`). With `config :elixir_scope, pipeline:
  # opts` (a keyword list; `true` for the defaults) it also starts a
  # default `PipelineManager` (registered as `ElixirScope.Capture.PipelineManager`
  # unless `opts` names it otherwise) and makes its ring the `Ingestor`'s
  # buffer (`Ingestor.get_buffer/0`).
  use Application

  alias ElixirScope.Capture.{Ingestor, PipelineManager}

  @impl true
  def start(_type, _args) do
    pipeline =
      case Application.get_env(:elixir_scope, :pipeline) do
        nil -> []
        false -> []
        true -> [pipeline_spec([])]
        opts when is_list(opts) -> [pipeline_spec(opts)]
      end

    children = [
      ElixirScope.Telemetry.Registry,
      ElixirScope.Tracer,
      ElixirScope.Cluster | pipeline
    ]

    Supervisor.start_link(children, strategy: :one_for_one, name: ElixirScope.Supervisor)
  end

  defp pipeline_spec(opts) do
    %{
      id: PipelineManager,
      start: {__MODULE__, :start_pipeline, [opts]},
      type: :supervisor,
      shutdown: :infinity
    }
  end

  @doc false
  def start_pipeline(opts) do
    with {:ok, pid} <- PipelineManager.start_link(opts) do
      Ingestor.set_buffer(PipelineManager.ring_buffer(pid))
      {:ok, pid}
    end
  end
end

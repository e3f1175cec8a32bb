defmodule ElixirScope.Application do
  @moduledoc false
  # Starts `ElixirScope.Supervisor` with `ElixirScope.Config` (the validated
  # configuration; an invalid one fails the start), `ElixirScope.Tracer`
  # (idle until `ElixirScope.trace/2`) and `ElixirScope.Cluster` (idle until
  # a trace with `nodes:`). With `config :elixir_scope, pipeline:
  # opts` (a keyword list; `true` for the defaults) it also starts a
  # default `PipelineManager` (registered as `ElixirScope.Capture.PipelineManager`
  # unless `opts` names it otherwise) with the options `ElixirScope.Config`
  # derives (batch size, flush interval, backlog bound, store bounds,
  # overflow strategy; `opts` take precedence) and makes its ring the
  # `Ingestor`'s buffer (`Ingestor.get_buffer/0`). `Config.update/2`
  # applies to that pipeline live.
  use Application

  require Logger

  alias ElixirScope.Capture.{Ingestor, PipelineManager}
  alias ElixirScope.Config

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
      Config,
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
    {derived, gen} =
      case Process.whereis(Config) do
        nil ->
          {[], nil}

        _ ->
          {config, gen} = Config.snapshot()
          {Config.pipeline_options(config), gen}
      end

    with {:ok, pid} <- PipelineManager.start_link(Keyword.merge(derived, opts)) do
      Ingestor.set_buffer(PipelineManager.ring_buffer(pid))

      # An update kept while the pipeline was (re)starting.
      with gen when is_integer(gen) <- gen,
           {:error, reason} <- Config.sync_pipeline(Config, pid, gen) do
        Logger.warning(
          "ElixirScope: configuration not applied to the pipeline: #{inspect(reason)}"
        )
      end

      {:ok, pid}
    end
  end
end

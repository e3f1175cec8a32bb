defmodule ElixirScope.Config do
  @moduledoc """
  The original ElixirScope's configuration server: a GenServer holding a
  validated, nested configuration, loaded at start from the application
  environment and a few environment variables, readable by path and
  updatable at runtime on the paths listed below, where an update applies
  live to the default pipeline.

      iex> ElixirScope.Config.get([:capture, :ring_buffer, :size])
      1048576
      iex> ElixirScope.Config.get([:no, :such, :path])
      nil

  The `:elixir_scope` application starts it (registered under this
  module's name) before its default pipeline.

  ## Sources, in order of precedence

    1. the environment variables `ELIXIR_SCOPE_AI_PROVIDER` (`mock`,
       `openai` or `anthropic`), `ELIXIR_SCOPE_AI_API_KEY` and
       `ELIXIR_SCOPE_LOG_LEVEL` (a `Logger` level; others are ignored with
       a warning);
    2. the default pipeline's own options (`config :elixir_scope, pipeline:
       [batch_size: 200, ...]`), for the keys of the table below, so that
       `get/1` tells what that pipeline runs with;
    3. `config :elixir_scope, ai: [...], capture: [...], storage: [...],
       interface: [...], instrumentation: [...], log_level: ...` (keyword
       lists or maps, merged key by key into the defaults; other keys of
       the application environment are ignored);
    4. the defaults of the struct (the original's).

  An invalid configuration stops the server at start with
  `{:config_error, reason}`.

  ## Runtime updates and the default pipeline

  `update/2` accepts the paths below and refuses every other one with
  `{:error, :not_updatable}`. The new configuration is validated first (an
  invalid value returns `{:error, reason}` and changes nothing); then, for
  the paths with a pipeline option, the change is applied to the default
  pipeline (`ElixirScope.Capture.PipelineManager`, or the name given in
  `config :elixir_scope, pipeline: [name: ...]`) with
  `PipelineManager.update_config/2` when it is running. Only when that
  succeeds is the change kept, so the configuration and the pipeline never
  disagree. When no default pipeline runs, the change is kept and the
  pipeline starts with it later.

  | path | updatable | pipeline option (applied live) |
  |---|---|---|
  | `[:capture, :processing, :batch_size]` | yes | `:batch_size` |
  | `[:capture, :processing, :flush_interval]` (ms) | yes | `:flush_interval_us` (× 1000) |
  | `[:capture, :processing, :max_queue_size]` | yes | `:max_backlog` |
  | `[:storage, :hot, :max_events]` | yes | `:max_events` (lowering evicts at once, counted) |
  | `[:storage, :hot, :max_age_seconds]` | yes | `:max_age_ms` (× 1000) |
  | `[:capture, :ring_buffer, :overflow_strategy]` | no | `:overflow_strategy` (at pipeline start) |
  | `[:ai, :planning, :sampling_rate]` | yes | – |
  | `[:ai, :planning, :default_strategy]` | yes | – |
  | `[:interface, :query_timeout]` | yes | – |

  The original allows the last three, `batch_size` and `flush_interval`;
  `max_queue_size`, `storage.hot.max_events` and `max_age_seconds` are
  additions (they drive the pipeline). The `ai`, `interface` and
  `instrumentation` sections, `capture.ring_buffer.size`/`max_events`/
  `num_buffers`, `capture.vm_tracing`, `storage.hot.prune_interval`,
  `storage.warm` and `storage.cold` are validated and kept for code that
  reads them; nothing in this project acts on them (the default
  pipeline's rings are sized by its own `:shards` and `:ring_size`
  options; `ElixirScope.trace/2` takes its own options).

  ## Validation

  `validate/1` checks what the original checks (positive integers,
  percentages in 0..1, the AI provider, the planning strategy, the overflow
  strategy, the instrumentation level) and, for the keys the pipeline
  takes, the range the pipeline accepts (`batch_size` ≤ 2^20,
  `flush_interval` ≤ 60,000 ms, `storage.hot.max_events` ≤ 2^29,
  `max_age_seconds` ≤ 2^40 / 1000). It returns `{:ok, config}` or `{:error,
  message}` (a string naming the path, as in the original) and never
  raises: a section that is missing or not a map is an error too.
  """
  use GenServer

  import Bitwise, only: [<<<: 2]

  require Logger

  alias ElixirScope.Capture.PipelineManager

  defstruct ai: %{
              provider: :mock,
              api_key: nil,
              model: "gpt-4",
              analysis: %{max_file_size: 1_000_000, timeout: 30_000, cache_ttl: 3600},
              planning: %{
                default_strategy: :balanced,
                performance_target: 0.01,
                sampling_rate: 1.0
              }
            },
            capture: %{
              ring_buffer: %{
                size: 1_048_576,
                max_events: 100_000,
                overflow_strategy: :drop_oldest,
                num_buffers: :schedulers
              },
              processing: %{batch_size: 1000, flush_interval: 100, max_queue_size: 10_000},
              vm_tracing: %{
                enable_spawn_trace: true,
                enable_exit_trace: true,
                enable_message_trace: false,
                trace_children: true
              }
            },
            storage: %{
              hot: %{max_events: 1_000_000, max_age_seconds: 3600, prune_interval: 60_000},
              warm: %{
                enable: false,
                path: "./elixir_scope_data",
                max_size_mb: 1000,
                compression: :zstd
              },
              cold: %{enable: false}
            },
            interface: %{
              iex_helpers: true,
              query_timeout: 5000,
              web: %{enable: false, port: 4000}
            },
            instrumentation: %{
              default_level: :function_boundaries,
              module_overrides: %{},
              function_overrides: %{},
              exclude_modules: [ElixirScope, :logger, :gen_server, :supervisor]
            },
            log_level: nil

  @type t :: %__MODULE__{
          ai: map(),
          capture: map(),
          storage: map(),
          interface: map(),
          instrumentation: map(),
          log_level: Logger.level() | nil
        }
  @type path :: [atom()]
  @type server :: GenServer.server()

  @sections [:ai, :capture, :storage, :interface, :instrumentation]
  @providers [:mock, :openai, :anthropic]
  @strategies [:minimal, :balanced, :full_trace]
  @overflow [:drop_oldest, :drop_newest, :block]
  @levels [:none, :function_boundaries, :full_trace]
  @log_levels [:emergency, :alert, :critical, :error, :warning, :notice, :info, :debug]

  # Config path -> {pipeline option, to pipeline, from pipeline}.
  @pipeline_paths %{
    [:capture, :processing, :batch_size] => {:batch_size, 1, 1},
    [:capture, :processing, :flush_interval] => {:flush_interval_us, 1000, 1000},
    [:capture, :processing, :max_queue_size] => {:max_backlog, 1, 1},
    [:storage, :hot, :max_events] => {:max_events, 1, 1},
    [:storage, :hot, :max_age_seconds] => {:max_age_ms, 1000, 1000},
    [:capture, :ring_buffer, :overflow_strategy] => {:overflow_strategy, nil, nil}
  }

  @updatable [
    [:ai, :planning, :sampling_rate],
    [:ai, :planning, :default_strategy],
    [:capture, :processing, :batch_size],
    [:capture, :processing, :flush_interval],
    [:capture, :processing, :max_queue_size],
    [:storage, :hot, :max_events],
    [:storage, :hot, :max_age_seconds],
    [:interface, :query_timeout]
  ]

  # How long an update waits for the pipeline.
  @pipeline_timeout 20_000

  @start_defaults [name: __MODULE__, pipeline: nil, config: [], env: true]

  #############################################################################
  # Public API
  #############################################################################

  @doc """
  Starts the server. Options:

  | option | default | meaning |
  |---|---|---|
  | `:name` | `#{inspect(__MODULE__)}` | registered name (`nil`: none) |
  | `:pipeline` | the default pipeline's name | the `PipelineManager` updates are applied to (`false`: none) |
  | `:config` | `[]` | sections (keyword lists or maps) merged over the application environment |
  | `:env` | `true` | read the application and OS environment (`false`: defaults and `:config` only) |

  Returns `{:error, {:config_error, reason}}` when the result does not
  validate; bad options raise `ArgumentError`.
  """
  @spec start_link(keyword()) :: GenServer.on_start()
  def start_link(opts \\ []) do
    opts = ElixirScope.Args.keyword_opts!(opts, @start_defaults, "Config")

    unless (is_list(opts[:config]) and Keyword.keyword?(opts[:config])) or is_map(opts[:config]),
      do: raise(ArgumentError, "Config option :config must be a keyword list or a map")

    unless is_boolean(opts[:env]),
      do: raise(ArgumentError, "Config option :env must be a boolean")

    pipeline!(opts[:pipeline])

    case opts[:name] do
      nil -> GenServer.start_link(__MODULE__, opts)
      name when is_atom(name) -> GenServer.start_link(__MODULE__, opts, name: name)
      other -> raise ArgumentError, "Config option :name must be an atom, got: #{inspect(other)}"
    end
  end

  @doc "The whole configuration (`%ElixirScope.Config{}`)."
  @spec get() :: t()
  def get, do: call(__MODULE__, :get)

  @doc """
  The value at `path` (a list of keys), or `nil` when the path does not
  exist. `get([])` is the whole configuration.
  """
  @spec get(path()) :: term()
  def get(path), do: get(__MODULE__, path)

  @doc "`get/1` on the server `server`."
  @spec get(server(), path()) :: term()
  def get(server, path) do
    path!(path)
    call(server, {:get, path})
  end

  @doc """
  Sets `path` to `value` at runtime: `:ok`, `{:error, :not_updatable}` for
  a path not in the table of the moduledoc, `{:error, message}` when the
  result does not validate, or `{:error, {:pipeline, reason}}` when the
  default pipeline refused it. On an error nothing changes.
  """
  @spec update(path(), term()) :: :ok | {:error, term()}
  def update(path, value), do: update(__MODULE__, path, value)

  @doc "`update/2` on the server `server`."
  @spec update(server(), path(), term()) :: :ok | {:error, term()}
  def update(server, path, value) do
    path!(path)
    # Applying to the pipeline may take a while under load.
    call(server, {:update, path, value}, 30_000)
  end

  @doc """
  Validates a configuration (a `%ElixirScope.Config{}` or a map with its
  sections): `{:ok, config}` or `{:error, message}`. Never raises.
  """
  @spec validate(term()) :: {:ok, t() | map()} | {:error, String.t()}
  def validate(%{} = config) do
    with :ok <- sections(config),
         :ok <- validate_ai(config.ai),
         :ok <- validate_capture(config.capture),
         :ok <- validate_storage(config.storage),
         :ok <- validate_interface(config.interface),
         :ok <- validate_instrumentation(config.instrumentation),
         :ok <- validate_log_level(Map.get(config, :log_level)) do
      {:ok, config}
    end
  end

  def validate(other),
    do:
      {:error, "configuration must be a %ElixirScope.Config{}, got: #{inspect(other, limit: 5)}"}

  @doc """
  The default pipeline's options derived from `config` (see the table in
  the moduledoc), as a keyword list.
  """
  @spec pipeline_options(t()) :: keyword()
  def pipeline_options(config) do
    case validate(config) do
      {:ok, _} -> :ok
      {:error, reason} -> raise ArgumentError, "invalid configuration: #{reason}"
    end

    for {path, {opt, mult, _}} <- @pipeline_paths, v = get_in_path(config, path), v != nil do
      {opt, if(mult, do: v * mult, else: v)}
    end
    |> Enum.sort()
  end

  @doc false
  # For the application: the configuration and its generation (the number
  # of updates kept so far), read before it starts the default pipeline.
  @spec snapshot(server()) :: {t(), non_neg_integer()}
  def snapshot(server \\ __MODULE__), do: call(server, :snapshot)

  @doc false
  # For the application, once the default pipeline `pm` runs: applies to it
  # the pipeline paths updated after generation `gen` (an update kept while
  # the pipeline was starting or restarting).
  @spec sync_pipeline(server(), GenServer.server(), non_neg_integer()) :: :ok | {:error, term()}
  def sync_pipeline(server \\ __MODULE__, pm, gen) do
    pipeline!(pm)

    unless is_integer(gen) and gen >= 0,
      do: raise(ArgumentError, "generation must be a non-negative integer, got: #{inspect(gen)}")

    call(server, {:sync, pm, gen}, 30_000)
  end

  defp call(server, request, timeout \\ 5000) do
    case ElixirScope.Args.server(server, __MODULE__) do
      nil ->
        raise ArgumentError,
              "no #{inspect(__MODULE__)} is running as #{inspect(server)} (the :elixir_scope " <>
                "application starts one; or use #{inspect(__MODULE__)}.start_link/1)"

      dest ->
        GenServer.call(dest, request, timeout)
    end
  end

  defp pipeline!(pm) do
    case pm do
      p when is_atom(p) or is_pid(p) ->
        :ok

      {:global, _} ->
        :ok

      {:via, m, _} when is_atom(m) ->
        :ok

      other ->
        raise ArgumentError,
              "expected a pipeline (a PipelineManager pid or name), got: #{inspect(other, limit: 5)}"
    end
  end

  #############################################################################
  # Server
  #############################################################################

  @impl true
  def init(opts) do
    pipeline_env = if opts[:env], do: pipeline_env(), else: []

    pipeline =
      case opts[:pipeline] do
        nil -> Keyword.get(pipeline_env, :name, PipelineManager)
        other -> other
      end

    with {:ok, config} <- load(opts, pipeline_env),
         {:ok, config} <- validate(config) do
      {:ok, %{config: config, pipeline: pipeline, gen: 0, updated: %{}}}
    else
      {:error, reason} -> {:stop, {:config_error, reason}}
    end
  end

  @impl true
  def handle_call(:get, _from, s), do: {:reply, s.config, s}
  def handle_call({:get, path}, _from, s), do: {:reply, get_in_path(s.config, path), s}

  def handle_call({:update, path, value}, _from, s) do
    if path in @updatable do
      new = put_in_path(s.config, path, value)

      with {:ok, new} <- validate(new),
           :ok <- apply_to_pipeline(s.pipeline, Map.take(@pipeline_paths, [path]), new) do
        gen = s.gen + 1
        {:reply, :ok, %{s | config: new, gen: gen, updated: Map.put(s.updated, path, gen)}}
      else
        {:error, _} = error -> {:reply, error, s}
      end
    else
      {:reply, {:error, :not_updatable}, s}
    end
  end

  def handle_call(:snapshot, _from, s), do: {:reply, {s.config, s.gen}, s}

  def handle_call({:sync, pm, gen}, _from, s) do
    paths = Map.filter(@pipeline_paths, fn {path, _} -> Map.get(s.updated, path, 0) > gen end)
    {:reply, apply_to_pipeline(pm, paths, s.config), s}
  end

  # Applies `paths` (of @pipeline_paths) of `config` to the pipeline, if it
  # runs.
  defp apply_to_pipeline(false, _paths, _config), do: :ok
  defp apply_to_pipeline(_pm, paths, _config) when map_size(paths) == 0, do: :ok

  defp apply_to_pipeline(pm, paths, config) do
    case whereis_pipeline(pm) do
      nil ->
        :ok

      :not_a_pipeline ->
        {:error, {:pipeline, :not_a_pipeline}}

      dest ->
        changes =
          Map.new(paths, fn {path, {opt, mult, _}} -> {opt, get_in_path(config, path) * mult} end)

        # In a task: a pipeline that does not answer must not block this
        # server (PipelineManager's supervisor calls wait forever).
        task =
          Task.async(fn ->
            try do
              PipelineManager.update_config(dest, changes)
            rescue
              e in ArgumentError -> {:error, Exception.message(e)}
            catch
              :exit, reason -> {:error, {:exit, reason}}
            end
          end)

        case Task.yield(task, @pipeline_timeout) || Task.shutdown(task, :brutal_kill) do
          {:ok, :ok} -> :ok
          {:ok, {:error, reason}} -> {:error, {:pipeline, reason}}
          {:exit, reason} -> {:error, {:pipeline, {:exit, reason}}}
          nil -> {:error, {:pipeline, :timeout}}
        end
    end
  end

  # The running PipelineManager `pm` names (a local process must be one),
  # or nil.
  defp whereis_pipeline(pm) do
    pid =
      case pm do
        pid when is_pid(pid) -> if node(pid) != node() or Process.alive?(pid), do: pid
        name when is_atom(name) -> Process.whereis(name)
        other -> GenServer.whereis(other)
      end

    cond do
      pid == nil -> nil
      not is_pid(pid) or node(pid) != node() -> pid
      pipeline_process?(pid) -> pid
      true -> :not_a_pipeline
    end
  end

  defp pipeline_process?(pid) do
    case Process.info(pid, :dictionary) do
      {:dictionary, dict} ->
        List.keyfind(dict, :"$initial_call", 0) ==
          {:"$initial_call", {:supervisor, PipelineManager, 1}}

      nil ->
        false
    end
  end

  #############################################################################
  # Loading
  #############################################################################

  defp load(opts, pipeline_env) do
    config =
      if opts[:env] do
        %__MODULE__{}
        |> merge(Application.get_all_env(:elixir_scope))
        |> merge(opts[:config])
        |> merge_pipeline(pipeline_env)
        |> merge_os_env()
      else
        %__MODULE__{} |> merge(opts[:config])
      end

    {:ok, config}
  end

  defp pipeline_env do
    case Application.get_env(:elixir_scope, :pipeline) do
      opts when is_list(opts) -> if Keyword.keyword?(opts), do: opts, else: []
      _ -> []
    end
  end

  defp merge(config, overrides) do
    Enum.reduce(overrides, config, fn
      {key, value}, acc when key in @sections ->
        Map.put(acc, key, merge_nested(Map.fetch!(acc, key), value))

      {:log_level, value}, acc ->
        %{acc | log_level: value}

      _, acc ->
        acc
    end)
  end

  # Keyword lists and maps merge key by key into maps; anything else
  # replaces the value (and validation then says what is wrong).
  defp merge_nested(%{} = base, overrides) when is_list(overrides) or is_map(overrides) do
    if is_map(overrides) or Keyword.keyword?(overrides) do
      Enum.reduce(overrides, base, fn {k, v}, acc ->
        case Map.get(acc, k) do
          %{} = inner when is_list(v) or is_map(v) -> Map.put(acc, k, merge_nested(inner, v))
          _ -> Map.put(acc, k, v)
        end
      end)
    else
      overrides
    end
  end

  defp merge_nested(_base, overrides), do: overrides

  # The default pipeline's explicit options take precedence for the keys
  # it shares with the configuration.
  defp merge_pipeline(config, pipeline_env) do
    Enum.reduce(@pipeline_paths, config, fn {path, {opt, _to, from}}, acc ->
      case Keyword.fetch(pipeline_env, opt) do
        {:ok, v} when is_integer(v) and is_integer(from) ->
          put_in_path(acc, path, ceil_div(v, from))

        {:ok, v} when from == nil ->
          put_in_path(acc, path, v)

        _ ->
          acc
      end
    end)
  end

  defp ceil_div(v, 1), do: v
  defp ceil_div(v, d), do: div(v + d - 1, d)

  defp merge_os_env(config) do
    config
    |> from_env("ELIXIR_SCOPE_AI_PROVIDER", [:ai, :provider], fn v ->
      # Known providers only: no atom is created from the environment.
      Enum.find(@providers, v, &(Atom.to_string(&1) == v))
    end)
    |> from_env("ELIXIR_SCOPE_AI_API_KEY", [:ai, :api_key], & &1)
    |> from_env("ELIXIR_SCOPE_LOG_LEVEL", [:log_level], fn v ->
      case Enum.find(@log_levels, &(Atom.to_string(&1) == v)) do
        nil ->
          Logger.warning("ignoring ELIXIR_SCOPE_LOG_LEVEL=#{inspect(v)}: not a Logger level")
          :ignore

        level ->
          level
      end
    end)
  end

  defp from_env(config, var, path, transform) do
    case System.get_env(var) do
      nil ->
        config

      value ->
        case transform.(value) do
          :ignore -> config
          v -> put_in_path(config, path, v)
        end
    end
  end

  #############################################################################
  # Paths
  #############################################################################

  defp path!(path) do
    unless atom_list?(path) do
      raise ArgumentError, "path must be a list of atoms, got: #{inspect(path, limit: 5)}"
    end

    :ok
  end

  defp atom_list?([]), do: true
  defp atom_list?([k | rest]) when is_atom(k), do: atom_list?(rest)
  defp atom_list?(_), do: false

  defp get_in_path(value, []), do: value
  defp get_in_path(%{} = map, [k | rest]), do: get_in_path(Map.get(map, k), rest)
  defp get_in_path(_other, _path), do: nil

  defp put_in_path(_value, [], v), do: v

  defp put_in_path(%{} = map, [k | rest], v),
    do: Map.put(map, k, put_in_path(Map.get(map, k, %{}), rest, v))

  defp put_in_path(_other, [k | rest], v), do: %{k => put_in_path(%{}, rest, v)}

  #############################################################################
  # Validation
  #############################################################################

  defp sections(config) do
    case Enum.find(@sections, &(not is_map(Map.get(config, &1)))) do
      nil -> :ok
      key -> {:error, "#{key} must be a map of settings, got: #{inspect(Map.get(config, key))}"}
    end
  end

  defp validate_ai(ai) do
    with :ok <- one_of(ai, [:provider], @providers, "ai.provider"),
         :ok <- pos(ai, [:analysis, :max_file_size], "ai.analysis.max_file_size"),
         :ok <- pos(ai, [:analysis, :timeout], "ai.analysis.timeout"),
         :ok <- pos(ai, [:analysis, :cache_ttl], "ai.analysis.cache_ttl"),
         :ok <- one_of(ai, [:planning, :default_strategy], @strategies, "planning strategy"),
         :ok <- pct(ai, [:planning, :performance_target], "ai.planning.performance_target") do
      pct(ai, [:planning, :sampling_rate], "ai.planning.sampling_rate")
    end
  end

  defp validate_capture(c) do
    with :ok <- pos(c, [:ring_buffer, :size], "capture.ring_buffer.size"),
         :ok <- pos(c, [:ring_buffer, :max_events], "capture.ring_buffer.max_events"),
         :ok <- one_of(c, [:ring_buffer, :overflow_strategy], @overflow, "overflow_strategy"),
         :ok <- pos(c, [:processing, :batch_size], "capture.processing.batch_size", 1 <<< 20),
         :ok <-
           pos(c, [:processing, :flush_interval], "capture.processing.flush_interval", 60_000) do
      optional_pos(c, [:processing, :max_queue_size], "capture.processing.max_queue_size")
    end
  end

  defp validate_storage(st) do
    with :ok <- pos(st, [:hot, :max_events], "storage.hot.max_events", 1 <<< 29),
         :ok <-
           pos(st, [:hot, :max_age_seconds], "storage.hot.max_age_seconds", div(1 <<< 40, 1000)) do
      pos(st, [:hot, :prune_interval], "storage.hot.prune_interval")
    end
  end

  defp validate_interface(i), do: pos(i, [:query_timeout], "interface.query_timeout")

  defp validate_instrumentation(i),
    do: one_of(i, [:default_level], @levels, "instrumentation level")

  defp validate_log_level(nil), do: :ok
  defp validate_log_level(level) when level in @log_levels, do: :ok

  defp validate_log_level(other),
    do:
      {:error, "log_level must be nil or one of #{inspect(@log_levels)}, got: #{inspect(other)}"}

  defp pos(section, path, name, max \\ nil) do
    case get_in_path(section, path) do
      v when is_integer(v) and v > 0 and (max == nil or v <= max) -> :ok
      _ when max == nil -> {:error, "#{name} must be a positive integer"}
      _ -> {:error, "#{name} must be a positive integer (at most #{max})"}
    end
  end

  # Validated when present (the original does not check it).
  defp optional_pos(section, path, name) do
    case get_in_path(section, path) do
      nil -> :ok
      _ -> pos(section, path, name)
    end
  end

  defp pct(section, path, name) do
    case get_in_path(section, path) do
      v when is_number(v) and v >= 0 and v <= 1 -> :ok
      _ -> {:error, "#{name} must be a number between 0 and 1"}
    end
  end

  defp one_of(section, path, allowed, name) do
    if get_in_path(section, path) in allowed,
      do: :ok,
      else: {:error, "#{name} must be one of #{inspect(allowed)}"}
  end
end

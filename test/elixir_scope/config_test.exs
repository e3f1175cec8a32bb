defmodule ElixirScope.ConfigTest do
  # The application's Config is registered node-wide, and some tests set
  # the application and OS environment.
  use ExUnit.Case, async: false

  import Bitwise
  import ExUnit.CaptureLog
  import ElixirScope.PipelineTestHelpers, only: [start_pipeline!: 1]

  alias ElixirScope.Capture.{Ingestor, PipelineManager}
  alias ElixirScope.Config
  alias ElixirScope.Storage.DataAccess

  doctest ElixirScope.Config

  # A private server (not the application's), applying to `pipeline`.
  defp start_config!(opts) do
    opts = Keyword.merge([name: nil, pipeline: false, env: false], opts)
    start_supervised!(%{id: make_ref(), start: {Config, :start_link, [opts]}})
  end

  defp with_app_env(key, value, fun) do
    previous = Application.fetch_env(:elixir_scope, key)
    Application.put_env(:elixir_scope, key, value)

    try do
      fun.()
    after
      case previous do
        {:ok, v} -> Application.put_env(:elixir_scope, key, v)
        :error -> Application.delete_env(:elixir_scope, key)
      end
    end
  end

  defp with_os_env(var, value, fun) do
    previous = System.get_env(var)
    System.put_env(var, value)

    try do
      fun.()
    after
      if previous, do: System.put_env(var, previous), else: System.delete_env(var)
    end
  end

  describe "validate/1 (the original's checks)" do
    test "the default configuration is valid" do
      config = %Config{}
      assert {:ok, ^config} = Config.validate(config)
    end

    test "a complete AI section is valid" do
      config = %Config{
        ai: %{
          provider: :mock,
          api_key: nil,
          model: "gpt-4",
          analysis: %{max_file_size: 1_000_000, timeout: 30_000, cache_ttl: 3600},
          planning: %{default_strategy: :balanced, performance_target: 0.01, sampling_rate: 1.0}
        }
      }

      assert {:ok, ^config} = Config.validate(config)
    end

    test "rejects a bad provider, sampling rate, performance target or strategy" do
      ai = %Config{}.ai
      bad = fn path, v -> Config.validate(%Config{ai: put_in(ai, path, v)}) end

      assert {:error, "ai.provider must be one of" <> _} = bad.([:provider], :invalid_provider)
      assert {:error, "ai.planning.sampling_rate" <> _} = bad.([:planning, :sampling_rate], 1.5)

      assert {:error, "ai.planning.performance_target" <> _} =
               bad.([:planning, :performance_target], -0.1)

      assert {:error, _} = bad.([:planning, :performance_target], "not_a_number")
      assert {:error, "planning strategy" <> _} = bad.([:planning, :default_strategy], :fast)
      # A partial section is an error, not a crash.
      assert {:error, _} = Config.validate(%Config{ai: %{provider: :invalid_provider}})
      assert {:error, _} = Config.validate(%Config{ai: %{provider: :mock}})
    end

    test "capture: sizes, strategies and the pipeline's ranges" do
      capture = %Config{}.capture
      check = fn path, v -> Config.validate(%Config{capture: put_in(capture, path, v)}) end

      assert {:ok, _} = check.([:ring_buffer, :size], 1024)
      assert {:error, "capture.ring_buffer.size" <> _} = check.([:ring_buffer, :size], "big")

      assert {:error, "overflow_strategy must be one of" <> _} =
               check.([:ring_buffer, :overflow_strategy], :invalid_strategy)

      assert {:error, "capture.processing.batch_size" <> _} =
               check.([:processing, :batch_size], 0)

      # Beyond what the pipeline accepts.
      assert {:error, "capture.processing.batch_size must be a positive integer (at most " <> _} =
               check.([:processing, :batch_size], (1 <<< 20) + 1)

      assert {:ok, _} = check.([:processing, :batch_size], 1 <<< 20)
      assert {:error, _} = check.([:processing, :flush_interval], 60_001)
      assert {:error, _} = check.([:processing, :max_queue_size], -5)
    end

    test "storage: positive integers within the store's bound" do
      hot = %Config{}.storage.hot
      check = fn k, v -> Config.validate(%Config{storage: %{hot: Map.put(hot, k, v)}}) end

      assert {:ok, _} = check.(:max_events, 100_000)
      assert {:error, "storage.hot.max_events" <> _} = check.(:max_events, 0)
      assert {:error, _} = check.(:max_events, (1 <<< 29) + 1)
      assert {:error, "storage.hot.max_age_seconds" <> _} = check.(:max_age_seconds, 1.5)
      assert {:error, "storage.hot.prune_interval" <> _} = check.(:prune_interval, nil)
    end

    test "interface, instrumentation and log level" do
      assert {:error, "interface.query_timeout" <> _} =
               Config.validate(%Config{interface: %{query_timeout: 0}})

      assert {:error, "instrumentation level" <> _} =
               Config.validate(%Config{instrumentation: %{default_level: :everything}})

      assert {:ok, _} = Config.validate(%Config{log_level: :error})
      assert {:error, "log_level" <> _} = Config.validate(%Config{log_level: :loud})
    end

    test "anything that is not a configuration is an error, never a crash" do
      for bad <- [nil, :config, "config", [], %{}, %{ai: 1}, %Config{capture: [batch_size: 1]}] do
        assert {:error, message} = Config.validate(bad)
        assert is_binary(message)
      end

      assert {:error, _} = Config.validate(struct(Config, capture: %{}))
    end
  end

  describe "the application's server (the original's tests)" do
    setup do
      original = Config.get()

      on_exit(fn ->
        for path <- [
              [:ai, :planning, :sampling_rate],
              [:capture, :processing, :batch_size],
              [:capture, :processing, :flush_interval],
              [:interface, :query_timeout]
            ] do
          :ok = Config.update(path, get_in(Map.from_struct(original), path))
        end
      end)

      %{original: original}
    end

    test "get/0 and get/1", %{original: original} do
      assert %Config{} = original
      assert Config.get([:ai, :provider]) == :mock
      assert is_number(Config.get([:ai, :planning, :sampling_rate]))
      assert Config.get([:capture, :ring_buffer, :size]) == original.capture.ring_buffer.size
      assert Config.get([]) == original
      assert Config.get([:invalid, :path]) == nil
      assert Config.get([:ai, :provider, :deeper]) == nil
    end

    test "updates the allowed paths" do
      assert :ok = Config.update([:ai, :planning, :sampling_rate], 0.8)
      assert Config.get([:ai, :planning, :sampling_rate]) == 0.8
      assert :ok = Config.update([:capture, :processing, :batch_size], 2000)
      assert Config.get([:capture, :processing, :batch_size]) == 2000
      assert :ok = Config.update([:capture, :processing, :flush_interval], 200)
      assert Config.get([:capture, :processing, :flush_interval]) == 200
      assert :ok = Config.update([:interface, :query_timeout], 15_000)
      assert Config.get([:interface, :query_timeout]) == 15_000
    end

    test "rejects other paths and invalid values, changing nothing" do
      before = Config.get()
      assert {:error, :not_updatable} = Config.update([:ai, :provider], :openai)
      assert {:error, :not_updatable} = Config.update([:capture, :ring_buffer, :size], 64)
      assert {:error, :not_updatable} = Config.update([:nope], 1)
      assert {:error, _} = Config.update([:ai, :planning, :sampling_rate], 1.5)
      assert {:error, _} = Config.update([:capture, :processing, :batch_size], 0)
      assert {:error, _} = Config.update([:storage, :hot, :max_events], :lots)
      assert Config.get() == before
    end

    test "a path that is not a list of atoms raises ArgumentError" do
      for bad <- [:ai, "ai", [1], [:ai | :provider], nil] do
        assert_raise ArgumentError, fn -> Config.get(bad) end
        assert_raise ArgumentError, fn -> Config.update(bad, 1) end
      end
    end
  end

  describe "loading" do
    test "the application environment is merged key by key (keyword lists or maps)" do
      with_app_env(:capture, [processing: [batch_size: 10], ring_buffer: %{size: 65_536}], fn ->
        with_app_env(:storage, [hot: [max_events: 10_000]], fn ->
          pid = start_config!(env: true)
          config = GenServer.call(pid, :get)
          assert config.capture.processing.batch_size == 10
          # Keys not given keep their defaults.
          assert config.capture.processing.flush_interval == 100
          assert config.capture.ring_buffer.size == 65_536
          assert config.capture.ring_buffer.overflow_strategy == :drop_oldest
          assert config.storage.hot.max_events == 10_000
          assert config.storage.hot.max_age_seconds == 3600
        end)
      end)
    end

    test "the :config option is merged over the defaults" do
      pid = start_config!(config: [interface: [query_timeout: 1000], log_level: :error])
      assert Config.get(pid, [:interface, :query_timeout]) == 1000
      assert Config.get(pid, [:interface, :iex_helpers]) == true
      assert Config.get(pid, [:log_level]) == :error
    end

    test "the default pipeline's own options are what get/1 reports" do
      with_app_env(:pipeline, [batch_size: 200, flush_interval_us: 2500, max_events: 5000], fn ->
        pid = start_config!(env: true)
        assert Config.get(pid, [:capture, :processing, :batch_size]) == 200
        # In ms, rounded up.
        assert Config.get(pid, [:capture, :processing, :flush_interval]) == 3
        assert Config.get(pid, [:storage, :hot, :max_events]) == 5000
      end)
    end

    test "environment variables: provider, API key, log level" do
      with_os_env("ELIXIR_SCOPE_AI_PROVIDER", "openai", fn ->
        with_os_env("ELIXIR_SCOPE_AI_API_KEY", "sk-test", fn ->
          with_os_env("ELIXIR_SCOPE_LOG_LEVEL", "warning", fn ->
            pid = start_config!(env: true)
            assert Config.get(pid, [:ai, :provider]) == :openai
            assert Config.get(pid, [:ai, :api_key]) == "sk-test"
            assert Config.get(pid, [:log_level]) == :warning
          end)
        end)
      end)

      # An unknown log level is ignored (no atom is made from it).
      log =
        capture_log(fn ->
          with_os_env("ELIXIR_SCOPE_LOG_LEVEL", "es_no_such_level", fn ->
            assert Config.get(start_config!(env: true), [:log_level]) == nil
          end)
        end)

      assert log =~ "ignoring ELIXIR_SCOPE_LOG_LEVEL"
    end

    test "an invalid configuration stops the server at start" do
      Process.flag(:trap_exit, true)

      assert {:error, {:config_error, "capture.processing.batch_size" <> _}} =
               Config.start_link(
                 name: nil,
                 env: false,
                 config: [capture: [processing: [batch_size: -1]]]
               )

      with_os_env("ELIXIR_SCOPE_AI_PROVIDER", "not-a-provider", fn ->
        assert {:error, {:config_error, "ai.provider" <> _}} = Config.start_link(name: nil)
      end)
    end

    test "a server that is not a Config, or none, raises ArgumentError" do
      for bad <- [self(), :"es_no_config_#{System.unique_integer([:positive])}", "x", {:a, :b}] do
        assert_raise ArgumentError, fn -> Config.get(bad, [:ai]) end
        assert_raise ArgumentError, fn -> Config.update(bad, [:interface, :query_timeout], 1) end
      end
    end

    test "bad options raise ArgumentError" do
      for opts <- [:x, [bogus: 1], [name: "n"], [config: :x], [env: :yes], [pipeline: "pm"]] do
        assert_raise ArgumentError, fn -> Config.start_link(opts) end
      end
    end
  end

  describe "live updates to the default pipeline" do
    setup do
      pm = start_pipeline!(shards: 2, ring_size: 1024, async_writer_pool_size: 1)
      %{pm: pm, config: start_config!(pipeline: pm)}
    end

    test "batch size, flush interval and backlog bound apply at once", %{pm: pm, config: c} do
      assert :ok = Config.update(c, [:capture, :processing, :batch_size], 7)
      assert :ok = Config.update(c, [:capture, :processing, :flush_interval], 5)
      assert :ok = Config.update(c, [:capture, :processing, :max_queue_size], 123)

      pool = PipelineManager.get_metrics(pm).native.pool
      assert pool.batch_size == 7
      assert pool.flush_interval_us == 5000

      config = PipelineManager.get_state(pm).config
      assert {config.batch_size, config.flush_interval_us, config.max_backlog} == {7, 5000, 123}
      assert Config.get(c, [:capture, :processing, :batch_size]) == 7
    end

    test "lowering storage.hot.max_events bounds the store, evictions counted", %{
      pm: pm,
      config: c
    } do
      buf = PipelineManager.ring_buffer(pm)

      for i <- 1..30,
          do: :ok = Ingestor.ingest_performance_metric(buf, :m, i)

      :ok = PipelineManager.flush(pm)
      assert DataAccess.get_stats(PipelineManager.data_access(pm)).total_events == 30

      assert :ok = Config.update(c, [:storage, :hot, :max_events], 10)
      store = PipelineManager.data_access(pm)
      assert store.max_events == 10
      stats = DataAccess.get_stats(store)
      assert {stats.total_events, stats.max_events} == {10, 10}

      # New events keep within the bound, and every event is accounted for.
      for i <- 1..25, do: :ok = Ingestor.ingest_performance_metric(buf, :m, i)
      :ok = PipelineManager.flush(pm)
      assert DataAccess.get_stats(store).total_events == 10
      acc = PipelineManager.get_metrics(pm).accounting
      assert acc.accepted == 55 and acc.stored == 10 and acc.evicted == 45
      assert acc.unaccounted == 0
    end

    test "storage.hot.max_age_seconds sets the store's age bound", %{pm: pm, config: c} do
      assert :ok = Config.update(c, [:storage, :hot, :max_age_seconds], 90)
      assert PipelineManager.get_state(pm).config.max_age_ms == 90_000
    end

    test "an invalid value changes neither the configuration nor the pipeline", %{
      pm: pm,
      config: c
    } do
      before = {GenServer.call(c, :get), PipelineManager.get_state(pm).config}
      assert {:error, _} = Config.update(c, [:capture, :processing, :batch_size], 0)
      assert {:error, _} = Config.update(c, [:capture, :processing, :batch_size], 1 <<< 21)
      assert {:error, _} = Config.update(c, [:storage, :hot, :max_events], 1.0e3)

      assert {:error, :not_updatable} =
               Config.update(c, [:capture, :ring_buffer, :overflow_strategy], :drop_newest)

      assert {GenServer.call(c, :get), PipelineManager.get_state(pm).config} == before
    end

    test "a pipeline that refuses the change leaves the configuration as it was" do
      # Registered under the name, but not a pipeline.
      name = :"es_not_a_pipeline_#{System.unique_integer([:positive])}"
      start_supervised!(%{id: name, start: {Agent, :start_link, [fn -> 0 end, [name: name]]}})
      c = start_config!(pipeline: name)

      capture_log(fn ->
        assert {:error, {:pipeline, _}} =
                 Config.update(c, [:capture, :processing, :batch_size], 9)
      end)

      assert Config.get(c, [:capture, :processing, :batch_size]) == 1000
      # A process that is not a pipeline (calling it would block): refused at once.
      c2 = start_config!(pipeline: self())

      assert {:error, {:pipeline, :not_a_pipeline}} =
               Config.update(c2, [:capture, :processing, :batch_size], 9)

      # Paths without a pipeline option do not touch it.
      assert :ok = Config.update(c, [:interface, :query_timeout], 100)
    end

    test "with no pipeline running the change is kept for its start" do
      c = start_config!(pipeline: :"es_no_pipeline_#{System.unique_integer([:positive])}")
      assert :ok = Config.update(c, [:capture, :processing, :batch_size], 9)
      assert Config.pipeline_options(GenServer.call(c, :get))[:batch_size] == 9
    end

    test "sync_pipeline/3 applies the updates kept after a generation", %{pm: pm} do
      c = start_config!(pipeline: false)
      {_config, gen} = Config.snapshot(c)
      assert :ok = Config.update(c, [:capture, :processing, :batch_size], 11)
      assert PipelineManager.get_state(pm).config.batch_size != 11

      assert :ok = Config.sync_pipeline(c, pm, gen)
      assert PipelineManager.get_state(pm).config.batch_size == 11
      # Nothing updated after the current generation: nothing applied.
      {_config, gen} = Config.snapshot(c)
      :ok = PipelineManager.update_config(pm, batch_size: 3)
      assert :ok = Config.sync_pipeline(c, pm, gen)
      assert PipelineManager.get_state(pm).config.batch_size == 3
    end
  end

  describe "pipeline_options/1 and the application's default pipeline" do
    test "derives the pipeline's options, converting units" do
      opts = Config.pipeline_options(%Config{})

      assert opts == [
               batch_size: 1000,
               flush_interval_us: 100_000,
               max_age_ms: 3_600_000,
               max_backlog: 10_000,
               max_events: 1_000_000,
               overflow_strategy: :drop_oldest
             ]
    end

    test "the application's Config drives the application's default pipeline" do
      previous = :persistent_term.get({Ingestor, :buffer}, :__unset__)
      original = Config.get([:storage, :hot, :max_events])
      original_batch = Config.get([:capture, :processing, :batch_size])
      # Registered under the default name, as `config :elixir_scope, pipeline: [...]` does.
      {:ok, pm} = ElixirScope.Application.start_pipeline(shards: 1, ring_size: 64)

      try do
        assert Process.whereis(PipelineManager) == pm
        assert :ok = Config.update([:storage, :hot, :max_events], 7)
        assert PipelineManager.data_access().max_events == 7
        assert DataAccess.get_stats(PipelineManager.data_access()).max_events == 7
        assert :ok = Config.update([:capture, :processing, :batch_size], 3)
        assert PipelineManager.get_metrics().native.pool.batch_size == 3
        # Its backpressure manager answers the zero-arity API.
        assert ElixirScope.Capture.BackpressureManager.check_pressure() in [
                 :normal,
                 :elevated,
                 :high,
                 :critical
               ]
      after
        :ok = Config.update([:storage, :hot, :max_events], original)
        :ok = Config.update([:capture, :processing, :batch_size], original_batch)
        :ok = PipelineManager.shutdown(pm)

        case previous do
          :__unset__ -> :persistent_term.erase({Ingestor, :buffer})
          buf -> :persistent_term.put({Ingestor, :buffer}, buf)
        end
      end
    end

    test "start_pipeline/1 starts the pipeline with them, its own options first" do
      previous = :persistent_term.get({Ingestor, :buffer}, :__unset__)
      name = :"es_cfg_pm_#{System.unique_integer([:positive])}"

      {:ok, pm} =
        ElixirScope.Application.start_pipeline(
          name: name,
          shards: 1,
          ring_size: 64,
          batch_size: 5
        )

      try do
        config = PipelineManager.get_state(pm).config
        expected = Config.pipeline_options(Config.get())
        assert config.batch_size == 5
        assert config.flush_interval_us == expected[:flush_interval_us]
        assert config.max_events == expected[:max_events]
        assert config.max_age_ms == expected[:max_age_ms]
        assert config.overflow_strategy == expected[:overflow_strategy]
      after
        :ok = PipelineManager.shutdown(pm)

        case previous do
          :__unset__ -> :persistent_term.erase({Ingestor, :buffer})
          buf -> :persistent_term.put({Ingestor, :buffer}, buf)
        end
      end
    end
  end
end

defmodule ElixirScope.ConsumerProjectTest do
  @moduledoc """
  Uses ElixirScope the way a consumer does: a throwaway Mix project that
  depends on this repository as a path dependency builds it (including the
  native NIF, through the custom compiler in mix.exs) and runs its own tests
  against the public API. No hex package is involved.
  """
  use ExUnit.Case, async: false

  @moduletag :consumer
  @moduletag timeout: 600_000

  @repo_root Path.expand("..", __DIR__)

  setup do
    dir =
      Path.join(
        System.tmp_dir!(),
        "elixir_scope_consumer_#{System.os_time(:millisecond)}_#{System.unique_integer([:positive])}"
      )

    File.rm_rf!(dir)
    File.mkdir_p!(Path.join(dir, "test"))
    on_exit(fn -> File.rm_rf!(dir) end)
    {:ok, dir: dir}
  end

  test "a Mix project depending on elixir_scope by path builds and uses it", %{dir: dir} do
    write_consumer_project!(dir)

    {output, status} = mix(dir, ["deps.compile"])
    assert status == 0, "mix deps.compile failed (exit #{status}):\n#{output}"

    {output, status} = mix(dir, ["test"])
    assert status == 0, "mix test in the consumer project failed (exit #{status}):\n#{output}"
    assert output =~ "0 failures", "unexpected mix test output:\n#{output}"
    assert output =~ ~r/\b2 tests\b/, "expected the consumer's 2 tests to run:\n#{output}"

    # A path dependency needs no fetching: nothing was written to deps/ and no
    # lock entry is required.
    refute File.exists?(Path.join(dir, "deps"))
  end

  defp mix(dir, args) do
    System.cmd("mix", args,
      cd: dir,
      stderr_to_stdout: true,
      env: [
        {"MIX_ENV", "test"},
        # Reuse this repository's cargo build instead of rebuilding the NIF.
        {"ELIXIR_SCOPE_CARGO_TARGET_DIR", Path.join(@repo_root, "target")},
        {"LANG", System.get_env("LANG") || "C.UTF-8"},
        {"LC_ALL", System.get_env("LC_ALL") || "C.UTF-8"},
        # Don't let the outer `mix test` leak its project settings.
        {"MIX_EXS", nil},
        {"MIX_BUILD_PATH", nil},
        {"MIX_BUILD_ROOT", nil},
        {"MIX_DEPS_PATH", nil},
        {"MIX_LOCKFILE", nil},
        {"MIX_TARGET", nil}
      ]
    )
  end

  defp write_consumer_project!(dir) do
    File.write!(Path.join(dir, "mix.exs"), """
    defmodule ElixirScopeConsumer.MixProject do
      use Mix.Project

      def project do
        [
          app: :elixir_scope_consumer,
          version: "0.0.1",
          elixir: "~> 1.14",
          deps: [{:elixir_scope, path: #{inspect(@repo_root)}}]
        ]
      end

      def application, do: [extra_applications: [:logger]]
    end
    """)

    File.write!(Path.join([dir, "test", "test_helper.exs"]), "ExUnit.start()\n")

    File.write!(Path.join([dir, "test", "consumer_test.exs"]), ~S"""
    defmodule ElixirScopeConsumerTest do
      use ExUnit.Case

      alias ElixirScope.Capture.{Ingestor, RingBuffer}

      test "ring buffer round-trips a term" do
        {:ok, buf} = RingBuffer.new(size: 1024)
        :ok = RingBuffer.write(buf, %{hello: :world})
        {[%{hello: :world}], 1} = RingBuffer.read_batch(buf, 0, 10)
      end

      test "ingestor writes a function call event that can be read back" do
        {:ok, buf} = RingBuffer.new(size: 1024)
        :ok = Ingestor.ingest_function_call(buf, MyMod, :fun, [1, 2], self(), 7)

        assert {[%ElixirScope.Events.FunctionExecution{} = event], 1} =
                 RingBuffer.read_batch(buf, 0, 10)

        assert event.module == MyMod
        assert event.function == :fun
        assert event.args == [1, 2]
      end
    end
    """)
  end
end

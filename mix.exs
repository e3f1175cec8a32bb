defmodule Mix.Tasks.Compile.ElixirScopeNative do
  @moduledoc false
  # Builds the Rust NIF with cargo (release) and installs it as
  # priv/native/libelixir_scope_nif.so. Defined here, above the project, so it
  # works without the hex `rustler` package, standalone and as a dependency.
  use Mix.Task.Compiler

  @crate "elixir_scope_nif"

  @impl true
  def run(_args) do
    root = Path.expand(__DIR__)
    priv = Path.join(root, "priv/native")
    dest = Path.join(priv, "lib#{@crate}.so")

    if stale?(root, dest) do
      build!(root)
      built = Path.join([target_dir(root), "release", "lib#{@crate}#{ext()}"])
      File.mkdir_p!(priv)
      # Never overwrite a loaded .so in place: remove, then copy.
      File.rm(dest)
      File.cp!(built, dest)
    end

    link_priv(root)
    {:ok, []}
  end

  defp build!(root) do
    cargo = System.find_executable("cargo") || Path.expand("~/.cargo/bin/cargo")

    unless File.exists?(cargo) do
      Mix.raise("cargo not found: install Rust (https://rustup.rs) to build the ElixirScope NIF")
    end

    Mix.shell().info("==> elixir_scope: cargo build --release -p #{@crate}")

    {_, status} =
      System.cmd(cargo, ["build", "--release", "-p", @crate],
        cd: root,
        into: IO.stream(:stdio, :line),
        stderr_to_stdout: true,
        env: [{"CARGO_TARGET_DIR", target_dir(root)}]
      )

    if status != 0, do: Mix.raise("cargo build failed (exit #{status})")
  end

  defp target_dir(root),
    do: System.get_env("ELIXIR_SCOPE_CARGO_TARGET_DIR") || Path.join(root, "target")

  defp ext do
    case :os.type() do
      {:unix, :darwin} -> ".dylib"
      _ -> ".so"
    end
  end

  defp stale?(root, dest) do
    case File.stat(dest) do
      {:error, _} ->
        true

      {:ok, %{mtime: built}} ->
        sources =
          Path.wildcard(Path.join(root, "native/**/*.rs")) ++
            Path.wildcard(Path.join(root, "native/*/Cargo.toml")) ++
            [Path.join(root, "Cargo.toml")]

        Enum.any?(sources, fn src -> File.stat!(src).mtime > built end)
    end
  end

  # Mix links _build/<env>/lib/<app>/priv only if priv/ existed before the
  # first compile; make sure the link (or copy) is there.
  defp link_priv(root) do
    app_priv = Path.join(Mix.Project.app_path(), "priv")
    src_priv = Path.join(root, "priv")

    case File.read_link(app_priv) do
      {:ok, _} ->
        :ok

      {:error, _} ->
        File.rm_rf!(app_priv)
        Mix.Utils.symlink_or_copy(src_priv, app_priv)
    end
  end
end

defmodule ElixirScope.MixProject do
  use Mix.Project

  @version "0.1.0"

  def project do
    [
      app: :elixir_scope,
      version: @version,
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      compilers: [:elixir_scope_native | Mix.compilers()],
      elixirc_paths: elixirc_paths(Mix.env()),
      deps: [],
      docs: [main: "readme", extras: ["README.md"]],
      description: "ElixirScope Native: a Rust-backed event capture and correlation engine"
    ]
  end

  def application do
    [extra_applications: [:logger, :inets], mod: {ElixirScope.Application, []}]
  end

  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]
end

defmodule Mix.Tasks.ElixirScope.Export do
  @shortdoc "Exports a trace file to Chrome trace, speedscope, folded stacks or a flame graph"
  @moduledoc """
  Exports trace files (written by `ElixirScope.TraceFile.save/3`) for a
  viewer:

      mix elixir_scope.export FILE [FILE...] --format FORMAT -o OUT

  `FORMAT`: `chrome_trace` (Perfetto, Chrome's trace viewer),
  `speedscope`, `folded` (flamegraph.pl, inferno) or `flamegraph` (SVG).
  Several files are merged. Options:

    * `--format`, `-f` — required
    * `--output`, `-o` — required
    * `--weight` — `own_time` (default) or `calls` (folded, flamegraph)
    * `--preview-bytes` — longest payload preview (chrome_trace)
    * `--max-depth` — deepest frame kept in stacks (folded, flamegraph)
    * `--title` — flame graph title, speedscope file name

  See `ElixirScope.Export` for what each format holds.
  """
  use Mix.Task

  @switches [
    format: :string,
    output: :string,
    weight: :string,
    preview_bytes: :integer,
    max_depth: :integer,
    title: :string
  ]

  @impl Mix.Task
  def run(argv) do
    {opts, files, invalid} =
      OptionParser.parse(argv, strict: @switches, aliases: [f: :format, o: :output])

    if invalid != [] do
      Mix.raise("unknown or invalid options: #{inspect(invalid)}")
    end

    if files == [], do: Mix.raise("usage: mix elixir_scope.export FILE... --format F -o OUT")
    out = opts[:output] || Mix.raise("--output (-o) is required")
    format = parse_format(opts[:format] || Mix.raise("--format (-f) is required"))

    export_opts =
      [
        weight: opts[:weight] && parse_weight(opts[:weight]),
        preview_bytes: opts[:preview_bytes],
        max_depth: opts[:max_depth],
        title: opts[:title]
      ]
      |> Enum.reject(fn {_, v} -> is_nil(v) end)

    {:ok, _} = Application.ensure_all_started(:elixir_scope)
    source = if match?([_], files), do: hd(files), else: files

    case ElixirScope.Export.export(source, out, format, export_opts) do
      {:ok, s} ->
        Mix.shell().info(
          "#{s.path}: #{s.format}, #{s.bytes} bytes from #{s.events} events " <>
            "(#{s.calls} calls, #{s.instants} instants, #{s.flows} flows, " <>
            "#{s.processes} processes)"
        )

      {:error, {reason, %{} = details}} ->
        Mix.raise(
          "export failed: #{reason} #{inspect(Map.take(details, [:path, :offset, :detail]))}"
        )

      {:error, reason} ->
        Mix.raise("export failed: #{inspect(reason)}")
    end
  end

  defp parse_format(f) do
    case Enum.find(ElixirScope.Export.formats(), &(Atom.to_string(&1) == f)) do
      nil ->
        Mix.raise(
          "unknown format #{inspect(f)}; known: " <>
            Enum.map_join(ElixirScope.Export.formats(), ", ", &Atom.to_string/1)
        )

      fmt ->
        fmt
    end
  end

  defp parse_weight("own_time"), do: :own_time
  defp parse_weight("calls"), do: :calls
  defp parse_weight(w), do: Mix.raise("unknown weight #{inspect(w)}; known: own_time, calls")
end

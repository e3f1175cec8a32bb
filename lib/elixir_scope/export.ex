defmodule ElixirScope.Export do
  @moduledoc """
  Look at a trace in a timeline or flame-graph viewer: export a store
  (or trace files) to the Chrome Trace Event Format (Perfetto, Chrome's
  trace viewer), speedscope's file format, folded stacks (flamegraph.pl,
  inferno) or an SVG flame graph.

      {:ok, _} = ElixirScope.trace(MyApp, pids: :all)
      MyApp.run()
      {:ok, _} = ElixirScope.stop_trace()
      {:ok, _} = ElixirScope.Export.chrome_trace(:trace, "run.json")
      {:ok, _} = ElixirScope.Export.speedscope("run.estrace", "run.speedscope.json")

  Or from a shell: `mix elixir_scope.export run.estrace --format
  flamegraph -o run.svg`.

  ## What each format shows

  * `chrome_trace`: one track group per node, one track per Erlang
    process (named `<0.123.0> registered name or initial call`); every
    call a slice from call to return with its arguments, return value or
    exception as previews; sends, receives, spawns, exits, exceptions,
    links and state records as instant events; an arrow from each send to
    its receive (flow events `s`/`f`: the start binds to the call the send
    was made in, the end to the receiver's next call, the callback the
    message triggers). Timestamps are microseconds since the trace's
    oldest event, with nanosecond decimals.
  * `speedscope`: one evented profile per process with calls; the
    busiest process opens first.
  * `folded`: one line per distinct stack, `process;Mod.f/1;Mod.g/2
    weight`, weighted by own time in ns (`weight: :own_time`, default) or
    by calls (`weight: :calls`).
  * `flamegraph`: those stacks drawn as an SVG by the `inferno` crate,
    in this VM.

  Calls left open by a crash close with the outer call that returned
  (`end: "unwound"`), calls still open at the end close at the process's
  last event (`"unfinished"`), returns whose call is not in the store
  (evicted) span from the process's previous event (`"orphan"`); each is
  counted in the summary.

  ## Streaming and memory

  The native side reads the store in chunks of 4,096 events, each under
  the store's lock for a moment, renders it and writes it with the lock
  released: a pipeline keeps storing, and the output is never held in
  memory. The export holds the events stored when it started. Memory
  beyond the store: the open calls, a name per process and function, and
  for speedscope at most 8 MiB of per-process buffers (then spooled to an
  unlinked file next to the output); folded stacks keep one node per
  distinct stack (at most 2^20). The output is written to
  `PATH.partial-<os pid>-<n>`, synced and renamed over `path`: `path` is
  its old self or the complete export.
  """

  alias ElixirScope.{Args, Native, TraceFile}
  alias ElixirScope.Storage.DataAccess

  @formats [:chrome_trace, :speedscope, :folded, :flamegraph]
  @defaults [
    preview_bytes: 160,
    weight: :own_time,
    max_depth: 512,
    process_roots: true,
    title: nil,
    max_new_atoms: 10_000
  ]

  @type format :: :chrome_trace | :speedscope | :folded | :flamegraph
  @type source :: DataAccess.t() | GenServer.server() | :trace | Path.t() | [Path.t()]
  @type summary :: %{
          path: String.t(),
          format: format(),
          events: non_neg_integer(),
          calls: non_neg_integer(),
          unfinished: non_neg_integer(),
          unwound: non_neg_integer(),
          orphans: non_neg_integer(),
          instants: non_neg_integer(),
          flows: non_neg_integer(),
          processes: non_neg_integer(),
          nodes: non_neg_integer(),
          frames: non_neg_integer(),
          stacks: non_neg_integer(),
          untracked: non_neg_integer(),
          bytes: non_neg_integer()
        }

  @doc "The formats `export/4` writes."
  @spec formats() :: [format()]
  def formats, do: @formats

  @doc "Chrome Trace Event Format JSON (see the moduledoc); `export/4` with `:chrome_trace`."
  @spec chrome_trace(source(), Path.t(), keyword()) :: {:ok, summary()} | {:error, term()}
  def chrome_trace(source, path, opts \\ []), do: export(source, path, :chrome_trace, opts)

  @doc "speedscope JSON, one evented profile per process; `export/4` with `:speedscope`."
  @spec speedscope(source(), Path.t(), keyword()) :: {:ok, summary()} | {:error, term()}
  def speedscope(source, path, opts \\ []), do: export(source, path, :speedscope, opts)

  @doc "Folded stacks (`a;b;c weight`); `export/4` with `:folded`."
  @spec folded(source(), Path.t(), keyword()) :: {:ok, summary()} | {:error, term()}
  def folded(source, path, opts \\ []), do: export(source, path, :folded, opts)

  @doc "An SVG flame graph (inferno); `export/4` with `:flamegraph`."
  @spec flamegraph(source(), Path.t(), keyword()) :: {:ok, summary()} | {:error, term()}
  def flamegraph(source, path, opts \\ []), do: export(source, path, :flamegraph, opts)

  @doc """
  Exports `source` to `path` in `format` (one of `formats/0`).

  `source`: a `%DataAccess{}` store, a `PipelineManager` (pid or name),
  `:trace` (the current or last trace), or the path of a trace file (or a
  list of paths, merged) written by `ElixirScope.TraceFile.save/3`.

  | option | default | meaning |
  |---|---|---|
  | `:preview_bytes` | `160` | chrome_trace: longest argument, return, message preview (8..1048576) |
  | `:weight` | `:own_time` | folded, flamegraph: `:own_time` (ns) or `:calls` |
  | `:max_depth` | `512` | folded, flamegraph: deeper frames merge into one `…` frame |
  | `:process_roots` | `true` | folded, flamegraph: each stack starts with its process |
  | `:title` | the source | flamegraph title, speedscope file name |
  | `:max_new_atoms` | `10_000` | loading trace files (see `ElixirScope.TraceFile.load/2`) |

  `{:ok, summary}` (see `t:summary/0`: events read, calls by how they
  ended, instants, flows, processes, nodes, distinct functions, stacks
  or profiles written, bytes) or `{:error, {reason, details}}`: a posix
  name (`:eacces`, `:eisdir`, `:enoent`, `:enospc`, `:efbig`, ...) or a
  trace-file load error; `{:error, :no_trace}` / `{:error,
  :no_pipeline}` as `ElixirScope.TraceFile.save/3`. An unknown format,
  unknown options or bad values raise `ArgumentError`.
  """
  @spec export(source(), Path.t(), format(), keyword()) :: {:ok, summary()} | {:error, term()}
  def export(source, path, format, opts \\ []) do
    opts = Args.keyword_opts!(opts, @defaults, "ElixirScope.Export")

    unless format in @formats do
      raise ArgumentError,
            "unknown export format #{inspect(format)}; known: #{inspect(@formats)}"
    end

    path = Args.path!(path, "path")
    weight = opts[:weight]

    unless weight in [:own_time, :calls] do
      raise ArgumentError, "weight must be :own_time or :calls, got: #{inspect(weight)}"
    end

    preview = Args.int!(opts[:preview_bytes], 8..1_048_576, :preview_bytes)
    depth = Args.int!(opts[:max_depth], 1..65_536, :max_depth)

    unless is_boolean(opts[:process_roots]) do
      raise ArgumentError, "process_roots must be a boolean"
    end

    title = opts[:title]

    unless is_nil(title) or is_binary(title) do
      raise ArgumentError, "title must be a string or nil, got: #{inspect(title)}"
    end

    with {:ok, store, what} <- source_store(source, opts[:max_new_atoms]) do
      home = home_node(store)
      names = Enum.map(TraceFile.process_names(store), fn {p, n} -> {p, n} end)
      title = title || "ElixirScope: #{what}"

      case Native.export_file(
             store.ref,
             path,
             format,
             {weight, preview, depth, opts[:process_roots], title, home},
             names
           ) do
        {:ok, summary} ->
          {:ok, summary |> Map.put(:path, path) |> Map.put(:format, format)}

        {:error, {reason, details}} ->
          {:error, {reason, Map.put(details, :path, path)}}
      end
    end
  end

  defp source_store(path, atoms) when is_binary(path) do
    with {:ok, store} <- TraceFile.load(path, max_new_atoms: atoms),
         do: {:ok, store, Path.basename(path)}
  end

  defp source_store([p | _] = paths, atoms) when is_binary(p) do
    with {:ok, store} <- TraceFile.load(paths, max_new_atoms: atoms),
         do: {:ok, store, Enum.map_join(paths, ", ", &Path.basename/1)}
  end

  defp source_store(source, _atoms) do
    with {:ok, store, _trace} <- TraceFile.resolve_source(source) do
      what =
        case source do
          %DataAccess{name: n} when not is_nil(n) -> inspect(n)
          %DataAccess{} -> "store on #{node()}"
          :trace -> "trace on #{node()}"
          other -> inspect(other)
        end

      {:ok, store, what}
    end
  end

  # The node whose pids print as <0.N.S>: a loaded store's first file's,
  # else this node.
  defp home_node(%DataAccess{source: %{files: [%{node: n} | _]}}) when is_binary(n), do: n
  defp home_node(_), do: Atom.to_string(node())
end

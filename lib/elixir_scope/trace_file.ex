defmodule ElixirScope.TraceFile do
  @moduledoc """
  Keep a trace: save a store's events to a file, load files back into a
  store every `ElixirScope.Analysis` and `ElixirScope.Storage.DataAccess`
  query accepts, read a file's header.

      {:ok, _} = ElixirScope.trace(MyApp, pids: :all)
      MyApp.run()
      {:ok, _} = ElixirScope.stop_trace()
      {:ok, %{events: n}} = ElixirScope.TraceFile.save(:trace, "run.estrace")

      # later, on another machine
      {:ok, store} = ElixirScope.TraceFile.load("run.estrace")
      ElixirScope.Analysis.call_stat(store: store)

  ## What a file holds

  Every stored record — header fields, payload, correlation fields and
  links (late links as the event's current correlation id) — plus the node
  and VM that wrote it, its clocks, the store's bounds and counters, and
  metadata: for a trace, its options and counters (`trace_status/0`), and
  the `:metadata` you pass. Process names (registered names, else initial
  calls) of the processes alive at save time are kept for the exporters
  (`ElixirScope.Export`). The format is our own, versioned and documented
  in the README (a header block, then checksummed, compressed blocks that
  are read one at a time).

  ## Saving

  The native side scans the store in chunks, holding its lock for each
  chunk only (a few hundred microseconds), and compresses and writes with
  the lock released: the store is never copied and a pipeline keeps
  storing. The file holds the events stored when the save started; those
  evicted before the scan reached them are counted (`skipped`). The file
  is written next to `path` as `PATH.partial-<os pid>-<n>`, synced, then
  renamed over `path`: `path` is the old file or the complete new one. A
  save killed midway leaves the partial file, which loads up to its last
  complete block.

  ## Loading

  Everything read is checked (block checksums, lengths against the file
  size, every field, term and symbol) before it is used: a truncated,
  corrupted, wrong-version or hostile file gives `{:error, {reason,
  details}}` naming the problem and the block's byte offset, never a
  crash. Memory: a block never decompresses beyond 16 MiB or 64× its
  stored size. Words are mapped back by name: atoms that exist are used,
  missing ones are created — at most `:max_new_atoms` per load (default
  #{10_000}) and #{100_000} over the life of the VM (then
  `{:error, {:too_many_atoms, _}}`); `max_new_atoms: 0` accepts only
  existing atoms. Pids come back as this VM's own processes only in the
  VM instance that saved them; elsewhere they are foreign pids that print
  and compare as distinct processes (a pid of another run of this node
  gets creation + 1). Several files merge into one store in timestamp
  order; files whose ids overlap get their ids moved (see the README).
  """

  import Bitwise, only: [<<<: 2]

  alias ElixirScope.{Args, Native}
  alias ElixirScope.Capture.PipelineManager
  alias ElixirScope.Storage.DataAccess

  @save_defaults [
    compression: :zstd,
    level: 1,
    block_events: 16_384,
    sync: true,
    metadata: nil,
    process_names: true
  ]
  @load_defaults [max_events: nil, strict: false, max_new_atoms: 10_000, name: nil]

  @type reason :: atom()
  @type details :: %{
          optional(:path) => String.t(),
          offset: non_neg_integer(),
          block: non_neg_integer() | nil,
          file: non_neg_integer(),
          detail: String.t()
        }
  @type error :: {:error, {reason(), details()}}

  @doc """
  Saves the events of `source` to `path`.

  `source`: a `%DataAccess{}` store, a `PipelineManager` (pid or name), or
  `:trace` (the current or last trace's store, with its options and
  counters in the metadata).

  | option | default | meaning |
  |---|---|---|
  | `:compression` | `:zstd` | `:zstd`, `:lz4` or `:none` (see the README's measurements) |
  | `:level` | `1` | zstd level, -7..19 |
  | `:block_events` | `16_384` | events per block |
  | `:sync` | `true` | fsync before renaming into place |
  | `:metadata` | `nil` | any term, kept in the header |
  | `:process_names` | `true` | record names of the live processes in the trace |

  Returns `{:ok, %{path, events, skipped, blocks, bytes, symbols,
  raw_event_bytes}}` or `{:error, {reason, details}}` with `reason` a
  posix name (`:eacces`, `:eisdir`, `:enospc`, `:enoent`, ...),
  `:no_trace` (nothing traced yet), `:no_pipeline` (not a running
  `PipelineManager`) or `:metadata_too_large`. Bad
  arguments raise `ArgumentError`.
  """
  @spec save(DataAccess.t() | GenServer.server() | :trace, Path.t(), keyword()) ::
          {:ok, map()} | error() | {:error, :no_trace | :no_pipeline | :metadata_too_large}
  def save(source, path, opts \\ []) do
    opts = Args.keyword_opts!(opts, @save_defaults, "ElixirScope.TraceFile.save/3")
    path = Args.path!(path, "path")
    compression = opts[:compression]

    unless compression in [:zstd, :lz4, :none] do
      raise ArgumentError,
            "compression must be :zstd, :lz4 or :none, got: #{inspect(compression)}"
    end

    level = Args.int!(opts[:level], -7..19, :level)
    block_events = Args.int!(opts[:block_events], 1..1_048_576, :block_events)

    with {:ok, store, trace} <- resolve(source) do
      names = if opts[:process_names], do: process_names(store), else: []

      metadata = %{
        trace: trace,
        metadata: opts[:metadata],
        saved_at: DateTime.utc_now()
      }

      header = {
        Atom.to_string(node()),
        System.os_time(:nanosecond),
        System.time_offset(:nanosecond),
        "elixir_scope #{Application.spec(:elixir_scope, :vsn)}",
        System.otp_release(),
        metadata
      }

      case Native.tf_save(
             store.ref,
             path,
             header,
             names,
             compression,
             level,
             block_events,
             opts[:sync] == true
           ) do
        {:ok, summary} -> {:ok, Map.put(summary, :path, path)}
        {:error, {reason, details}} -> {:error, {reason, Map.put(details, :path, path)}}
        {:error, _} = e -> e
      end
    end
  end

  @doc """
  Loads one file or a list of files into a new read-only `%DataAccess{}`
  store (several files are merged, see the moduledoc).

  | option | default | meaning |
  |---|---|---|
  | `:max_events` | every event | the store's bound (the oldest beyond it are evicted, counted) |
  | `:strict` | `false` | refuse a cut-short file (`{:error, {:incomplete, _}}`) instead of loading its complete blocks |
  | `:max_new_atoms` | `10_000` | atoms this load may create (0: existing atoms only) |
  | `:name` | `nil` | the store's name |

  `{:ok, store}`; `store.source` tells what was loaded: `files` (per file:
  `path`, `node`, `events`, `complete`, `truncated_at`, `lost_bytes`,
  `id_shift`, `ts_shift`, the header fields and `metadata`), `events`,
  `stored`, `duplicates`, `atoms_created`, `foreign_processes`, and
  `notes` (a line per file that was cut short or moved). Errors:
  `{:error, {reason, %{path, offset, block, detail}}}` with `reason` one
  of `:not_a_trace_file`, `:unsupported_version`, `:truncated`,
  `:bad_block`, `:checksum_mismatch`, `:decompress_failed`,
  `:malformed_block`, `:bad_symbol`, `:bad_term`, `:too_many_atoms`,
  `:incomplete`, or a posix name.
  """
  @spec load(Path.t() | [Path.t()], keyword()) :: {:ok, DataAccess.t()} | error()
  def load(path_or_paths, opts \\ []) do
    opts = Args.keyword_opts!(opts, @load_defaults, "ElixirScope.TraceFile.load/2")
    paths = paths!(path_or_paths)
    max = opts[:max_events]

    unless is_nil(max) or (is_integer(max) and max in 1..(1 <<< 29)) do
      raise ArgumentError,
            "max_events must be nil or an integer in 1..#{1 <<< 29}, got: #{inspect(max)}"
    end

    atoms = Args.int!(opts[:max_new_atoms], 0..100_000, :max_new_atoms)

    case Native.tf_load(paths, max || 0, opts[:strict] == true, atoms) do
      {:ok, ref, report} ->
        files =
          report.files
          |> Enum.zip(paths)
          |> Enum.map(fn {f, p} -> Map.put(f, :path, p) end)

        source = report |> Map.put(:files, files) |> Map.put(:notes, notes(files))
        stats = Native.store_stats(ref)

        {:ok,
         %DataAccess{ref: ref, max_events: stats.max_events, name: opts[:name], source: source}}

      {:error, {reason, details}} ->
        {:error, {reason, Map.put(details, :path, Enum.at(paths, details.file))}}
    end
  end

  @doc """
  Reads a file's header (and its trailer, at the end of the file; nothing
  in between): `{:ok, %{version, node, vm_id, saved_at_ns,
  time_offset_ns, writer, otp, compression, block_events, store,
  metadata, bytes, complete, events, skipped, blocks, first_timestamp,
  last_timestamp, path}}` (`events`... are nil when the file has no
  trailer) or an error as `load/2`'s. Atoms of the metadata are mapped
  as by `load/2` (`max_new_atoms:` option).
  """
  @spec info(Path.t(), keyword()) :: {:ok, map()} | error()
  def info(path, opts \\ []) do
    opts = Args.keyword_opts!(opts, [max_new_atoms: 10_000], "ElixirScope.TraceFile.info/2")
    path = Args.path!(path, "path")
    atoms = Args.int!(opts[:max_new_atoms], 0..100_000, :max_new_atoms)

    case Native.tf_info(path, atoms) do
      {:ok, info} -> {:ok, Map.put(info, :path, path)}
      {:error, {reason, details}} -> {:error, {reason, Map.put(details, :path, path)}}
    end
  end

  @doc """
  `{atoms created by trace-file loads in this VM so far, their bound}`.
  """
  @spec atom_budget() :: {non_neg_integer(), pos_integer()}
  def atom_budget do
    {created, bound, _vm} = Native.tf_limits()
    {created, bound}
  end

  @doc """
  Names of the processes in `store`: those its files held (a store loaded
  by `load/2`), and for live local processes their registered name, else
  their initial call (`$initial_call`, then `:initial_call`). What `save/3`
  records and the exporters show.
  """
  @spec process_names(DataAccess.t()) :: [{pid(), String.t()}]
  def process_names(%DataAccess{ref: ref}) do
    kept = Native.tf_names(ref)
    known = Map.new(kept)

    live =
      for pid <- Native.tf_store_pids(ref),
          not Map.has_key?(known, pid),
          node(pid) == node(),
          name = live_name(pid),
          do: {pid, name}

    kept ++ live
  end

  def process_names(other),
    do: raise(ArgumentError, "expected a %DataAccess{} store, got: #{inspect(other, limit: 5)}")

  defp live_name(pid) do
    case Process.info(pid, [:registered_name, :dictionary, :initial_call]) do
      nil ->
        nil

      info ->
        cond do
          is_atom(info[:registered_name]) and info[:registered_name] not in [nil, []] ->
            inspect(info[:registered_name])

          match?({_, _, _}, info[:dictionary][:"$initial_call"]) ->
            mfa(info[:dictionary][:"$initial_call"])

          match?({_, _, _}, info[:initial_call]) ->
            mfa(info[:initial_call])

          true ->
            nil
        end
    end
  end

  defp mfa({m, f, a}) when is_integer(a), do: Exception.format_mfa(m, f, a)
  defp mfa({m, f, a}), do: Exception.format_mfa(m, f, length(a))

  defp notes(files) do
    Enum.flat_map(files, fn f ->
      cut =
        if f.complete,
          do: [],
          else: [
            "#{f.path}: cut short at byte #{f.truncated_at} (#{f.lost_bytes} bytes after " <>
              "the last complete block ignored; #{f.events} events loaded)"
          ]

      moved =
        if f.id_shift > 0,
          do: ["#{f.path}: ids overlap an earlier file's, moved up by #{f.id_shift}"],
          else: []

      clock =
        if f.ts_shift != 0,
          do: ["#{f.path}: another VM's clock, timestamps moved by #{f.ts_shift} ns"],
          else: []

      cut ++ moved ++ clock
    end)
  end

  @doc false
  # The store and trace metadata behind a `save/3` source (shared with
  # `ElixirScope.Export`).
  @spec resolve_source(term()) ::
          {:ok, DataAccess.t(), map() | nil} | {:error, :no_trace | :no_pipeline}
  def resolve_source(source), do: resolve(source)

  defp resolve(:trace) do
    case ElixirScope.trace_store() do
      nil ->
        {:error, :no_trace}

      store ->
        {:ok, store, trace_metadata()}
    end
  end

  defp resolve(%DataAccess{} = store) do
    trace = if store == ElixirScope.trace_store(), do: trace_metadata(), else: nil
    {:ok, store, trace}
  end

  defp resolve(pm) when is_pid(pm) or (is_atom(pm) and pm not in [nil, true, false]) do
    pid = if is_atom(pm), do: Process.whereis(pm), else: pm

    if pipeline_manager?(pid) do
      {:ok, PipelineManager.data_access(pid), nil}
    else
      {:error, :no_pipeline}
    end
  end

  defp resolve(other) do
    raise ArgumentError,
          "source must be a %DataAccess{}, a PipelineManager or :trace, got: #{inspect(other)}"
  end

  # A live local PipelineManager supervisor (checked before calling it).
  defp pipeline_manager?(pid) when is_pid(pid) and node(pid) == node() do
    case Process.info(pid, :dictionary) do
      {:dictionary, d} -> d[:"$initial_call"] == {:supervisor, PipelineManager, 1}
      nil -> false
    end
  end

  defp pipeline_manager?(_), do: false

  defp trace_metadata do
    ElixirScope.trace_status() |> Map.drop([:pipeline, :store])
  rescue
    ArgumentError -> nil
  end

  defp paths!([]), do: raise(ArgumentError, "paths must name at least one file")

  defp paths!([first | _] = paths) when is_list(paths) and not is_integer(first),
    do: Enum.map(paths, &Args.path!(&1, "each path"))

  defp paths!(path), do: [Args.path!(path, "path")]
end

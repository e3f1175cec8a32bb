defmodule ElixirScope.ClusterHelpers do
  @moduledoc false
  # Multi-node tests: makes the test VM a distributed node on loopback
  # (starting `epmd` first) and starts peer nodes with OTP's `:peer`, on
  # 127.0.0.1 only, with unique names and this project's code path (so the
  # beam files and the NIF are there), or without the project (a node
  # missing the library). Compiled only in the :test env.

  @doc """
  `:ok` when this machine can run Erlang distribution on loopback, else
  `{:error, why}` (checked once, before the cluster tests are defined).
  """
  def distribution_available do
    cond do
      System.find_executable("epmd") == nil -> {:error, "no epmd executable on PATH"}
      true -> :ok
    end
  end

  @doc """
  Makes this VM distributed (longnames on 127.0.0.1); returns whether it
  started distribution (and so should stop it again).
  """
  def start_distribution! do
    if Node.alive?() do
      false
    else
      {_, 0} = System.cmd("epmd", ["-daemon"], stderr_to_stdout: true)
      Application.put_env(:kernel, :prevent_overlapping_partitions, false)
      name = :"es_test_#{:os.getpid()}_#{System.unique_integer([:positive])}@127.0.0.1"
      wait_start(name, 50)
      true
    end
  end

  # epmd may need a moment after `-daemon` returns.
  defp wait_start(name, 0), do: raise("could not start distribution as #{name}")

  defp wait_start(name, n) do
    case :net_kernel.start([name, :longnames]) do
      {:ok, _} ->
        :ok

      {:error, _} ->
        Process.sleep(100)
        wait_start(name, n - 1)
    end
  end

  def stop_distribution!(true), do: :net_kernel.stop()
  def stop_distribution!(false), do: :ok

  @doc """
  Starts a peer node named after `tag`; `with_library: false` leaves this
  project's code off its path (Elixir itself stays); `name:` names it
  (the part before `@`). `{peer, node}`. The
  peer is linked to the calling process.
  """
  def start_peer(tag, opts \\ []) do
    lib? = Keyword.get(opts, :with_library, true)

    paths =
      :code.get_path()
      |> Enum.map(&List.to_string/1)
      |> Enum.reject(&String.starts_with?(&1, List.to_string(:code.root_dir())))
      |> Enum.reject(fn p -> not lib? and String.contains?(p, "/lib/elixir_scope/") end)

    # No global name mesh between the test nodes: nodes stopped or
    # killed on purpose must not make `global` cut others off.
    args =
      Enum.flat_map(paths, &[~c"-pa", String.to_charlist(&1)]) ++
        [~c"-setcookie", Atom.to_charlist(Node.get_cookie())] ++
        [~c"-connect_all", ~c"false", ~c"-kernel", ~c"prevent_overlapping_partitions", ~c"false"]

    name =
      Keyword.get_lazy(opts, :name, fn ->
        :"es_#{tag}_#{:os.getpid()}_#{System.unique_integer([:positive])}"
      end)

    {:ok, peer, node} =
      :peer.start_link(%{name: name, host: ~c"127.0.0.1", longnames: true, args: args})

    {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:elixir])
    if lib?, do: {:ok, _} = :erpc.call(node, Application, :ensure_all_started, [:elixir_scope])
    {peer, node}
  end

  @doc """
  The cluster test modules' `setup_all`: makes this VM distributed,
  starts the app, sets a long `cluster_query_timeout` (the machine may be
  loaded) and starts one peer per tag, linked to a keeper process of its
  own so the peers outlive single tests. On exit everything is undone and
  the cluster forgotten, so later tests' analysis reads this node's
  store. Returns `[{peer, node}]` in the order of `tags`.
  """
  def start_cluster!(tags) do
    started? = start_distribution!()
    {:ok, _} = Application.ensure_all_started(:elixir_scope)
    Application.put_env(:elixir_scope, :cluster_query_timeout, 120_000)
    me = self()

    keeper =
      spawn(fn ->
        send(me, {:peers, self(), Enum.map(tags, &start_peer/1)})

        receive do
          :stop -> :ok
        end
      end)

    peers =
      receive do
        {:peers, ^keeper, peers} -> peers
      after
        60_000 -> raise "peers did not start"
      end

    ExUnit.Callbacks.on_exit(fn ->
      Application.delete_env(:elixir_scope, :cluster_query_timeout)
      send(keeper, :stop)
      Enum.each(peers, fn {peer, _} -> stop_peer(peer) end)
      stop_distribution!(started?)
      ElixirScope.Cluster.forget()
    end)

    peers
  end

  def stop_peer(peer) do
    :peer.stop(peer)
  catch
    :exit, _ -> :ok
  end

  @doc "Waits until `fun.()` is truthy (polling), up to `ms`; returns its value."
  def eventually(fun, ms \\ 10_000) do
    deadline = System.monotonic_time(:millisecond) + ms
    do_eventually(fun, deadline)
  end

  defp do_eventually(fun, deadline) do
    case fun.() do
      v when v not in [nil, false] ->
        v

      _ ->
        if System.monotonic_time(:millisecond) > deadline,
          do: raise("condition not met in time"),
          else: Process.sleep(20)

        do_eventually(fun, deadline)
    end
  end
end

defmodule ElixirScope.Cluster.Clock do
  @moduledoc """
  Clock offsets between this node and the others of a cluster trace.

  Every node stamps its events with its own monotonic clock
  (`System.monotonic_time(:nanosecond)`), and the monotonic clocks of two
  VMs differ by an arbitrary constant (and drift slowly). `sample/3` pings
  a node over Erlang distribution: this node reads its clock (t0), asks
  the node for its clock (r) and reads its own again (t1). The round trip
  is `t1 - t0`; the node's offset is `r - (t0 + t1) / 2`, wrong by at most
  half the round trip (the remote read happened somewhere between t0 and
  t1). Of `n` pings the one with the smallest round trip is kept: its
  error bound is the tightest.

  A node's event at its time `t` happened at `t - offset` on this node's
  clock. With a sample at the start and one at the stop of a trace,
  `to_local/2` interpolates the offset linearly between them (drift), and
  the error bound is the larger of the two.
  """

  @typedoc """
  `offset_ns`: the node's clock minus this node's; `error_ns`: the bound
  on its error (half the smallest round trip); `rtt_ns`: that round trip;
  `samples`: pings made; `at`: this node's time of the kept sample;
  `remote_at`: the node's time then.
  """
  @type sample :: %{
          offset_ns: integer(),
          error_ns: non_neg_integer(),
          rtt_ns: non_neg_integer(),
          samples: pos_integer(),
          at: integer(),
          remote_at: integer()
        }

  @doc """
  Estimates `node`'s clock offset from `n` pings (default 16), each with
  `timeout` ms. `{:ok, sample}` or `{:error, reason}` (the node did not
  answer). This node's own offset is 0 with error 0.
  """
  @spec sample(node(), pos_integer(), timeout()) :: {:ok, sample()} | {:error, term()}
  def sample(node, n \\ 16, timeout \\ 5_000)

  def sample(node, n, _timeout) when node == node() do
    t = now()
    {:ok, %{offset_ns: 0, error_ns: 0, rtt_ns: 0, samples: n, at: t, remote_at: t}}
  end

  def sample(node, n, timeout) when is_atom(node) and is_integer(n) and n > 0 do
    Enum.reduce_while(1..n, nil, fn _, best ->
      t0 = now()

      case ping(node, timeout) do
        {:ok, r} ->
          t1 = now()
          rtt = t1 - t0
          mid = t0 + div(rtt, 2)

          s = %{
            offset_ns: r - mid,
            error_ns: div(rtt + 1, 2),
            rtt_ns: rtt,
            samples: n,
            at: mid,
            remote_at: r
          }

          {:cont, if(best == nil or rtt < best.rtt_ns, do: s, else: best)}

        {:error, _} = err ->
          {:halt, err}
      end
    end)
    |> case do
      {:error, _} = err -> err
      s -> {:ok, s}
    end
  end

  @doc """
  Samples every node of `nodes` at once (one process per node); `%{node =>
  {:ok, sample} | {:error, reason}}`, within about `timeout` ms per ping.
  """
  @spec sample_all([node()], pos_integer(), timeout()) :: %{node() => term()}
  def sample_all(nodes, n \\ 16, timeout \\ 5_000) do
    nodes
    |> Enum.map(fn node -> {node, Task.async(fn -> sample(node, n, timeout) end)} end)
    |> Enum.map(fn {node, task} ->
      case Task.yield(task, n * timeout + 1_000) || Task.shutdown(task, :brutal_kill) do
        {:ok, result} -> {node, result}
        _ -> {node, {:error, :timeout}}
      end
    end)
    |> Map.new()
  end

  @doc """
  This node's time of a node's time `t`, given the node's clock samples
  (`%{start: sample | nil, stop: sample | nil}`, or one sample). With both,
  the offset is interpolated linearly in the node's time (and held
  constant outside the two samples); with one, that one's offset; with
  none, `t` unchanged.
  """
  @spec to_local(integer(), map() | sample() | nil) :: integer()
  def to_local(t, %{offset_ns: off}), do: t - off
  def to_local(t, %{start: %{} = a, stop: %{} = b}), do: t - offset_at(t, a, b)
  def to_local(t, %{start: %{} = a}), do: to_local(t, a)
  def to_local(t, %{stop: %{} = b}), do: to_local(t, b)
  def to_local(t, _), do: t

  @doc "The node's time of this node's time `t` (the inverse of `to_local/2`)."
  @spec to_remote(integer(), map() | sample() | nil) :: integer()
  def to_remote(t, %{offset_ns: off}), do: t + off

  def to_remote(t, %{start: %{} = a, stop: %{} = b}) do
    # Two steps are exact enough: the offset changes by ns over seconds.
    guess = t + a.offset_ns
    t + offset_at(guess, a, b)
  end

  def to_remote(t, %{start: %{} = a}), do: to_remote(t, a)
  def to_remote(t, %{stop: %{} = b}), do: to_remote(t, b)
  def to_remote(t, _), do: t

  @doc "The error bound of a node's corrected times (the larger sample error)."
  @spec error_ns(map() | nil) :: non_neg_integer() | nil
  def error_ns(%{offset_ns: _, error_ns: e}), do: e

  def error_ns(%{} = clocks) do
    [clocks[:start], clocks[:stop]]
    |> Enum.filter(&is_map/1)
    |> Enum.map(& &1.error_ns)
    |> Enum.max(fn -> nil end)
  end

  def error_ns(_), do: nil

  defp offset_at(t, a, b) do
    span = b.remote_at - a.remote_at

    cond do
      span <= 0 or t <= a.remote_at -> a.offset_ns
      t >= b.remote_at -> b.offset_ns
      true -> a.offset_ns + div((b.offset_ns - a.offset_ns) * (t - a.remote_at), span)
    end
  end

  defp ping(node, timeout) do
    {:ok, :erpc.call(node, :erlang, :monotonic_time, [:nanosecond], timeout)}
  catch
    :error, {:erpc, reason} -> {:error, reason}
    kind, reason -> {:error, {kind, reason}}
  end

  defp now, do: :erlang.monotonic_time(:nanosecond)
end

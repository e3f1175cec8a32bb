defmodule ElixirScope.Cluster.Clock do
  @moduledoc """
  Clock offsets between this node and the others of a cluster trace.

  Every node stamps its events with its own monotonic clock (the native
  one events are stamped with, `ElixirScope.Utils.monotonic_timestamp/0`,
  which follows `System.monotonic_time(:nanosecond)`), and the monotonic
  clocks of two VMs differ by an arbitrary constant (and drift slowly).
  `sample/3` pings a node over Erlang distribution, reading that same
  clock: this node reads its clock (t0), asks the node for its clock (r)
  and reads its own again (t1). The round trip
  is `t1 - t0`; the node's offset is `r - (t0 + t1) / 2`, wrong by at most
  half the round trip (the remote read happened somewhere between t0 and
  t1). Of `n` pings the one with the smallest round trip is kept: its
  error bound is the tightest.

  A node's event at its time `t` happened at `t - offset` on this node's
  clock, within the error bound. A trace samples every node at its start
  and at its stop; `best/1` picks the one its times are corrected with.
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
  The sample a node's times are corrected with, of its clock samples
  (`%{start: sample | nil, stop: sample | nil}`): the one with the smaller
  error bound (the start one while the trace runs). One offset per node,
  so `to_local/2` and `to_remote/2` are exact inverses; the drift between
  the two samples is reported (`stop.offset_ns - start.offset_ns`), not
  interpolated.
  """
  @spec best(map() | nil) :: sample() | nil
  def best(%{offset_ns: _} = sample), do: sample
  def best(%{start: %{} = a, stop: %{} = b}), do: if(b.error_ns < a.error_ns, do: b, else: a)
  def best(%{start: %{} = a}), do: a
  def best(%{stop: %{} = b}), do: b
  def best(_), do: nil

  @doc "This node's time of a node's time `t` (unchanged without a sample)."
  @spec to_local(integer(), map() | nil) :: integer()
  def to_local(t, clocks) do
    case best(clocks) do
      %{offset_ns: off} -> t - off
      nil -> t
    end
  end

  @doc "The node's time of this node's time `t` (the inverse of `to_local/2`)."
  @spec to_remote(integer(), map() | nil) :: integer()
  def to_remote(t, clocks) do
    case best(clocks) do
      %{offset_ns: off} -> t + off
      nil -> t
    end
  end

  @doc """
  How far a node's corrected times may be off during the trace: the
  larger sample error plus how much the offset moved between the start
  and the stop samples (0 with one sample; nil with none). Cross-node
  matching allows this much.
  """
  @spec bound_ns(map() | nil) :: non_neg_integer() | nil
  def bound_ns(%{start: %{} = a, stop: %{} = b}),
    do: max(a.error_ns, b.error_ns) + abs(b.offset_ns - a.offset_ns)

  def bound_ns(clocks), do: error_ns(clocks)

  @doc "The error bound of a node's corrected times (that of `best/1`), or nil."
  @spec error_ns(map() | nil) :: non_neg_integer() | nil
  def error_ns(clocks) do
    case best(clocks) do
      %{error_ns: e} -> e
      nil -> nil
    end
  end

  defp ping(node, timeout) do
    {:ok, :erpc.call(node, ElixirScope.Native, :utils_monotonic_ns, [], timeout)}
  catch
    :error, {:erpc, reason} -> {:error, reason}
    kind, reason -> {:error, {kind, reason}}
  end

  defp now, do: ElixirScope.Native.utils_monotonic_ns()
end

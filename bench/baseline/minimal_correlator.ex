defmodule ElixirScope.Bench.MinimalCorrelator do
  @moduledoc """
  The smallest pure-Elixir correlator worth comparing `EventCorrelator`
  against: a map of per-pid call stacks and a map of message FIFOs, one
  result tuple per event. It depends on nothing but OTP and Elixir's stdlib,
  so a bench script can `Code.require_file/1` it.

  It does less than the native correlator: returns complete the top frame
  (their correlation id is not consulted), nothing is bounded or expired,
  and no metadata is kept. Ids of any shape are used as given.

  Results, in order:

    * call: `{:function_call, id, parent_id, root_id}`
    * return: `{:function_return, call_id, parent_id, root_id}`
      (`{:function_return, id, nil, nil}` on an empty stack)
    * send: `{:message_send, id}`
    * receive: `{:message_receive, send_id}` (`{:message_receive, id}` when
      no identical send to that process is waiting)
    * anything else: `{:unknown, id}`
  """

  alias ElixirScope.Events.{FunctionExecution, MessageEvent}

  @type t :: %{stacks: map(), fifos: map()}

  @doc "An empty correlator state."
  @spec new() :: t()
  def new, do: %{stacks: %{}, fifos: %{}}

  @doc "Correlates `events` in order: `{results, state}`."
  @spec correlate(t(), [term()]) :: {[tuple()], t()}
  def correlate(%{stacks: stacks, fifos: fifos}, events) do
    {out, stacks, fifos} = loop(events, stacks, fifos, [])
    {out, %{stacks: stacks, fifos: fifos}}
  end

  defp loop([], stacks, fifos, acc), do: {:lists.reverse(acc), stacks, fifos}

  defp loop([ev | rest], stacks, fifos, acc) do
    case ev do
      %FunctionExecution{event_type: :call, id: id, caller_pid: pid} ->
        {r, stack} =
          case stacks do
            %{^pid => [{parent, root} | _] = stack} ->
              {{:function_call, id, parent, root}, [{id, root} | stack]}

            _ ->
              {{:function_call, id, nil, id}, [{id, id}]}
          end

        loop(rest, Map.put(stacks, pid, stack), fifos, [r | acc])

      %FunctionExecution{event_type: :return, id: id, caller_pid: pid} ->
        case stacks do
          %{^pid => [{call, root} | up]} ->
            parent =
              case up do
                [{p, _} | _] -> p
                [] -> nil
              end

            loop(rest, Map.put(stacks, pid, up), fifos, [
              {:function_return, call, parent, root} | acc
            ])

          _ ->
            loop(rest, stacks, fifos, [{:function_return, id, nil, nil} | acc])
        end

      %MessageEvent{event_type: :send, id: id, to_pid: to, message: msg} ->
        key = {to, :erlang.phash2(msg)}
        q = Map.get(fifos, key, :queue.new())

        loop(rest, stacks, Map.put(fifos, key, :queue.in(id, q)), [{:message_send, id} | acc])

      %MessageEvent{event_type: :receive, id: id, to_pid: to, message: msg} ->
        key = {to, :erlang.phash2(msg)}

        case fifos do
          %{^key => q} ->
            case :queue.out(q) do
              {{:value, send_id}, q} ->
                loop(rest, stacks, Map.put(fifos, key, q), [{:message_receive, send_id} | acc])

              {:empty, _} ->
                loop(rest, stacks, fifos, [{:message_receive, id} | acc])
            end

          _ ->
            loop(rest, stacks, fifos, [{:message_receive, id} | acc])
        end

      other ->
        loop(rest, stacks, fifos, [{:unknown, Map.get(other, :id)} | acc])
    end
  end
end

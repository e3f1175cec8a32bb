defmodule ElixirScope.Analysis.Entry do
  @moduledoc """
  One stored event as `ElixirScope.Analysis` returns it.

  | field | meaning |
  |---|---|
  | `id` | event id (increasing in capture order) |
  | `type` | `:call`, `:return`, `:exception`, `:send`, `:receive`, `:spawn`, `:exit`, `:link`, `:unlink`, `:state_change`, `:state_snapshot`, or `:event` (anything else) |
  | `pid` | the process the event belongs to (for `:spawn`, the new process) |
  | `timestamp` | monotonic time, ns (`System.monotonic_time(:nanosecond)`) |
  | `module`, `function`, `arity` | the function (`arity` on calls) |
  | `data` | call: the arguments (nil with `payload: :arity`); return: the value; exception: `{class, reason}`; send / receive: the message; exit: the reason; state change: `{old, new}`; state snapshot: the state; `:event`: the stored event struct |
  | `peer` | send: the receiver; spawn: the parent; link / unlink: the other process |
  | `call_id` | call: its own id; return / exception: the call it completes; anything else: the call it happened in (nil if none) |
  | `parent_id` | the enclosing call (for a call: its caller; for a return: its call's caller) |
  | `link_id` | receive: the send it was matched to; an OTP callback's call or return: the event that triggered the callback (see `ElixirScope.Analysis.State`) |
  | `duration_ns` | return / exception: time since its call |
  | `truncated` | part of `data` was bigger than its cap and holds a truncation marker |

  Values that were bigger than the trace's `:max_payload_bytes` (states,
  exception values and exit reasons: `:max_state_bytes`) hold a
  truncation marker `{:truncated, at_least_bytes, kind}` in their place,
  and `truncated` is true.
  """

  defstruct [
    :id,
    :type,
    :pid,
    :timestamp,
    :module,
    :function,
    :arity,
    :data,
    :peer,
    :call_id,
    :parent_id,
    :link_id,
    :duration_ns,
    truncated: false
  ]

  @type t :: %__MODULE__{
          id: pos_integer(),
          type: atom(),
          pid: pid() | nil,
          timestamp: integer(),
          module: module() | nil,
          function: atom() | nil,
          arity: non_neg_integer() | nil,
          data: term(),
          peer: pid() | port() | nil,
          call_id: pos_integer() | nil,
          parent_id: pos_integer() | nil,
          link_id: pos_integer() | nil,
          duration_ns: integer() | nil,
          truncated: boolean()
        }
end

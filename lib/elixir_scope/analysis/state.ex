defmodule ElixirScope.Analysis.State do
  @moduledoc """
  One state of a process, as `ElixirScope.Analysis.state_at/3` and
  `ElixirScope.Analysis.state_history/2` return it: the state a *state
  record* put in force, with the callback and message behind it.

  A state record is the return of a traced OTP callback (`init/1`,
  `handle_call/3`, `handle_cast/2`, `handle_info/2`, `handle_continue/2`,
  `code_change/3`, `terminate/2`, a gen_statem state function or
  `handle_event/4`, ...), a snapshot (`state: :snapshot` at trace start,
  `Ingestor.ingest_state_snapshot/4` or a `%StateSnapshot{}` written to a
  ring), or a state change (`Ingestor.ingest_state_change/4`).

  | field | meaning |
  |---|---|
  | `id` | the state record's event id (`Analysis.get/2`, `Analysis.why/2`) |
  | `pid`, `timestamp`, `wall_time` | the process; when the record was written (monotonic ns, wall-clock ns) |
  | `kind` | `:callback`, `:snapshot` or `:state_change` |
  | `module` | the callback module (callbacks, snapshots of the tracer) |
  | `callback` | `{module, function, arity}` of the callback, nil otherwise |
  | `state` | the state in force from then on (a gen_statem's data); nil when unknown |
  | `name` | a gen_statem's state name (nil for a gen_server) |
  | `kept` | the record kept the state in force (`:keep_state_and_data`, `terminate/2`, a `:stop` without state) |
  | `source_id` | the record that set `state` (itself unless `kept`); nil when unknown (evicted) |
  | `returned` | the callback's result tag (`:reply`, `:noreply`, `:ok`, `:stop`, `:next_state`, ...) |
  | `reply` | the reply of a `handle_call/3` (or gen_statem `:stop_and_reply`) |
  | `actions` | what else it asked for: a timeout, `:hibernate`, `{:continue, term}`, gen_statem actions |
  | `stop` | the stop reason, when it asked to stop |
  | `call_id` | the callback's call (a snapshot's or state change's enclosing call) |
  | `trigger_id` | the event that triggered the callback: the receive of its message, else the previous state record (a continue, a timeout), or the process's spawn for `init/1` |
  | `trigger` | the triggering message (`{:"$gen_call", from, request}`, `{:"$gen_cast", request}`, or the message of `handle_info/2`) |
  | `truncated` | part of the state (or of the record) was bigger than `max_state_bytes` and is replaced by a `{:truncated, at_least_bytes, kind}` marker: never a value it did not have |
  """

  defstruct [
    :id,
    :pid,
    :timestamp,
    :wall_time,
    :kind,
    :module,
    :callback,
    :state,
    :name,
    :kept,
    :source_id,
    :returned,
    :reply,
    :actions,
    :stop,
    :call_id,
    :trigger_id,
    :trigger,
    :truncated
  ]

  @type t :: %__MODULE__{
          id: pos_integer(),
          pid: pid(),
          timestamp: integer(),
          wall_time: integer(),
          kind: :callback | :snapshot | :state_change,
          module: module() | nil,
          callback: mfa() | nil,
          state: term(),
          name: term(),
          kept: boolean(),
          source_id: pos_integer() | nil,
          returned: atom() | nil,
          reply: term(),
          actions: term(),
          stop: term(),
          call_id: pos_integer() | nil,
          trigger_id: pos_integer() | nil,
          trigger: term(),
          truncated: boolean()
        }
end

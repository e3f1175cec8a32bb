defmodule ElixirScope.PipelineTestHelpers do
  @moduledoc false
  # Helpers for the end-to-end pipeline tests (PipelineManager → rings →
  # native workers → correlator → store): a recorder that ingests "ops" and
  # keeps the ground truth in the producing process, a matcher from those
  # logs to the stored events, a reference model of the correlator's
  # per-process rules, and set-level checks for send → receive matching.
  #
  # An op is one of
  #
  #     {:call, module, function, args, key}    # caller_pid: self()
  #     {:return, value, key}
  #     {:exception, kind, reason, key}
  #     {:send, to_pid, message}                # from self()
  #     {:receive, message}                     # received by self()
  #     {:spawn, child_pid}                     # parent: self()
  #     {:exit, reason}                         # self() exits
  #     {:state, old_state, new_state}          # server_pid: self()
  #
  # Compiled only in the :test env.

  import ExUnit.Assertions

  alias ElixirScope.Capture.{Ingestor, PipelineManager}
  alias ElixirScope.Events.{FunctionExecution, MessageEvent, ProcessEvent, StateChange}
  alias ElixirScope.Storage.DataAccess

  @all 100_000_000
  @log_key {__MODULE__, :log}
  @refused_key {__MODULE__, :refused}

  # ---------------------------------------------------------------------------
  # Pipelines
  # ---------------------------------------------------------------------------

  @doc """
  Starts an unnamed `PipelineManager` under the test supervisor (stopped,
  and so drained and shut down, when the test ends). Call from the test
  process.
  """
  def start_pipeline!(opts) do
    opts = Keyword.put_new(opts, :name, nil)
    spec = Supervisor.child_spec({PipelineManager, opts}, id: make_ref(), restart: :temporary)
    ExUnit.Callbacks.start_supervised!(spec)
  end

  @doc "The accounting map of `get_metrics/1`."
  def accounting(pm), do: PipelineManager.get_metrics(pm).accounting

  @doc """
  Asserts the accounting identity holds exactly, nothing is in flight and
  nothing is unaccounted. Returns the accounting map.
  """
  def assert_exact_accounting!(pm) do
    acc = accounting(pm)
    line = ElixirScope.Capture.Pipeline.accounting_line(acc)

    rhs =
      acc.stored + acc.evicted + acc.expired + acc.duplicates + acc.store_rejected +
        acc.dead_lettered + acc.overflow + acc.failed + acc.cleared + acc.in_flight

    assert acc.in_flight == 0, "events still in flight after flush: #{line}"
    assert acc.unaccounted == 0, "unaccounted events: #{line}"
    assert acc.accepted == rhs, "accounting identity broken: #{line}"
    acc
  end

  @doc "The pid of the supervisor child `id` (waits while it restarts)."
  def child_pid(pm, id, not_pid \\ nil, tries \\ 500) do
    found =
      Enum.find_value(Supervisor.which_children(pm), fn
        {^id, pid, _, _} when is_pid(pid) and pid != not_pid -> pid
        _ -> nil
      end)

    cond do
      found ->
        found

      tries == 0 ->
        flunk("child #{inspect(id)} of #{inspect(pm)} did not (re)start")

      true ->
        Process.sleep(2)
        child_pid(pm, id, not_pid, tries - 1)
    end
  end

  # ---------------------------------------------------------------------------
  # Recording ops (the ground truth lives in the producing process)
  # ---------------------------------------------------------------------------

  @doc "Ingests `op` (see the moduledoc) from the calling process: the ingest result."
  def ingest(buf, op) do
    case op do
      {:call, m, f, args, key} ->
        Ingestor.ingest_function_call(buf, m, f, args, self(), key)

      {:return, value, key} ->
        Ingestor.ingest_function_return(buf, value, 1, key)

      {:exception, kind, reason, key} ->
        Ingestor.ingest_function_exception(buf, kind, reason, 1, key)

      {:send, to, msg} ->
        Ingestor.ingest_message_send(buf, self(), to, msg)

      {:receive, msg} ->
        Ingestor.ingest_message_receive(buf, self(), msg)

      {:spawn, child} ->
        Ingestor.ingest_process_spawn(buf, self(), child)

      {:exit, reason} ->
        Ingestor.ingest_process_exit(buf, self(), reason)

      {:state, old, new} ->
        Ingestor.ingest_state_change(buf, self(), old, new)
    end
  end

  @doc "Ingests `op`, which must be accepted, and logs it."
  def record!(buf, op) do
    case ingest(buf, op) do
      :ok ->
        Process.put(@log_key, [op | Process.get(@log_key, [])])
        :ok

      other ->
        raise "ingesting #{inspect(op)} from #{inspect(self())} returned #{inspect(other)}"
    end
  end

  @doc """
  Ingests `op`; logs it if accepted, counts it if refused as
  `{:error, :buffer_full}`. Returns the ingest result.
  """
  def try_record(buf, op) do
    case ingest(buf, op) do
      :ok ->
        Process.put(@log_key, [op | Process.get(@log_key, [])])
        :ok

      {:error, :buffer_full} = refused ->
        Process.put(@refused_key, Process.get(@refused_key, 0) + 1)
        refused

      other ->
        raise "ingesting #{inspect(op)} from #{inspect(self())} returned #{inspect(other)}"
    end
  end

  @doc "The calling process's log (oldest first) and refusal count; resets both."
  def take_log do
    log = Enum.reverse(Process.delete(@log_key) || [])
    refused = Process.delete(@refused_key) || 0
    {log, refused}
  end

  # ---------------------------------------------------------------------------
  # Matching logs to stored events
  # ---------------------------------------------------------------------------

  @doc "All stored events of `pid`, in store order."
  def events_of(store, pid, order \\ :asc) do
    {:ok, evs} = DataAccess.query_by_process(store, pid, limit: @all, order: order)
    evs
  end

  @doc "Does stored event `ev` record `op` ingested by `pid`?"
  def matches?({:call, m, f, args, key}, pid, %FunctionExecution{event_type: :call} = e),
    do:
      e.module == m and e.function == f and e.args === args and e.arity == length(args) and
        e.caller_pid == pid and e.correlation_id === key

  def matches?({:return, v, key}, _pid, %FunctionExecution{event_type: :return} = e),
    do: e.return_value === v and e.correlation_id === key

  def matches?({:exception, k, r, key}, _pid, %FunctionExecution{event_type: :exception} = e),
    do: e.return_value === {k, r} and e.correlation_id === key

  def matches?({:send, to, msg}, pid, %MessageEvent{event_type: :send} = e),
    do: e.from_pid == pid and e.to_pid == to and e.message === msg

  def matches?({:receive, msg}, pid, %MessageEvent{event_type: :receive} = e),
    do: e.to_pid == pid and e.message === msg

  def matches?({:spawn, child}, pid, %ProcessEvent{event_type: :spawn} = e),
    do: e.pid == child and e.parent_pid == pid

  def matches?({:exit, reason}, pid, %ProcessEvent{event_type: :exit} = e),
    do: e.pid == pid and e.reason === reason

  def matches?({:state, old, new}, pid, %StateChange{} = e),
    do: e.server_pid == pid and e.old_state === old and e.new_state === new

  def matches?(_op, _pid, _ev), do: false

  @doc """
  Pairs every logged op with its stored event. `logs` is `%{pid => [op]}`
  (each process's ops in ingest order). A process's own events are found
  with `query_by_process/3`; they must be exactly its logged ops in order
  (per-process order end to end). Spawn events are indexed under the child
  (each child must be spawned once). Returns `%{pid => [{op, event}]}`.
  """
  def pair_logs!(store, logs) do
    Map.new(logs, fn {pid, ops} ->
      own = Enum.reject(ops, &match?({:spawn, _}, &1))
      evs = events_of(store, pid)

      assert length(evs) == length(own),
             "process #{inspect(pid)}: #{length(own)} events ingested, #{length(evs)} stored"

      {paired, []} =
        ops
        |> Enum.with_index()
        |> Enum.map_reduce(evs, fn
          {{:spawn, child} = op, i}, rest ->
            assert [ev] = events_of(store, child),
                   "spawn ##{i} of #{inspect(pid)}: expected one event indexed under the child"

            assert matches?(op, pid, ev), "spawn ##{i}: #{inspect(op)} stored as #{inspect(ev)}"
            {{op, ev}, rest}

          {op, i}, [ev | rest] ->
            unless matches?(op, pid, ev) do
              flunk(
                "process #{inspect(pid)}, event ##{i}: ingested #{inspect(op)}, " <>
                  "store has #{inspect(ev)} at that position (order or content broken)"
              )
            end

            {{op, ev}, rest}
        end)

      {pid, paired}
    end)
  end

  # ---------------------------------------------------------------------------
  # Reference model of the correlator's per-process rules
  # ---------------------------------------------------------------------------

  @doc """
  The expected correlation of each of `pid`'s events from its paired ops
  alone: `[{op, event, expected}]`, `expected` a map of `correlation_type`,
  `correlation_id`, `parent_id`, `root_id` and `links`. For receives
  `correlation_id` and `links` are `:receive` (they depend on the other
  processes; see `check_receives!/2`).

  Each process has a stack of open calls `{id, key}`. A call's parent is
  the top, its root the bottom (itself on an empty stack). A return or
  exception with key `k` completes the innermost open call with key `k`
  (unwinding the calls above it), or is unmatched. Sends, receives, spawns
  (in the parent) and state changes get the call in progress as parent.
  An exit clears the stack.
  """
  def expected(pid, paired) do
    {out, _stack} =
      Enum.map_reduce(paired, [], fn {op, ev}, stack ->
        {exp, stack} = step(op, ev.id, pid, stack)
        {{op, ev, exp}, stack}
      end)

    out
  end

  defp ctx([]), do: {nil, nil}
  defp ctx([{top, _} | _] = stack), do: {top, stack |> List.last() |> elem(0)}

  defp exp(type, corr, parent, root, links),
    do: %{
      correlation_type: type,
      correlation_id: corr,
      parent_id: parent,
      root_id: root,
      links: links
    }

  defp step({:call, _, _, _, key}, id, _pid, stack) do
    {parent, root} = ctx(stack)
    links = if parent, do: [called_from: parent], else: []
    {exp(:function_call, id, parent, root || id, links), [{id, key} | stack]}
  end

  defp step({:return, _, key}, id, pid, stack), do: complete(key, id, pid, stack)

  defp step({:exception, _, _, key}, id, pid, stack), do: complete(key, id, pid, stack)

  defp step({:send, _, _}, id, _pid, stack) do
    {parent, root} = ctx(stack)
    {exp(:message_send, id, parent, root, []), stack}
  end

  defp step({:receive, _}, _id, _pid, stack) do
    {parent, root} = ctx(stack)
    {exp(:message_receive, :receive, parent, root, :receive), stack}
  end

  defp step({:spawn, _}, id, pid, stack) do
    {parent, root} = ctx(stack)
    {exp(:process_spawn, id, parent, root, spawned_by: pid), stack}
  end

  defp step({:exit, _}, id, _pid, _stack), do: {exp(:process_exit, id, nil, nil, []), []}

  defp step({:state, _, _}, id, _pid, stack) do
    {parent, root} = ctx(stack)
    links = if parent, do: [state_in: parent], else: []
    {exp(:state_change, id, parent, root, links), stack}
  end

  defp complete(key, id, _pid, stack) do
    case Enum.split_while(stack, fn {_, k} -> k !== key end) do
      {_above, [{call, _} | below]} ->
        {parent, _} = ctx(below)
        {_, root} = ctx(stack)
        {exp(:function_return, call, parent, root, completes: call), below}

      {_, []} ->
        {exp(:function_return, id, nil, nil, []), stack}
    end
  end

  @doc """
  Compares `get_correlated/2` of every paired event with the model
  (`expected/2`). Options: `skip_types: [type]` (do not compare
  `correlation_type` for these expected types). Returns
  `%{sends: [...], receives: [...], correlated: %{id => map}}` for the
  set-level checks.
  """
  def check_correlations!(store, paired_by_pid, opts \\ []) do
    skip_types = Keyword.get(opts, :skip_types, [])

    rows =
      for {pid, paired} <- paired_by_pid,
          {{op, ev, exp}, n} <- Enum.with_index(expected(pid, paired)) do
        assert {:ok, c} = DataAccess.get_correlated(store, ev.id),
               "#{inspect(op)} of #{inspect(pid)} (id #{ev.id}) not found by get_correlated/2"

        where = "#{inspect(pid)} event ##{n} #{inspect(op)} (id #{ev.id})"
        assert c.id == ev.id, where
        assert c.event == ev, "#{where}: get_correlated event differs from the query's"

        unless exp.correlation_type in skip_types do
          assert c.correlation_type == exp.correlation_type,
                 "#{where}: correlation_type #{inspect(c.correlation_type)}, " <>
                   "expected #{inspect(exp.correlation_type)}"
        end

        assert {c.parent_id, c.root_id} == {exp.parent_id, exp.root_id},
               "#{where}: {parent_id, root_id} = #{inspect({c.parent_id, c.root_id})}, " <>
                 "model says #{inspect({exp.parent_id, exp.root_id})}"

        unless exp.links == :receive do
          assert {c.correlation_id, c.links} == {exp.correlation_id, exp.links},
                 "#{where}: {correlation_id, links} = #{inspect({c.correlation_id, c.links})}, " <>
                   "model says #{inspect({exp.correlation_id, exp.links})}"
        end

        {pid, op, ev, c}
      end

    # Sends and receives, each process's in its own order.
    sends =
      for {pid, {:send, to, msg}, ev, _c} <- rows, do: %{id: ev.id, from: pid, to: to, msg: msg}

    receives =
      for {pid, {:receive, msg}, ev, c} <- rows, do: %{id: ev.id, receiver: pid, msg: msg, c: c}

    %{
      sends: sends,
      receives: receives,
      correlated: Map.new(rows, fn {_, _, ev, c} -> {ev.id, c} end)
    }
  end

  @doc """
  Set-level checks of send → receive matching that hold whatever order the
  shards were processed in (`sends`/`receives` as returned by
  `check_correlations!/3`, each process's in its own order):

    * a receive is either unlinked (`links: []`, its own id as correlation
      id) or linked (`links: [receives: s]`, correlation id `s`) to a send
      `s` of equal content to the same receiver;
    * no send is used twice;
    * per (receiver, content): the correlator pairs the k-th receive with
      the k-th send it processes, so the first `min(#receives, #sends)`
      receives are linked and no other; each sender's linked sends are the
      first ones in its order, matched in order;
    * with a single sender for a (receiver, content), the k-th receive is
      linked to the k-th send.

  Option `allowed_lost: n` tolerates up to `n` receives that should be
  linked but are not (the engine's `late_link_misses`, which can only
  happen when a receive was evicted before its send arrived); the linked
  ones must still be consistent with the pairing above. Returns
  `{linked, lost}`.
  """
  def check_receives!(sends, receives, opts \\ []) do
    allowed = Keyword.get(opts, :allowed_lost, 0)
    by_id = Map.new(sends, &{&1.id, &1})

    linked =
      Enum.map(receives, fn r ->
        where = "receive #{r.id} of #{inspect(r.msg)} by #{inspect(r.receiver)}"

        case r.c.links do
          [] ->
            assert r.c.correlation_id == r.id,
                   "#{where}: unlinked but correlation_id #{r.c.correlation_id}"

            {r, nil}

          [receives: sid] ->
            assert r.c.correlation_id == sid,
                   "#{where}: linked to #{sid}, correlation_id #{r.c.correlation_id}"

            assert s = Map.get(by_id, sid), "#{where}: linked to #{sid}, which is not a send"

            assert {s.to, s.msg} === {r.receiver, r.msg},
                   "#{where}: linked to send #{sid} of #{inspect(s.msg)} to #{inspect(s.to)}"

            {r, s}

          other ->
            flunk("#{where}: links #{inspect(other)}")
        end
      end)

    used = for {_, s} <- linked, s, do: s.id
    dups = used -- Enum.uniq(used)
    assert dups == [], "sends linked to more than one receive: #{inspect(Enum.uniq(dups))}"

    sends_by_key = Enum.group_by(sends, &{&1.to, &1.msg})
    linked_by_key = Enum.group_by(linked, fn {r, _} -> {r.receiver, r.msg} end)

    lost =
      for {key, rs} <- linked_by_key, reduce: [] do
        lost ->
          ss = Map.get(sends_by_key, key, [])
          m = min(length(rs), length(ss))
          where = "receiver/message #{inspect(key)} (#{length(rs)} receives, #{length(ss)} sends)"
          flags = Enum.map(rs, fn {_, s} -> s != nil end)
          {first, rest} = Enum.split(flags, m)

          assert Enum.all?(rest, &(!&1)),
                 "#{where}: only the first #{m} receives may be linked, got #{inspect(flags)}"

          lost_here = for {r, nil} <- Enum.take(rs, m), do: r.id

          if allowed == 0 do
            assert first == List.duplicate(true, m),
                   "#{where}: the first #{m} receives should be linked, got #{inspect(flags)}"
          end

          matched = for {_, s} <- rs, s, do: s

          for {sender, own} <- Enum.group_by(ss, & &1.from) do
            got = for s <- matched, s.from == sender, do: s.id
            own_ids = Enum.map(own, & &1.id)

            if lost_here == [] do
              assert got == Enum.take(own_ids, length(got)),
                     "#{where}: sends of #{inspect(sender)} matched out of order or not as a " <>
                       "prefix: #{inspect(got)} vs #{inspect(own_ids)}"
            else
              assert got == Enum.filter(own_ids, &(&1 in got)),
                     "#{where}: sends of #{inspect(sender)} matched out of order: " <>
                       "#{inspect(got)} vs #{inspect(own_ids)}"
            end
          end

          if ss |> Enum.map(& &1.from) |> Enum.uniq() |> length() == 1 do
            for {{_r, s}, k} <- Enum.with_index(rs), s do
              assert s.id == Enum.at(ss, k).id,
                     "#{where}: single sender, receive ##{k} must take send ##{k}"
            end
          end

          lost_here ++ lost
      end

    assert length(lost) <= allowed,
           "#{length(lost)} receives should be linked to a send but are not: #{inspect(lost)} " <>
             "(tolerated: #{allowed})"

    {length(used), length(lost)}
  end
end

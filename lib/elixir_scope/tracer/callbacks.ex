defmodule ElixirScope.Tracer.Callbacks do
  @moduledoc false
  # Which functions of the traced modules are OTP callbacks, for the
  # tracer NIF's callback table, and the OTP processes running them (for
  # snapshots). The flag values are the engine's (native/elixir_scope_core
  # src/event.rs): the callback class shifted left by one, and 16 for a
  # gen_statem.

  import Bitwise

  @init 1
  @handle_call 2
  @handle_noreply 3
  @code_change 4
  @terminate 5
  @statem_event 6
  @statem 16

  @gen_server [
    {:init, 1, @init},
    {:handle_call, 3, @handle_call},
    {:handle_cast, 2, @handle_noreply},
    {:handle_info, 2, @handle_noreply},
    {:handle_continue, 2, @handle_noreply},
    {:code_change, 3, @code_change},
    {:terminate, 2, @terminate}
  ]

  @gen_statem [
    {:init, 1, @init},
    {:handle_event, 4, @statem_event},
    {:code_change, 4, @code_change},
    {:terminate, 3, @terminate}
  ]

  # Exported arity-3 functions of a gen_statem that are not state functions.
  @not_state_functions [terminate: 3, format_status: 3]

  @doc "`:gen_server`, `:gen_statem` or nil: the OTP behaviour `module` implements."
  def behaviour(module) do
    behaviours =
      module.module_info(:attributes)
      |> Enum.filter(fn {k, _} -> k in [:behaviour, :behavior] end)
      |> Enum.flat_map(fn {_, v} -> List.wrap(v) end)

    cond do
      Enum.any?(behaviours, &(&1 in [GenServer, :gen_server])) -> :gen_server
      Enum.any?(behaviours, &(&1 in [:gen_statem, GenStateMachine])) -> :gen_statem
      true -> nil
    end
  rescue
    _ -> nil
  end

  @doc """
  The OTP callbacks of `module` covered by the trace `patterns`
  (`{m, f | :_, a | :_}`), as `{module, function, arity, flags}`.
  """
  def of_module(module, patterns) do
    exports = module.module_info(:exports)

    candidates =
      case behaviour(module) do
        :gen_server ->
          for {f, a, class} <- @gen_server, {f, a} in exports, do: {f, a, class}

        :gen_statem ->
          fixed =
            for {f, a, class} <- @gen_statem, {f, a} in exports, do: {f, a, bor(class, @statem)}

          state_functions =
            if state_functions?(module) do
              for {f, 3} <- exports,
                  {f, 3} not in @not_state_functions,
                  not String.starts_with?(Atom.to_string(f), "__"),
                  do: {f, 3, bor(@statem_event, @statem)}
            else
              []
            end

          fixed ++ state_functions

        nil ->
          []
      end

    for {f, a, class} <- candidates, covered?(module, f, a, patterns) do
      {module, f, a, bor(bsl(band(class, 7), 1), band(class, @statem))}
    end
  rescue
    _ -> []
  end

  defp covered?(m, f, a, patterns) do
    Enum.any?(patterns, fn {pm, pf, pa} ->
      pm == m and (pf == :_ or pf == f) and (pa == :_ or pa == a)
    end)
  end

  defp state_functions?(module) do
    if function_exported?(module, :callback_mode, 0) do
      mode = module.callback_mode()
      mode == :state_functions or (is_list(mode) and :state_functions in mode)
    else
      false
    end
  rescue
    _ -> false
  catch
    _, _ -> false
  end

  @doc "Is `flags` a gen_statem's?"
  def statem?(flags), do: band(flags, @statem) != 0

  @doc """
  The live local processes running one of `modules` as their OTP callback
  module (by their `:"$initial_call"`, which `proc_lib` sets to
  `{module, :init, 1}`), among `pids` (`:all` for every process), as
  `{pid, module, behaviour}`.
  """
  def processes(modules, pids) do
    behaviours = Map.new(modules, &{&1, behaviour(&1)})
    candidates = if pids == :all, do: Process.list(), else: pids

    for pid <- candidates,
        pid != self(),
        {:dictionary, dict} <- [Process.info(pid, :dictionary)],
        {:"$initial_call", {m, :init, 1}} <- [List.keyfind(dict, :"$initial_call", 0)],
        b = Map.get(behaviours, m),
        b != nil do
      {pid, m, b}
    end
  end
end

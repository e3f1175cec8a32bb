defmodule ElixirScope.SampleApp do
  @moduledoc """
  A small supervised sample application for the demo and the tests.

  Load it with `Code.require_file("scripts/sample_app.ex")`; it needs
  nothing beyond Elixir and OTP.

      ElixirScope.SampleApp.Supervisor   (one_for_one, not linked to the caller)
      ├── ElixirScope.SampleApp.Bank     accounts map; casts {:audit, entry} to the Auditor
      └── ElixirScope.SampleApp.Auditor  keeps the audit log

  `ElixirScope.SampleApp.Math` holds plain recursive `fib/1` and `fact/1`.

  `run_scenario/0` drives one deterministic run: two deposits, an interest
  call that computes `Math.fib(10)` inside the Bank process, a withdraw that
  crashes the Bank (raised in `Bank.check_funds!/2`, called by
  `Bank.do_withdraw/3`, called by `Bank.handle_call/3`), the supervisor's
  restart, and one more deposit. It returns the ground truth a trace of the
  run should agree with.
  """

  alias ElixirScope.SampleApp.{Auditor, Bank, InsufficientFunds}

  @sup ElixirScope.SampleApp.Supervisor

  # The account the scenario uses, and its amounts.
  @account "alice"
  @first_deposit 100
  @second_deposit 50
  @fib_n 10
  @fib_calls 177
  @overdraw 1_000
  @after_restart_deposit 7

  @doc """
  Starts the supervisor and its two children; returns `{:ok, sup_pid}`.

  The supervisor is unlinked from the caller right after it starts, so the
  caller survives anything that happens to the application (and the
  application survives the caller). If it is already running, returns
  `{:ok, sup_pid}` of the running one.
  """
  @spec start() :: {:ok, pid()} | {:error, term()}
  def start do
    children = [Auditor, Bank]

    # Up to 10 restarts in 5 s, so a test can run the scenario a few times in
    # a row without the supervisor giving up.
    case Supervisor.start_link(children,
           strategy: :one_for_one,
           name: @sup,
           max_restarts: 10,
           max_seconds: 5
         ) do
      {:ok, sup} ->
        Process.unlink(sup)
        {:ok, sup}

      {:error, {:already_started, sup}} ->
        {:ok, sup}

      {:error, _} = error ->
        error
    end
  end

  @doc "Stops the application (children first, then the supervisor). Returns `:ok`."
  @spec stop() :: :ok
  def stop do
    case Process.whereis(@sup) do
      nil ->
        :ok

      sup ->
        try do
          Supervisor.stop(sup, :normal)
        catch
          # It stopped on its own between whereis and stop.
          :exit, _ -> :ok
        end
    end
  end

  @doc "The supervisor's pid, or `nil` when the application is not running."
  @spec whereis() :: pid() | nil
  def whereis, do: Process.whereis(@sup)

  @doc """
  Runs the scenario and returns its ground truth.

  Starts the application if it is not running and leaves it running (call
  `stop/0` afterwards). Steps, all from the calling process:

    1. `Auditor.log()`, to count the audit entries already there
    2. `Bank.deposit("alice", 100)` (the Bank casts `{:audit, _}` to the Auditor)
    3. `Bank.interest("alice")`: the Bank computes `Math.fib(10)` = 55 in its own
       process (177 calls to `Math.fib/1`) and credits it (audited)
    4. `Bank.deposit("alice", 50)` (audited)
    5. `Bank.withdraw("alice", 1000)`: insufficient funds, `check_funds!/2` raises
       `ElixirScope.SampleApp.InsufficientFunds` in the Bank, the Bank crashes;
       the caller catches the exit
    6. waits (polling `Process.whereis/1`) until the supervisor has registered
       a new Bank
    7. `Bank.deposit("alice", 7)` on the new Bank (audited); its state started
       empty, so the balance is 7
    8. `Auditor.log()` again, for `:audit_entries` (4)

  On a freshly started application `:balance_before_crash` is 205
  (100 + 55 + 50); a Bank that already held "alice" adds its balance.
  No other code runs in the application's processes, and the caller makes
  no other calls into `Math`.

  Options: `quiet: true` (default) silences the GenServer crash report while
  the scenario runs, by setting the logger level of the `:gen_server`,
  `:proc_lib` and `:supervisor` modules to `:none` (this is node-wide while
  it lasts) and restoring their previous levels afterwards. `quiet: false`
  leaves logging alone.
  """
  @spec run_scenario(keyword()) :: map()
  def run_scenario(opts \\ []) do
    quiet = Keyword.get(opts, :quiet, true)
    {:ok, sup} = start()
    bank_before = Process.whereis(Bank)
    auditor = Process.whereis(Auditor)
    log_before = length(Auditor.log())

    {:ok, _} = Bank.deposit(@account, @first_deposit)
    {:ok, fib} = Bank.interest(@account)
    {:ok, balance_before_crash} = Bank.deposit(@account, @second_deposit)

    crash_reason =
      with_quiet_logger(quiet, fn ->
        reason =
          try do
            Bank.withdraw(@account, @overdraw)
          catch
            :exit, reason -> reason
          end

        # Wait for the restart inside the quiet window: the reports are logged
        # by the dying Bank and by the supervisor while it restarts it.
        _ = await_restart(bank_before, 5_000)
        reason
      end)

    bank_after = Process.whereis(Bank)
    {:ok, balance_after_restart} = Bank.deposit(@account, @after_restart_deposit)

    %{
      sup_pid: sup,
      caller_pid: self(),
      bank_pid_before: bank_before,
      bank_pid_after: bank_after,
      auditor_pid: auditor,
      account: @account,
      # The amounts deposited, in order (the last one after the restart).
      deposits: [@first_deposit, @second_deposit, @after_restart_deposit],
      fib_n: @fib_n,
      fib_result: fib,
      # Calls to Math.fib/1 (all in the Bank process): fib(n) makes
      # 2 * fib(n + 1) - 1 calls, 177 for n = 10. Written out, so that
      # computing it here adds no calls to a trace.
      fib_calls: @fib_calls,
      balance_before_crash: balance_before_crash,
      balance_after_restart: balance_after_restart,
      crash_function: {Bank, :check_funds!, 2},
      crash_call_chain: [
        {Bank, :handle_call, 3},
        {Bank, :do_withdraw, 3},
        {Bank, :check_funds!, 2}
      ],
      crash_exception: InsufficientFunds,
      crash_reason: crash_reason,
      # Audited by the Auditor during the scenario: deposit, interest,
      # deposit, deposit after the restart (the failed withdraw is not).
      audit_entries: length(Auditor.log()) - log_before
    }
  end

  # Polls until the registered Bank is a live process other than `old`.
  defp await_restart(old, timeout_ms) do
    deadline = System.monotonic_time(:millisecond) + timeout_ms
    await_restart_loop(old, deadline)
  end

  defp await_restart_loop(old, deadline) do
    case Process.whereis(Bank) do
      pid when is_pid(pid) and pid != old ->
        {:ok, pid}

      _ ->
        if System.monotonic_time(:millisecond) > deadline do
          raise "ElixirScope.SampleApp.Bank was not restarted in time"
        end

        Process.sleep(1)
        await_restart_loop(old, deadline)
    end
  end

  @quiet_modules [:gen_server, :proc_lib, :supervisor]

  defp with_quiet_logger(false, fun), do: fun.()

  defp with_quiet_logger(true, fun) do
    previous = :logger.get_module_level(@quiet_modules)
    :ok = :logger.set_module_level(@quiet_modules, :none)

    try do
      fun.()
    after
      :ok = :logger.unset_module_level(@quiet_modules)
      Enum.each(previous, fn {mod, level} -> :ok = :logger.set_module_level(mod, level) end)
    end
  end
end

defmodule ElixirScope.SampleApp.InsufficientFunds do
  @moduledoc "Raised in the Bank by `check_funds!/2` when a withdraw exceeds the balance."
  defexception [:balance, :amount]

  @impl true
  def message(%{balance: balance, amount: amount}),
    do: "insufficient funds: balance #{balance}, withdraw #{amount}"
end

defmodule ElixirScope.SampleApp.Math do
  @moduledoc "Plain recursive (not tail-recursive) functions, to produce nested call trees."

  @doc "The n-th Fibonacci number, by the naive double recursion (`fib(10)` = 55, 177 calls)."
  @spec fib(non_neg_integer()) :: non_neg_integer()
  def fib(0), do: 0
  def fib(1), do: 1
  def fib(n) when is_integer(n) and n > 1, do: fib(n - 1) + fib(n - 2)

  @doc "n!, by non-tail recursion (`fact(5)` = 120, 6 calls)."
  @spec fact(non_neg_integer()) :: pos_integer()
  def fact(0), do: 1
  def fact(n) when is_integer(n) and n > 0, do: n * fact(n - 1)
end

defmodule ElixirScope.SampleApp.Bank do
  @moduledoc """
  A GenServer holding a map of account balances, registered as `#{inspect(__MODULE__)}`.

  Every change is reported to `ElixirScope.SampleApp.Auditor` with a cast of
  `{:audit, entry}`. A withdraw over the balance raises in
  `check_funds!/2` (called by `do_withdraw/3`, called by `handle_call/3`),
  which crashes the server; its supervisor restarts it with no accounts.
  """
  use GenServer

  alias ElixirScope.SampleApp.{Auditor, InsufficientFunds, Math}

  @doc false
  def start_link(_arg), do: GenServer.start_link(__MODULE__, %{}, name: __MODULE__)

  @doc "Adds `amount` to `account`; returns `{:ok, new_balance}`."
  @spec deposit(term(), pos_integer()) :: {:ok, integer()}
  def deposit(account, amount) when is_integer(amount) and amount > 0,
    do: GenServer.call(__MODULE__, {:deposit, account, amount})

  @doc """
  Takes `amount` from `account`; returns `{:ok, new_balance}`.

  When `amount` exceeds the balance the Bank crashes (the caller's
  `GenServer.call` exits) and is restarted by its supervisor.
  """
  @spec withdraw(term(), pos_integer()) :: {:ok, integer()}
  def withdraw(account, amount) when is_integer(amount) and amount > 0,
    do: GenServer.call(__MODULE__, {:withdraw, account, amount})

  @doc "Credits `account` with `Math.fib(10)` computed in the Bank process; returns `{:ok, 55}`."
  @spec interest(term()) :: {:ok, non_neg_integer()}
  def interest(account), do: GenServer.call(__MODULE__, {:interest, account})

  @doc "The balance of `account` (0 if unknown)."
  @spec balance(term()) :: integer()
  def balance(account), do: GenServer.call(__MODULE__, {:balance, account})

  @impl true
  def init(accounts), do: {:ok, accounts}

  @impl true
  def handle_call({:deposit, account, amount}, _from, accounts) do
    new = Map.get(accounts, account, 0) + amount
    audit({:deposit, account, amount, new})
    {:reply, {:ok, new}, Map.put(accounts, account, new)}
  end

  def handle_call({:withdraw, account, amount}, _from, accounts) do
    {new, accounts} = do_withdraw(accounts, account, amount)
    {:reply, {:ok, new}, accounts}
  end

  def handle_call({:interest, account}, _from, accounts) do
    interest = Math.fib(10)
    new = Map.get(accounts, account, 0) + interest
    audit({:interest, account, interest, new})
    {:reply, {:ok, interest}, Map.put(accounts, account, new)}
  end

  def handle_call({:balance, account}, _from, accounts),
    do: {:reply, Map.get(accounts, account, 0), accounts}

  # Not a tail call to check_funds!/2, so do_withdraw/3 stays on the stack
  # (and in the crash's stacktrace).
  defp do_withdraw(accounts, account, amount) do
    balance = Map.get(accounts, account, 0)
    :ok = check_funds!(balance, amount)
    new = balance - amount
    audit({:withdraw, account, amount, new})
    {new, Map.put(accounts, account, new)}
  end

  defp check_funds!(balance, amount) when amount <= balance, do: :ok

  defp check_funds!(balance, amount),
    do: raise(InsufficientFunds, balance: balance, amount: amount)

  defp audit(entry), do: GenServer.cast(Auditor, {:audit, entry})
end

defmodule ElixirScope.SampleApp.Auditor do
  @moduledoc """
  A GenServer, registered as `#{inspect(__MODULE__)}`, that keeps the log of
  the `{:audit, entry}` casts it receives from `ElixirScope.SampleApp.Bank`.
  It is not restarted when the Bank crashes (one_for_one), so its log spans
  the Bank's restarts.
  """
  use GenServer

  @doc false
  def start_link(_arg), do: GenServer.start_link(__MODULE__, [], name: __MODULE__)

  @doc "The audit entries received so far, oldest first."
  @spec log() :: [term()]
  def log, do: GenServer.call(__MODULE__, :log)

  @impl true
  def init(log), do: {:ok, log}

  @impl true
  def handle_cast({:audit, entry}, log), do: {:noreply, [entry | log]}

  @impl true
  def handle_call(:log, _from, log), do: {:reply, Enum.reverse(log), log}
end

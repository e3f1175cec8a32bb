defmodule ElixirScope.Bench.Harness do
  @moduledoc """
  A small benchmark harness for the Elixir benches.

  Each job is a function that performs `n` operations; the harness runs it
  for a number of samples (after warm-up), interleaving the jobs sample by
  sample, and reports per-operation time: min, median and p99 over the
  samples. Set `BENCH_INTERLEAVE=0` to run each job's samples back to
  back. Setup for a sample (refilling a
  ring, clearing a table) runs outside the timed region.

  When Benchee is loadable (it is a hex package, so only when the host
  project provides it), `run/2` hands the same jobs to Benchee as well; set
  `ELIXIR_SCOPE_BENCHEE=0` to skip it. Without it, this harness is the one
  that reports.
  """

  @type job :: %{
          required(:name) => String.t(),
          required(:n) => pos_integer(),
          required(:run) => (term() -> term()),
          optional(:setup) => (() -> term())
        }

  @doc "Runs `jobs`, prints a table, returns `%{name => %{min, median, p99}}` in ns/op."
  @spec run([job()], keyword()) :: map()
  def run(jobs, opts \\ []) do
    samples = Keyword.get(opts, :samples, env_int("BENCH_SAMPLES", 15))
    warmup = Keyword.get(opts, :warmup, 2)

    for job <- jobs, _ <- 1..warmup//1, do: job.run.(setup(job).())

    # By default samples are interleaved across jobs (round-robin), so every
    # job sees the same machine conditions and the ratios between them stay
    # meaningful on a noisy machine; each sample then starts with caches
    # the other jobs have used. BENCH_INTERLEAVE=0 runs each job's samples
    # back to back instead (caches warm with the job's own data).
    order =
      if System.get_env("BENCH_INTERLEAVE", "1") == "0",
        do: for(job <- jobs, _ <- 1..samples, do: job),
        else: for(_ <- 1..samples, job <- jobs, do: job)

    clock = clock()

    times =
      for job <- order, reduce: %{} do
        acc ->
          arg = setup(job).()
          :erlang.garbage_collect()
          ns = timed(clock, job, arg)
          Map.update(acc, job.name, [ns], &[ns | &1])
      end

    results = Map.new(times, fn {name, ts} -> {name, stats(ts)} end)

    maybe_benchee(jobs, opts)
    results
  end

  defp setup(job), do: Map.get(job, :setup, fn -> nil end)

  @doc """
  The clock samples are timed by: `:wall` (default), or with
  `BENCH_CLOCK=thread_cpu` the CPU time of the scheduler thread running
  the bench (what a job costs when it has a core to itself; work done by
  other processes or threads is not counted).
  """
  def clock,
    do: if(System.get_env("BENCH_CLOCK") == "thread_cpu", do: :thread_cpu, else: :wall)

  defp timed(:wall, job, arg) do
    t0 = System.monotonic_time(:nanosecond)
    job.run.(arg)
    (System.monotonic_time(:nanosecond) - t0) / job.n
  end

  # A thread's CPU clock is only meaningful if the process stayed on that
  # scheduler thread: a sample that ended on another one is run again.
  defp timed(:thread_cpu, job, arg), do: timed_cpu(job, arg, 5)

  defp timed_cpu(job, arg, tries) do
    s0 = :erlang.system_info(:scheduler_id)
    t0 = now(:thread_cpu)
    job.run.(arg)
    t1 = now(:thread_cpu)

    if :erlang.system_info(:scheduler_id) == s0 or tries == 0,
      do: (t1 - t0) / job.n,
      else: timed_cpu(job, setup(job).(), tries - 1)
  end

  defp now(:wall), do: System.monotonic_time(:nanosecond)
  defp now(:thread_cpu), do: ElixirScope.Native.debug_thread_cpu_ns()

  @doc "min / median / p99 of a list of numbers."
  def stats(times) do
    sorted = Enum.sort(times)
    n = length(sorted)

    %{
      min: hd(sorted),
      median: Enum.at(sorted, div(n - 1, 2)),
      p99: Enum.at(sorted, min(n - 1, round(Float.ceil(n * 0.99)) - 1))
    }
  end

  @doc "Prints one row per result, in the order of `names`."
  def print_table(title, results, names, extra \\ fn _ -> "" end) do
    IO.puts("\n## #{title}\n")
    IO.puts("| job | min ns/op | median ns/op | p99 ns/op | |")
    IO.puts("|---|---:|---:|---:|---|")

    for name <- names do
      %{min: mn, median: md, p99: p} = Map.fetch!(results, name)
      IO.puts("| #{name} | #{fmt(mn)} | #{fmt(md)} | #{fmt(p)} | #{extra.(name)} |")
    end
  end

  def fmt(x) when is_float(x), do: :erlang.float_to_binary(x, decimals: 1)
  def fmt(x), do: to_string(x)

  @doc "The integer in environment variable `name`, or `default`."
  def env_int(name, default) do
    case System.get_env(name) do
      nil -> default
      v -> String.to_integer(v)
    end
  end

  defp maybe_benchee(jobs, opts) do
    if Code.ensure_loaded?(Benchee) and System.get_env("ELIXIR_SCOPE_BENCHEE") != "0" do
      benchee = Module.concat([Benchee])

      scenarios =
        for job <- jobs, into: %{} do
          setup = Map.get(job, :setup, fn -> nil end)
          {job.name, {fn arg -> job.run.(arg) end, before_each: fn _ -> setup.() end}}
        end

      benchee.run(scenarios, Keyword.get(opts, :benchee, time: 3, warmup: 1))
    end
  end

  @doc "A machine description line for bench output."
  def machine do
    cores = System.schedulers_online()
    otp = System.otp_release()

    cpu =
      case File.read("/proc/cpuinfo") do
        {:ok, s} ->
          s
          |> String.split("\n")
          |> Enum.find_value("unknown cpu", fn line ->
            case String.split(line, ":", parts: 2) do
              ["model name" <> _, v] -> String.trim(v)
              _ -> nil
            end
          end)

        _ ->
          "unknown cpu"
      end

    "#{cpu}, #{cores} schedulers, OTP #{otp}, Elixir #{System.version()}"
  end
end

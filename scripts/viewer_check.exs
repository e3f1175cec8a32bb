# Exports the demo app's trace for scripts/viewer_check.sh: traces
# scripts/sample_app.ex's scenario, saves the trace file, and exports it in
# every format with `mix elixir_scope.export` (the task a user runs).
# Usage: mix run scripts/viewer_check.exs OUT_DIR
[out] = System.argv()
File.mkdir_p!(out)
Code.require_file(Path.join(__DIR__, "sample_app.ex"))
app = ElixirScope.SampleApp
{:ok, _} = app.start()

{:ok, _} =
  ElixirScope.trace(
    [Module.concat(app, Bank), Module.concat(app, Auditor), Module.concat(app, Math)],
    pids: :all,
    max_payload_bytes: 1024
  )

truth = app.run_scenario()
{:ok, _} = ElixirScope.stop_trace()
file = Path.join(out, "demo.estrace")
{:ok, saved} = ElixirScope.TraceFile.save(:trace, file)
IO.puts("saved #{saved.events} events to #{file}")

for {format, name} <- [
      chrome_trace: "demo.chrome.json",
      speedscope: "demo.speedscope.json",
      folded: "demo.folded",
      flamegraph: "demo.svg"
    ] do
  Mix.Task.rerun("elixir_scope.export", [
    file,
    "--format",
    Atom.to_string(format),
    "-o",
    Path.join(out, name)
  ])
end

# What the browser check expects to see.
File.write!(
  Path.join(out, "expect.json"),
  ~s({"fib_calls": #{truth.fib_calls}, "fib": "ElixirScope.SampleApp.Math.fib/1", ) <>
    ~s("bank_before": "#{inspect(truth.bank_pid_before) |> String.trim_leading("#PID")}"})
)

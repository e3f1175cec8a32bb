Code.require_file("../../bench/support/soak.exs", __DIR__)

defmodule ElixirScope.SoakTest do
  # The soak benchmark (bench/soak_bench.exs) in a short version: the same
  # code path for 2 seconds, checked for its invariants only (no timing).
  use ExUnit.Case, async: false

  alias ElixirScope.Bench.Soak

  @tag timeout: 120_000
  test "a short soak keeps the store bounded and accounts for every event" do
    max_events = 50_000

    r =
      Soak.run(
        seconds: 2,
        rate: 200_000,
        producers: 2,
        sample_ms: 250,
        max_events: max_events
      )

    assert length(r.samples) >= 4

    for s <- r.samples do
      # Bounded: never more than max_events stored; nothing unaccounted
      # beyond what is still in flight.
      assert s.stored <= max_events
      assert s.unaccounted == 0 or s.in_flight > 0
    end

    acc = r.final.accounting
    assert r.offered > 100_000
    assert acc.unaccounted == 0 and acc.in_flight == 0
    assert acc.accepted + acc.shed == r.written
    assert acc.buffer_full == r.refused
    assert acc.stored == min(acc.accepted - acc.dead_lettered - acc.duplicates, max_events)

    assert acc.accepted ==
             acc.stored + acc.evicted + acc.expired + acc.duplicates + acc.store_rejected +
               acc.dead_lettered + acc.overflow + acc.failed + acc.cleared
  end
end

defmodule ElixirScope.CapacityPlanningTest do
  # calibrate/1 keeps its result in a node-wide :persistent_term.
  use ExUnit.Case, async: false

  alias ElixirScope.CapacityPlanning

  @c %{write_ns: 300.0, stage_ns: 200.0, bytes_per_event: 150.0, schedulers: 2}

  test "calibrate/1 measures this machine's costs and keeps them" do
    c = CapacityPlanning.calibrate(events: 20_000)
    assert c.events == 20_000
    assert c.write_ns > 0 and c.stage_ns > 0
    # A stored event takes tens to hundreds of bytes (headers, indexes, payload).
    assert c.bytes_per_event > 50 and c.bytes_per_event < 2_000
    assert c.schedulers == System.schedulers_online()
    assert CapacityPlanning.calculate_requirements(1000, calibrate: false).calibration == c
  end

  test "requirements follow from the measured costs" do
    p = CapacityPlanning.calculate_requirements(1_000_000, calibration: @c, retention_s: 10)
    # 1M events/s × 200 ns = 0.2 of a core for the stage; × 500 ns = 0.5 cores in all.
    assert p.stage_utilization == 0.2
    assert p.cpu_cores == 0.5
    assert p.drop_risk == :low and p.expected_drop_rate == 0
    assert p.recommended_workers == 1
    assert p.max_events == 10_000_000
    assert p.store_memory_mb == Float.round(10_000_000 * 150 / 1_048_576, 1)
    # 100 ms at twice the rate = 200,000 slots; one writing process fills
    # one shard: 262,144 per shard.
    assert p.ring_size == 262_144 and p.ring_buffer_size == 16 * 262_144
    # Spread over 8 writers (8 shards): 25,000 each → 32,768.
    assert CapacityPlanning.calculate_requirements(1_000_000, calibration: @c, writers: 8).ring_size ==
             32_768

    assert p.correlation_ttl_seconds == 10

    busy = CapacityPlanning.calculate_requirements(4_000_000, calibration: @c, retention_s: 1)
    assert busy.stage_utilization == 0.8 and busy.recommended_workers == 2
    # 4M × 500 ns = 2 cores on 2 schedulers.
    assert busy.drop_risk == :certain

    over = CapacityPlanning.calculate_requirements(6_000_000, calibration: @c, retention_s: 1)
    assert over.expected_drop_rate == 1_000_000

    assert CapacityPlanning.calculate_requirements(2_500_000, calibration: @c).drop_risk ==
             :moderate

    assert CapacityPlanning.calculate_requirements(3_500_000, calibration: @c).drop_risk == :high

    huge = CapacityPlanning.calculate_requirements(10_000_000, calibration: @c, retention_s: 3600)
    assert huge.retention_capped and huge.max_events == 536_870_912
  end

  test "bad input raises ArgumentError" do
    for bad <- [0, -5, 1.5, :fast, nil] do
      assert_raise ArgumentError, fn ->
        CapacityPlanning.calculate_requirements(bad, calibration: @c)
      end
    end

    for opts <- [
          [retention_s: 0, calibration: @c],
          [burst_ms: -1, calibration: @c],
          [shards: 1000, calibration: @c],
          [writers: 0, calibration: @c],
          [calibrate: :maybe],
          [calibration: %{write_ns: 1}],
          [bogus: 1]
        ] do
      assert_raise ArgumentError, fn -> CapacityPlanning.calculate_requirements(1000, opts) end
    end

    assert_raise ArgumentError, fn -> CapacityPlanning.calibrate(events: 10) end
  end
end

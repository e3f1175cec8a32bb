defmodule ElixirScope.TelemetryTest do
  use ExUnit.Case, async: false

  import ExUnit.CaptureLog

  alias ElixirScope.Telemetry
  alias ElixirScope.Telemetry.Registry

  @sink :elixir_scope_telemetry_test_sink

  setup do
    unless Process.whereis(Registry), do: start_supervised!(Registry)

    on_exit(fn ->
      # Handlers left by a failing test; subscriptions end with the test process.
      for %{type: :handler, id: {:test, _} = id} <- Telemetry.list_handlers(),
          do: Telemetry.detach(id)
    end)

    :ok
  end

  defp id, do: {:test, make_ref()}

  defp forward_to(pid), do: fn e, m, md, c -> send(pid, {:handled, e, m, md, c}) end

  defp handler(id), do: Enum.find(Telemetry.list_handlers(), &(&1.id == id))

  defp subscription(pid),
    do: Enum.find(Telemetry.list_handlers(), &(&1.type == :subscriber and &1.pid == pid))

  defp drain(acc \\ 0) do
    receive do
      {:elixir_scope_telemetry, _, _, _} -> drain(acc + 1)
    after
      0 -> acc
    end
  end

  describe "attach/4 and detach/1" do
    test "a handler gets its events with its config, and no others" do
      id = id()
      assert :ok = Telemetry.attach(id, [[:t, :a]], forward_to(self()), :cfg)

      assert :ok = Telemetry.execute([:t, :a], %{n: 1}, %{pipeline: :p})
      assert_received {:handled, [:t, :a], %{n: 1}, %{pipeline: :p}, :cfg}

      assert :ok = Telemetry.execute([:t, :b], %{n: 2}, %{})
      refute_received {:handled, [:t, :b], _, _, _}

      assert %{type: :handler, event_names: [[:t, :a]], config: :cfg} = handler(id)

      assert :ok = Telemetry.detach(id)
      assert {:error, :not_found} = Telemetry.detach(id)
      assert handler(id) == nil

      Telemetry.execute([:t, :a], %{n: 3}, %{})
      refute_received {:handled, _, _, _, _}
    end

    test "config defaults to nil" do
      id = id()
      :ok = Telemetry.attach(id, [[:t, :nil_config]], forward_to(self()))
      Telemetry.execute([:t, :nil_config], %{}, %{})
      assert_received {:handled, [:t, :nil_config], %{}, %{}, nil}
      Telemetry.detach(id)
    end

    test "one handler, several events" do
      id = id()
      :ok = Telemetry.attach(id, [[:t, :x], [:t, :y], [:t, :x]], forward_to(self()), 7)
      assert handler(id).event_names == [[:t, :x], [:t, :y]]

      Telemetry.execute([:t, :x], %{v: 1}, %{})
      Telemetry.execute([:t, :y], %{v: 2}, %{})
      assert_received {:handled, [:t, :x], %{v: 1}, %{}, 7}
      assert_received {:handled, [:t, :y], %{v: 2}, %{}, 7}
      # The duplicate name was attached once.
      refute_received {:handled, [:t, :x], _, _, _}

      :ok = Telemetry.detach(id)
      Telemetry.execute([:t, :x], %{}, %{})
      Telemetry.execute([:t, :y], %{}, %{})
      refute_received {:handled, _, _, _, _}
    end

    test "several handlers on one event are all called" do
      [a, b] = [id(), id()]
      :ok = Telemetry.attach(a, [[:t, :shared]], forward_to(self()), :a)
      :ok = Telemetry.attach(b, [[:t, :shared]], forward_to(self()), :b)
      Telemetry.execute([:t, :shared], %{}, %{})
      assert_received {:handled, _, _, _, :a}
      assert_received {:handled, _, _, _, :b}
      Telemetry.detach(a)
      Telemetry.detach(b)
    end

    test "an attached id cannot be attached again" do
      id = id()
      :ok = Telemetry.attach(id, [[:t, :dup]], forward_to(self()), 1)

      assert {:error, :already_exists} =
               Telemetry.attach(id, [[:t, :other]], forward_to(self()), 2)

      assert handler(id).event_names == [[:t, :dup]]
      Telemetry.detach(id)
      assert :ok = Telemetry.attach(id, [[:t, :other]], forward_to(self()), 2)
      Telemetry.detach(id)
    end

    test "malformed arguments raise ArgumentError" do
      f = forward_to(self())

      for names <- [[], :t, [:t], [[]], [["t"]], [[:t | :u]], [[:t] | :u]] do
        assert_raise ArgumentError, fn -> Telemetry.attach(id(), names, f) end
      end

      assert_raise ArgumentError, ~r/arity 4/, fn ->
        Telemetry.attach(id(), [[:t]], fn _, _, _ -> :ok end)
      end

      assert Enum.filter(Telemetry.list_handlers(), &match?({:test, _}, &1.id)) == []
    end

    test "concurrent attach/detach of one id leaves no stray rows" do
      id = id()
      parent = self()

      tasks =
        for i <- 1..8 do
          Task.async(fn ->
            for _ <- 1..200 do
              if rem(i, 2) == 0,
                do: Telemetry.attach(id, [[:t, :race]], forward_to(parent)),
                else: Telemetry.detach(id)
            end
          end)
        end

      Enum.each(tasks, &Task.await(&1, 30_000))
      Telemetry.detach(id)

      assert :ets.lookup(Telemetry, [:t, :race]) == []
      assert handler(id) == nil
    end
  end

  describe "a handler that fails" do
    test "is detached, logged once, and execute/3 still returns :ok" do
      id = id()
      parent = self()

      :ok =
        Telemetry.attach(id, [[:t, :boom], [:t, :boom2]], fn _, _, _, _ ->
          send(parent, :called)
          raise "boom"
        end)

      ok = id()
      :ok = Telemetry.attach(ok, [[:t, :boom]], forward_to(self()), :ok)

      log =
        capture_log(fn ->
          assert :ok = Telemetry.execute([:t, :boom], %{}, %{})
          assert :ok = Telemetry.execute([:t, :boom], %{}, %{})
          assert :ok = Telemetry.execute([:t, :boom2], %{}, %{})
        end)

      assert_received :called
      refute_received :called
      assert handler(id) == nil
      assert {:error, :not_found} = Telemetry.detach(id)
      assert :ets.lookup(Telemetry, [:t, :boom2]) == []

      # The other handler on the event still runs, every time.
      assert_received {:handled, [:t, :boom], _, _, :ok}
      assert_received {:handled, [:t, :boom], _, _, :ok}

      assert [_] = Regex.scan(~r/handler \{:test, #Reference<[^>]+>\} failed/, log)
      assert log =~ "boom"
      Telemetry.detach(ok)
    end

    test "throws and exits detach it too" do
      for bad <- [fn _, _, _, _ -> throw(:t) end, fn _, _, _, _ -> exit(:e) end] do
        id = id()
        :ok = Telemetry.attach(id, [[:t, :bad]], bad)

        capture_log(fn -> assert :ok = Telemetry.execute([:t, :bad], %{}, %{}) end)
        assert handler(id) == nil
      end
    end

    test "failing in many processes at once is logged once" do
      id = id()
      :ok = Telemetry.attach(id, [[:t, :many]], fn _, _, _, _ -> raise "many" end)

      log =
        capture_log(fn ->
          1..16
          |> Enum.map(fn _ -> Task.async(fn -> Telemetry.execute([:t, :many], %{}, %{}) end) end)
          |> Enum.each(&assert(Task.await(&1) == :ok))
        end)

      assert length(Regex.scan(~r/failed on event/, log)) == 1
      assert handler(id) == nil
    end
  end

  describe "subscribe/2" do
    test "the subscriber receives its events" do
      :ok = Telemetry.subscribe([[:t, :s1], [:t, :s2]])

      Telemetry.execute([:t, :s1], %{a: 1}, %{pipeline: self()})
      Telemetry.execute([:t, :s2], %{b: 2}, %{})
      Telemetry.execute([:t, :s3], %{c: 3}, %{})

      me = self()
      assert_received {:elixir_scope_telemetry, [:t, :s1], %{a: 1}, %{pipeline: ^me}}
      assert_received {:elixir_scope_telemetry, [:t, :s2], %{b: 2}, %{}}
      refute_received {:elixir_scope_telemetry, [:t, :s3], _, _}

      assert %{type: :subscriber, id: ^me, event_names: [[:t, :s1], [:t, :s2]]} =
               sub = subscription(me)

      assert %{max_queue: 10_000, delivered: 2, dropped: 0} = sub

      :ok = Telemetry.unsubscribe()
      assert subscription(me) == nil
      Telemetry.execute([:t, :s1], %{}, %{})
      refute_received {:elixir_scope_telemetry, _, _, _}
      assert :ok = Telemetry.unsubscribe()
    end

    test "subscribing again adds event names" do
      :ok = Telemetry.subscribe([[:t, :add1]])
      :ok = Telemetry.subscribe([[:t, :add2], [:t, :add1]], max_queue: 5)

      assert %{event_names: [[:t, :add1], [:t, :add2]], max_queue: 5} = subscription(self())

      Telemetry.execute([:t, :add1], %{}, %{})
      Telemetry.execute([:t, :add2], %{}, %{})
      assert drain() == 2
      Telemetry.unsubscribe()
    end

    test "a subscription ends when the subscriber exits" do
      parent = self()

      pid =
        spawn(fn ->
          :ok = Telemetry.subscribe([[:t, :dies]])
          send(parent, :subscribed)
          receive do: (:stop -> :ok)
        end)

      assert_receive :subscribed
      assert %{pid: ^pid} = subscription(pid)

      ref = Process.monitor(pid)
      send(pid, :stop)
      assert_receive {:DOWN, ^ref, :process, ^pid, _}

      # The registry handles the subscriber's :DOWN before this call.
      _ = :sys.get_state(Registry)
      assert subscription(pid) == nil
      assert :ets.lookup(Telemetry, [:t, :dies]) == []
      assert :ok = Telemetry.execute([:t, :dies], %{}, %{})
    end

    test "over :max_queue, events are dropped and counted" do
      :ok = Telemetry.subscribe([[:t, :flood]], max_queue: 100)

      for i <- 1..1_000, do: Telemetry.execute([:t, :flood], %{i: i}, %{})

      %{delivered: delivered, dropped: dropped} = subscription(self())
      received = drain()

      assert delivered + dropped == 1_000
      assert received == delivered
      assert received >= 100 and received < 100 + 64
      assert dropped > 0

      # Delivery resumes once the queue has drained.
      for _ <- 1..64, do: Telemetry.execute([:t, :flood], %{}, %{})
      assert drain() == 64
      assert subscription(self()).dropped == dropped
      Telemetry.unsubscribe()
    end

    test "the default bound is 10_000" do
      :ok = Telemetry.subscribe([[:t, :flood_default]])
      for _ <- 1..10_200, do: Telemetry.execute([:t, :flood_default], %{}, %{})

      %{delivered: delivered, dropped: dropped} = subscription(self())
      assert delivered + dropped == 10_200
      assert delivered >= 10_000 and delivered < 10_064
      assert drain() == delivered
      Telemetry.unsubscribe()
    end

    test "malformed arguments raise ArgumentError" do
      assert_raise ArgumentError, fn -> Telemetry.subscribe([]) end
      assert_raise ArgumentError, fn -> Telemetry.subscribe([:t]) end
      assert_raise ArgumentError, fn -> Telemetry.subscribe([[:t]], max_queue: 0) end
      assert_raise ArgumentError, fn -> Telemetry.subscribe([[:t]], max_queue: :x) end
      assert_raise ArgumentError, ~r/unknown/, fn -> Telemetry.subscribe([[:t]], bound: 1) end
      assert_raise ArgumentError, fn -> Telemetry.subscribe([[:t]], :nope) end
      assert subscription(self()) == nil
    end
  end

  describe "execute/3" do
    test "with nobody listening it returns :ok and sends nothing" do
      for _ <- 1..1_000, do: assert(:ok = Telemetry.execute([:t, :nobody], %{}, %{}))
      refute_received _
    end

    test "malformed arguments raise ArgumentError" do
      assert_raise ArgumentError, ~r/event name/, fn -> Telemetry.execute([], %{}, %{}) end
      assert_raise ArgumentError, ~r/event name/, fn -> Telemetry.execute(:t, %{}, %{}) end
      assert_raise ArgumentError, ~r/event name/, fn -> Telemetry.execute(["t"], %{}, %{}) end
      assert_raise ArgumentError, ~r/event name/, fn -> Telemetry.execute([:t | :u], %{}, %{}) end
      assert_raise ArgumentError, ~r/measurements/, fn -> Telemetry.execute([:t], 1, %{}) end
      assert_raise ArgumentError, ~r/metadata/, fn -> Telemetry.execute([:t], %{}, []) end
    end

    test "without the registry: execute/3 is a no-op, attach/4 and subscribe/2 raise" do
      stop_registry()

      assert :ets.whereis(Telemetry) == :undefined
      assert :ok = Telemetry.execute([:t, :none], %{}, %{})
      assert Telemetry.list_handlers() == []
      assert {:error, :not_found} = Telemetry.detach(id())
      assert :ok = Telemetry.unsubscribe()

      assert_raise ArgumentError, ~r/not running/, fn ->
        Telemetry.attach(id(), [[:t]], forward_to(self()))
      end

      assert_raise ArgumentError, ~r/not running/, fn -> Telemetry.subscribe([[:t]]) end
    after
      restart_registry()
    end
  end

  describe ":telemetry" do
    test "events/0 lists the documented events" do
      events = Telemetry.events()
      assert length(events) == 8
      assert [:elixir_scope, :layer2, :pressure] in events
      assert [:elixir_scope, :tracer, :stopped] in events
      {:docs_v1, _, _, _, %{"en" => doc}, _, _} = Code.fetch_docs(Telemetry)
      for e <- events, do: assert(doc =~ inspect(e))
    end

    if Code.ensure_loaded?(:telemetry) do
      @tag skip: ":telemetry is loaded"
    end

    test "absent: refresh/0 says so and the built-in API works alone" do
      refute Telemetry.refresh()
      id = id()
      :ok = Telemetry.attach(id, [[:t, :alone]], forward_to(self()))
      assert :ok = Telemetry.execute([:t, :alone], %{}, %{})
      assert_received {:handled, [:t, :alone], _, _, _}
      Telemetry.detach(id)
    end

    if Code.ensure_loaded?(:telemetry) do
      @tag skip: ":telemetry is loaded"
    end

    test "present: execute/3 forwards to :telemetry.execute/3" do
      on_exit(fn ->
        :code.purge(:telemetry)
        :code.delete(:telemetry)
        :code.purge(:telemetry)
        Telemetry.refresh()
      end)

      Process.register(self(), @sink)

      Code.compile_quoted(
        quote do
          defmodule :telemetry do
            def execute(event, measurements, metadata) do
              send(unquote(@sink), {:forwarded, event, measurements, metadata})
              :ok
            end
          end
        end
      )

      assert Telemetry.refresh()

      id = id()
      :ok = Telemetry.attach(id, [[:t, :fwd]], forward_to(self()))
      assert :ok = Telemetry.execute([:t, :fwd], %{n: 1}, %{pipeline: :p})
      assert_received {:handled, [:t, :fwd], %{n: 1}, %{pipeline: :p}, nil}
      assert_received {:forwarded, [:t, :fwd], %{n: 1}, %{pipeline: :p}}

      # Forwarded with nobody attached here, too.
      assert :ok = Telemetry.execute([:t, :unwatched], %{}, %{})
      assert_received {:forwarded, [:t, :unwatched], %{}, %{}}
      Telemetry.detach(id)

      # Unloaded without a refresh/0: execute/3 notices and stops forwarding.
      :code.purge(:telemetry)
      :code.delete(:telemetry)
      :code.purge(:telemetry)
      assert :ok = Telemetry.execute([:t, :fwd], %{}, %{})
      assert :ok = Telemetry.execute([:t, :fwd], %{}, %{})
      refute_received {:forwarded, _, _, _}
      refute Telemetry.refresh()
    end
  end

  # Stops the registry, wherever it was started.
  defp stop_registry do
    if Process.whereis(ElixirScope.Supervisor) &&
         Enum.any?(Supervisor.which_children(ElixirScope.Supervisor), &(elem(&1, 0) == Registry)) do
      :ok = Supervisor.terminate_child(ElixirScope.Supervisor, Registry)
    else
      :ok = stop_supervised(Registry)
    end
  end

  defp restart_registry do
    cond do
      Process.whereis(Registry) ->
        :ok

      Process.whereis(ElixirScope.Supervisor) &&
          Enum.any?(Supervisor.which_children(ElixirScope.Supervisor), &(elem(&1, 0) == Registry)) ->
        {:ok, _} = Supervisor.restart_child(ElixirScope.Supervisor, Registry)

      true ->
        start_supervised!(Registry)
    end
  end
end

defmodule ElixirScope.Capture.RingBufferLifecycleTest do
  # Not async: it counts ring resources node-wide.
  use ExUnit.Case, async: false

  alias ElixirScope.Capture.RingBuffer
  alias ElixirScope.Native

  describe "resource lifecycle" do
    test "rings are freed once no process holds a handle" do
      # Rings of earlier tests may still be on their way out (big ones are
      # dropped on a helper thread): start from a settled count.
      before = settled_count()
      parent = self()

      {pid, ref} =
        spawn_monitor(fn ->
          rings =
            for size <- [8, 1024, 8192] do
              {:ok, buf} = RingBuffer.new(size: size)
              for i <- 1..100, do: :ok = RingBuffer.write(buf, {i, String.duplicate("x", 100)})
              buf
            end

          send(parent, {:created, Native.rb_live_count()})
          # Keep the handles alive until told to exit.
          receive do
            :exit -> length(rings)
          end
        end)

      assert_receive {:created, during}
      assert during >= before + 3
      send(pid, :exit)
      assert_receive {:DOWN, ^ref, :process, ^pid, :normal}

      # The handles died with the process heap; destructors run when the VM
      # frees the resources (big rings are dropped on a helper thread).
      assert wait_until(fn -> Native.rb_live_count() <= before end),
             "live rings: #{Native.rb_live_count()}, expected at most #{before}"
    end
  end

  defp settled_count(last \\ -1, stable \\ 0) do
    Enum.each(Process.list(), &:erlang.garbage_collect/1)
    Process.sleep(20)

    case Native.rb_live_count() do
      ^last when stable >= 2 -> last
      ^last -> settled_count(last, stable + 1)
      n -> settled_count(n, 0)
    end
  end

  defp wait_until(fun, tries \\ 200) do
    cond do
      fun.() ->
        true

      tries == 0 ->
        false

      true ->
        :erlang.garbage_collect()
        Process.sleep(10)
        wait_until(fun, tries - 1)
    end
  end
end

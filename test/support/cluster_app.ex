defmodule ElixirScope.ClusterApp do
  @moduledoc false
  # A client -> server -> worker app for the multi-node tests: the client
  # (any node) calls the server (a GenServer on one node), which calls the
  # worker (a GenServer on another node) and answers with the worker's
  # result. Compiled only in the :test env; on the peers' code path.

  defmodule Worker do
    @moduledoc false
    use GenServer

    def start(name \\ __MODULE__), do: GenServer.start(__MODULE__, 0, name: name)
    def work(worker, x), do: GenServer.call(worker, {:work, x})

    @impl true
    def init(n), do: {:ok, n}

    @impl true
    def handle_call({:work, x}, _from, n), do: {:reply, double(x), n + 1}

    defp double(x), do: x * 2
  end

  defmodule Server do
    @moduledoc false
    use GenServer

    def start(worker, name \\ __MODULE__), do: GenServer.start(__MODULE__, worker, name: name)
    def ask(server, x), do: GenServer.call(server, {:ask, x})

    @impl true
    def init(worker), do: {:ok, worker}

    @impl true
    def handle_call({:ask, x}, _from, worker), do: {:reply, {:ok, Worker.work(worker, x)}, worker}
  end

  defmodule Client do
    @moduledoc false
    def run(server, x), do: Server.ask(server, x)

    # Calls that stay on their node (limits tests).
    def spin(0), do: :ok
    def spin(n), do: spin(n - 1)
  end
end

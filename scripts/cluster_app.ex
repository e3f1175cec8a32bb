# The cluster demo's app (scripts/cluster_demo.exs): a client on one node
# orders through a shop server on a second node, which prices each item
# with a pricer on a third node (a GenServer.call across nodes each time)
# and casts an audit note to the pricer (a message with no reply). The
# demo compiles this file and loads the modules on every node.

defmodule ClusterDemo.Pricer do
  use GenServer

  def start(name \\ __MODULE__),
    do: GenServer.start(__MODULE__, %{quotes: 0, audits: []}, name: name)

  def price(pricer, item), do: GenServer.call(pricer, {:price, item})
  def audit(pricer, note), do: GenServer.cast(pricer, {:audit, note})

  @impl true
  def init(state), do: {:ok, state}

  @impl true
  def handle_call({:price, item}, _from, state),
    do: {:reply, list_price(item), %{state | quotes: state.quotes + 1}}

  @impl true
  def handle_cast({:audit, note}, state), do: {:noreply, %{state | audits: [note | state.audits]}}

  defp list_price(:apple), do: 3
  defp list_price(:pear), do: 5
  defp list_price(_), do: 7
end

defmodule ClusterDemo.Shop do
  use GenServer

  def start(pricer, name \\ __MODULE__), do: GenServer.start(__MODULE__, pricer, name: name)
  def order(shop, items), do: GenServer.call(shop, {:order, items})

  @impl true
  def init(pricer), do: {:ok, pricer}

  @impl true
  def handle_call({:order, items}, _from, pricer) do
    total = items |> Enum.map(&ClusterDemo.Pricer.price(pricer, &1)) |> Enum.sum()
    ClusterDemo.Pricer.audit(pricer, {:order, length(items), total})
    {:reply, {:ok, total}, pricer}
  end
end

defmodule ClusterDemo.Client do
  def buy(shop, items), do: ClusterDemo.Shop.order(shop, items)
end

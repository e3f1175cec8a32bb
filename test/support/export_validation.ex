defmodule ElixirScope.ExportValidation do
  @moduledoc false
  # Checks of exported files that need no browser: a small JSON decoder
  # (this project has no JSON library), a validator for the JSON Schema
  # draft-07 keywords speedscope's published schema uses (fixtures/
  # speedscope-file-format-schema.json, copied from the speedscope 1.25.0
  # npm package's dist/release/file-format-schema.json; the browser script
  # checks the copy is unchanged), the speedscope importer's own rules, and
  # the Chrome Trace Event Format's rules.

  @schema Path.expand("fixtures/speedscope-file-format-schema.json", __DIR__)

  ## JSON

  @doc "Decodes a JSON text (objects as maps with string keys)."
  def decode!(text) when is_binary(text) do
    {v, rest} = value(skip_ws(text))

    case skip_ws(rest) do
      "" ->
        v

      more ->
        raise ArgumentError,
              "bytes after the JSON value: #{binary_part(more, 0, min(20, byte_size(more)))}"
    end
  end

  defp skip_ws(<<c, rest::binary>>) when c in ~c" \t\r\n", do: skip_ws(rest)
  defp skip_ws(b), do: b

  defp value(<<"{", rest::binary>>), do: object(skip_ws(rest), %{})
  defp value(<<"[", rest::binary>>), do: array(skip_ws(rest), [])
  defp value(<<"\"", rest::binary>>), do: string(rest, [])
  defp value(<<"true", rest::binary>>), do: {true, rest}
  defp value(<<"false", rest::binary>>), do: {false, rest}
  defp value(<<"null", rest::binary>>), do: {nil, rest}
  defp value(b), do: number(b)

  defp object(<<"}", rest::binary>>, acc), do: {acc, rest}

  defp object(<<"\"", rest::binary>>, acc) do
    {k, rest} = string(rest, [])
    <<":", rest::binary>> = skip_ws(rest)
    {v, rest} = value(skip_ws(rest))
    if Map.has_key?(acc, k), do: raise(ArgumentError, "duplicate key #{k}")
    acc = Map.put(acc, k, v)

    case skip_ws(rest) do
      <<",", rest::binary>> -> object(skip_ws(rest), acc)
      <<"}", rest::binary>> -> {acc, rest}
    end
  end

  defp array(<<"]", rest::binary>>, acc), do: {Enum.reverse(acc), rest}

  defp array(b, acc) do
    {v, rest} = value(b)

    case skip_ws(rest) do
      <<",", rest::binary>> -> array(skip_ws(rest), [v | acc])
      <<"]", rest::binary>> -> {Enum.reverse([v | acc]), rest}
    end
  end

  defp string(<<"\"", rest::binary>>, acc), do: {IO.iodata_to_binary(Enum.reverse(acc)), rest}

  defp string(<<"\\u", h::binary-size(4), rest::binary>>, acc) do
    c = String.to_integer(h, 16)

    case {c, rest} do
      {hi, <<"\\u", l::binary-size(4), rest2::binary>>} when hi in 0xD800..0xDBFF ->
        lo = String.to_integer(l, 16)
        string(rest2, [<<0x10000 + (hi - 0xD800) * 0x400 + (lo - 0xDC00)::utf8>> | acc])

      _ ->
        string(rest, [<<c::utf8>> | acc])
    end
  end

  defp string(<<"\\", e, rest::binary>>, acc) do
    c =
      case e do
        ?" -> "\""
        ?\\ -> "\\"
        ?/ -> "/"
        ?b -> "\b"
        ?f -> "\f"
        ?n -> "\n"
        ?r -> "\r"
        ?t -> "\t"
      end

    string(rest, [c | acc])
  end

  defp string(<<c, _::binary>>, _acc) when c < 0x20,
    do: raise(ArgumentError, "control character #{c} in a JSON string")

  defp string(<<c::utf8, rest::binary>>, acc), do: string(rest, [<<c::utf8>> | acc])

  defp number(b) do
    {num, rest} = take_number(b, [])
    s = IO.iodata_to_binary(num)

    v =
      if String.contains?(s, [".", "e", "E"]),
        do: String.to_float(normalize_float(s)),
        else: String.to_integer(s)

    {v, rest}
  end

  defp take_number(<<c, rest::binary>>, acc) when c in ~c"0123456789+-.eE",
    do: take_number(rest, [acc, c])

  defp take_number(rest, acc) when acc != [], do: {acc, rest}

  defp take_number(b, []),
    do: raise(ArgumentError, "not JSON at: #{binary_part(b, 0, min(20, byte_size(b)))}")

  # "1e5" and "1.5" → forms String.to_float/1 accepts.
  defp normalize_float(s) do
    s =
      if String.contains?(s, "."), do: s, else: String.replace(s, ~r/[eE]/, ".0e", global: false)

    s
  end

  ## JSON Schema (the draft-07 keywords speedscope's schema uses)

  @doc "speedscope's published file-format schema (decoded)."
  def speedscope_schema, do: @schema |> File.read!() |> decode!()

  @doc "Errors of `value` against `schema` (draft-07 subset): [] when valid."
  def schema_errors(value, schema), do: check(value, schema, schema, "$")

  defp check(v, %{"$ref" => "#/definitions/" <> name} = s, root, at) do
    check(v, root["definitions"][name], root, at) ++ check(v, Map.delete(s, "$ref"), root, at)
  end

  defp check(v, s, root, at) do
    Enum.flat_map(s, fn
      {"type", t} ->
        if type?(v, t), do: [], else: ["#{at}: not of type #{t}"]

      {"const", c} ->
        if v == c, do: [], else: ["#{at}: #{inspect(v)} is not #{inspect(c)}"]

      {"enum", e} ->
        if v in e, do: [], else: ["#{at}: #{inspect(v)} not in #{inspect(e)}"]

      {"required", r} when is_map(v) ->
        for k <- r, not Map.has_key?(v, k), do: "#{at}: missing #{k}"

      {"properties", ps} when is_map(v) ->
        Enum.flat_map(ps, fn {k, ps} ->
          if Map.has_key?(v, k), do: check(v[k], ps, root, "#{at}.#{k}"), else: []
        end)

      {"items", is} when is_list(v) ->
        v
        |> Enum.with_index()
        |> Enum.flat_map(fn {x, i} -> check(x, is, root, "#{at}[#{i}]") end)

      {"anyOf", alts} ->
        if Enum.any?(alts, &(check(v, &1, root, at) == [])),
          do: [],
          else: ["#{at}: matches none of anyOf"]

      {k, _} when k in ["title", "$schema", "definitions", "required", "properties", "items"] ->
        []

      {k, _} ->
        raise ArgumentError, "schema keyword #{k} not supported by this checker"
    end)
  end

  defp type?(v, "object"), do: is_map(v)
  defp type?(v, "array"), do: is_list(v)
  defp type?(v, "string"), do: is_binary(v)
  defp type?(v, "number"), do: is_number(v)
  defp type?(v, "boolean"), do: is_boolean(v)

  @doc """
  Errors of a decoded speedscope file: the schema, then what speedscope's
  evented-profile importer requires (frame indexes in range, `at`
  non-decreasing within [startValue, endValue], each close matching the
  innermost open frame, nothing left open).
  """
  def speedscope_errors(file) do
    schema = schema_errors(file, speedscope_schema())
    nframes = length(file["shared"]["frames"])

    rules =
      file["profiles"]
      |> Enum.with_index()
      |> Enum.flat_map(fn {p, i} ->
        {errs, stack, _} =
          Enum.reduce(p["events"], {[], [], p["startValue"]}, fn e, {errs, stack, last} ->
            errs =
              errs ++
                if(e["frame"] in 0..(nframes - 1),
                  do: [],
                  else: ["profile #{i}: frame #{e["frame"]}"]
                ) ++
                if(e["at"] >= last and e["at"] <= p["endValue"],
                  do: [],
                  else: ["profile #{i}: at #{e["at"]} out of order"]
                )

            frame = e["frame"]

            case {e["type"], stack} do
              {"O", _} ->
                {errs, [e["frame"] | stack], e["at"]}

              {"C", [f | rest]} when f == frame ->
                {errs, rest, e["at"]}

              {"C", _} ->
                {errs ++ ["profile #{i}: C #{e["frame"]} closes #{inspect(stack)}"], stack,
                 e["at"]}
            end
          end)

        if stack == [], do: errs, else: errs ++ ["profile #{i}: left open #{inspect(stack)}"]
      end)

    schema ++ rules
  end

  ## Chrome Trace Event Format

  @doc """
  Errors of a decoded Chrome trace (JSON object format): every event has
  `ph`, `pid`, `tid` and (but metadata) a number `ts`; `X` events have a
  `dur` >= 0 and, per thread, nest or are disjoint; `B`/`E` match per
  thread; every flow start `s` has exactly one end `f` with the same id
  (and the reverse), at or after it; metadata names every thread and
  process used.
  """
  def chrome_errors(%{"traceEvents" => evs} = file) when is_list(evs) do
    shape =
      Enum.flat_map(evs, fn e ->
        cond do
          not (is_binary(e["ph"]) and is_integer(e["pid"]) and is_integer(e["tid"])) ->
            ["event without ph/pid/tid: #{inspect(e)}"]

          e["ph"] != "M" and not is_number(e["ts"]) ->
            ["event without ts: #{inspect(e)}"]

          e["ph"] == "X" and not (is_number(e["dur"]) and e["dur"] >= 0) ->
            ["X without dur: #{inspect(e)}"]

          e["ph"] == "i" and e["s"] not in ["t", "p", "g", nil] ->
            ["instant with scope #{inspect(e["s"])}"]

          e["ph"] not in ~w(X B E i I s t f M C b e n) ->
            ["unknown phase #{e["ph"]}"]

          true ->
            []
        end
      end)

    by_thread = Enum.group_by(evs, &{&1["pid"], &1["tid"]})

    nesting =
      Enum.flat_map(by_thread, fn {thread, es} ->
        xs =
          es
          |> Enum.filter(&(&1["ph"] == "X"))
          # In integer nanoseconds (floats would add rounding overlaps).
          |> Enum.map(&{ns(&1["ts"]), ns(&1["ts"]) + ns(&1["dur"]), &1["name"]})
          # Outer first at equal starts.
          |> Enum.sort_by(fn {s, e, _} -> {s, -e} end)

        {errs, _} =
          Enum.reduce(xs, {[], []}, fn {s, e, n} = x, {errs, open} ->
            open = Enum.drop_while(open, fn {_, oe, _} -> oe <= s end)

            case open do
              [{_, oe, on} | _] when e > oe ->
                {["#{inspect(thread)}: #{n} [#{s}, #{e}] overlaps #{on} ending #{oe}" | errs],
                 open}

              _ ->
                {errs, [x | open]}
            end
          end)

        be =
          es
          |> Enum.filter(&(&1["ph"] in ["B", "E"]))
          |> Enum.sort_by(& &1["ts"])
          |> Enum.reduce({[], 0}, fn
            %{"ph" => "B"}, {errs, d} -> {errs, d + 1}
            %{"ph" => "E"}, {errs, 0} -> {["#{inspect(thread)}: E without B" | errs], 0}
            %{"ph" => "E"}, {errs, d} -> {errs, d - 1}
          end)
          |> case do
            {errs, 0} -> errs
            {errs, d} -> ["#{inspect(thread)}: #{d} B without E" | errs]
          end

        errs ++ be
      end)

    flows = Enum.filter(evs, &(&1["ph"] in ["s", "f"]))
    starts = flows |> Enum.filter(&(&1["ph"] == "s")) |> Enum.group_by(& &1["id"])
    ends = flows |> Enum.filter(&(&1["ph"] == "f")) |> Enum.group_by(& &1["id"])

    flow_errs =
      Enum.flat_map(starts, fn {id, ss} ->
        case {ss, ends[id]} do
          {[s], [f]} ->
            if f["ts"] >= s["ts"], do: [], else: ["flow #{inspect(id)} ends before it starts"]

          {_, nil} ->
            ["flow #{inspect(id)} has no end"]

          _ ->
            ["flow #{inspect(id)} has #{length(ss)} starts and #{length(ends[id])} ends"]
        end
      end) ++
        for({id, _} <- ends, not Map.has_key?(starts, id), do: "flow #{inspect(id)} has no start")

    named_threads =
      for %{"ph" => "M", "name" => "thread_name", "pid" => p, "tid" => t} <- evs,
          into: MapSet.new(),
          do: {p, t}

    named_procs =
      for %{"ph" => "M", "name" => "process_name", "pid" => p} <- evs, into: MapSet.new(), do: p

    names =
      for {{p, t}, es} <- by_thread,
          Enum.any?(es, &(&1["ph"] != "M")),
          err <- [
            if(MapSet.member?(named_threads, {p, t}),
              do: nil,
              else: "thread #{p}/#{t} has no name"
            ),
            if(MapSet.member?(named_procs, p), do: nil, else: "process #{p} has no name")
          ],
          err,
          do: err

    top = if is_map(file), do: [], else: ["not an object"]
    top ++ shape ++ nesting ++ flow_errs ++ Enum.uniq(names)
  end

  def chrome_errors(_), do: ["no traceEvents array"]

  @doc "Chrome trace microseconds (≤ 3 decimals) as integer nanoseconds."
  def ns(us) when is_integer(us), do: us * 1000
  def ns(us) when is_float(us), do: round(us * 1000)

  @doc "Parses folded-stack lines into `[{[frames], weight}]` (raises on a bad line)."
  def folded_lines!(text) do
    for line <- String.split(text, "\n", trim: true) do
      [stack, w] = Regex.run(~r/^(.+) (\d+)$/, line, capture: :all_but_first)
      {String.split(stack, ";"), String.to_integer(w)}
    end
  end
end

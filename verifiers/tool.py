"""The `tool` domain: four built-in tools, the environment that runs them, and the verifier.

The model sees `TOOLS` (JSON-schema function declarations, OpenAI style) in its system prompt and
answers a request by emitting `<tool_call>`s; the rollout engine stops at each `</tool_call>`, asks
`ToolEnv` for the results, appends them as `<tool_response>`s (data.chat.tool_response_ids) and lets
the model continue until it writes its final answer. Everything is a lookup in fixed tables, so a
rollout is deterministic and the verifier knows the right answer without running anything.

Reward (DOMAINS.md): 0.5 if the calls made, in order, are exactly `meta["expected_calls"]` (each one
a declared tool with valid arguments), plus 0.5 if, *with those calls made*, the final answer — the
text after the last tool response — contains `meta["answer"]`, case-insensitively. Splitting the
reward lets RL credit a model that calls the right tool before it learns to read the result back;
tying the answer half to the calls keeps it honest, since the answer check is a substring test: an
answer that lists every word of a table would otherwise earn 0.5 without calling anything.
"""
from data.chat import parse_response

# ----------------------------------------------------------------------------------------------
# the fixed tables (the data generator draws its questions from these)

WEATHER = {"Oslo": "rainy", "Paris": "sunny", "Tokyo": "cloudy", "Cairo": "hot", "Lima": "foggy",
           "Moscow": "snowy", "Sydney": "windy", "Nairobi": "mild", "Dublin": "drizzly",
           "Toronto": "cold", "Madrid": "dry", "Hanoi": "humid"}
PRICES = {"apple": "0.40", "bread": "2.10", "coffee": "3.50", "milk": "1.20", "cheese": "4.75",
          "rice": "1.80", "eggs": "2.60", "tea": "2.25", "butter": "3.10", "pasta": "1.45"}
CAPITALS = {"Norway": "Oslo", "France": "Paris", "Japan": "Tokyo", "Egypt": "Cairo", "Peru": "Lima",
            "Kenya": "Nairobi", "Ireland": "Dublin", "Spain": "Madrid", "Vietnam": "Hanoi",
            "Canada": "Ottawa", "Italy": "Rome", "Chile": "Santiago"}
# unit -> (target unit, conversion); the result is rounded to 2 decimals
CONVERSIONS = {"km": ("mi", lambda v: v * 0.621371), "kg": ("lb", lambda v: v * 2.20462),
               "c": ("f", lambda v: v * 9 / 5 + 32)}


def _fn(name, description, properties):
    # kept short: every tool prompt carries all four in the published XML layout (data/chat.py), some
    # 400 tokens of the tiny recipe's 512; the environment rejects unexpected arguments itself
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": list(properties)}}}


TOOLS = [
    _fn("get_weather", "Current weather in a city (e.g. Oslo), as one word.", {"city": {"type": "string"}}),
    _fn("get_price", "Price of a grocery item (e.g. coffee) in dollars.", {"item": {"type": "string"}}),
    _fn("get_capital", "Capital city of a country (e.g. Norway).", {"country": {"type": "string"}}),
    _fn("convert_units", "Convert a value from km to miles, kg to pounds or degrees C to degrees F.",
        {"value": {"type": "number"}, "unit": {"type": "string", "enum": sorted(CONVERSIONS)}}),
]
_DECLARED = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def argument_error(name, arguments):
    """Why a call does not match its declaration ('' when it does): unknown tool, not an object,
    missing / unexpected arguments, wrong type (a bool is not a number), value not in an enum."""
    if name not in _DECLARED:
        return f"unknown tool {name!r}"
    if not isinstance(arguments, dict):
        return "arguments must be an object"
    params = _DECLARED[name]
    for key in params["required"]:
        if key not in arguments:
            return f"missing argument {key!r}"
    for key, value in arguments.items():
        spec = params["properties"].get(key)
        if spec is None:
            return f"unexpected argument {key!r}"
        if spec["type"] == "string" and not isinstance(value, str):
            return f"argument {key!r} must be a string"
        if spec["type"] == "number" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"argument {key!r} must be a number"
        if "enum" in spec and value not in spec["enum"]:
            return f"argument {key!r} must be one of {spec['enum']}"
    return ""


def _lookup(table, key, what):
    # forgiving about case and spaces: the environment answers "oslo " like "Oslo"
    found = {k.casefold(): v for k, v in table.items()}.get(key.strip().casefold())
    return found if found is not None else f"error: unknown {what} {key!r}"


class ToolEnv:
    """Executes tool calls deterministically. Holds no state: one instance serves every rollout."""

    def run(self, name, arguments):
        """One call -> its result as a string; an unknown tool or bad argument gives an error string."""
        error = argument_error(name, arguments)
        if error:
            return f"error: {error}"
        if name == "get_weather":
            return _lookup(WEATHER, arguments["city"], "city")
        if name == "get_price":
            return _lookup(PRICES, arguments["item"], "item")
        if name == "get_capital":
            return _lookup(CAPITALS, arguments["country"], "country")
        target, convert = CONVERSIONS[arguments["unit"]]
        value = arguments["value"]
        if not abs(value) <= 1e12:  # before float(): a 400-digit integer overflows it (and NaN fails this)
            return "error: value out of range"
        return f"{convert(float(value)):.2f}"

    def respond(self, text):
        """The rollout's multi-turn hook: the results of the calls in the model's latest turn (the
        text after the last </tool_response>), in order. An empty list means there is nothing to
        answer and the turn is over. The calls are model output: whatever goes wrong running one
        becomes its "error: ..." result, never an exception in the middle of a rollout."""
        latest = text.rsplit("</tool_response>", 1)[-1]
        results = []
        for call in parse_response(latest)["tool_calls"]:
            try:
                results.append(self.run(call["name"], call["arguments"]))
            except Exception as e:  # a bug of ours on odd input: the model reads it as a failed call
                results.append(f"error: {type(e).__name__}: {str(e)[:200]}")
        return results


def calls_match(calls, expected_calls):
    """True iff the calls are exactly the expected ones, in order, each valid against TOOLS."""
    if len(calls) != len(expected_calls):
        return False
    for call, want in zip(calls, expected_calls):
        if argument_error(call["name"], call["arguments"]) or call["name"] != want["name"]:
            return False
        if call["arguments"] != want["arguments"]:
            return False
    return True


META_KEYS = ("expected_calls", "answer")   # what score reads from meta; verifiers.check_meta checks they are there


def check_meta(meta):
    """Raise ValueError unless meta holds a list of valid expected calls and a non-empty answer."""
    calls = meta["expected_calls"]
    if not isinstance(calls, list):
        raise ValueError("tool meta: expected_calls must be a list of {name, arguments}")
    for i, call in enumerate(calls):
        if not (isinstance(call, dict) and set(call) == {"name", "arguments"} and isinstance(call["name"], str)):
            raise ValueError(f"tool meta: expected_calls[{i}] must be {{name: str, arguments}}, got {call!r}")
        error = argument_error(call["name"], call["arguments"])
        if error:  # a call no model could match would make the reward unreachable
            raise ValueError(f"tool meta: expected_calls[{i}]: {error}")
    if not (isinstance(meta["answer"], str) and meta["answer"].strip()):
        raise ValueError(f"tool meta: answer must be a non-empty string, got {meta['answer']!r}")


def score(response, meta):
    """0.5 for exactly the expected calls, + 0.5 if they were made and the answer contains meta['answer']."""
    parsed = parse_response(response)
    calls_ok = calls_match(parsed["tool_calls"], meta["expected_calls"])
    answer_ok = meta["answer"].casefold() in parsed["answer"].casefold()
    return 0.5 * calls_ok + 0.5 * (calls_ok and answer_ok)

"""
The chat template of Nemotron-Cascade 2 (ChatML, the format Nemotron 3 Nano publishes), in one place.

    <|im_start|>system\n{system}\n\n# Tools\n\n… <tools>\n<function>\n<name>…</function>\n</tools><|im_end|>\n
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n<think>\n{reasoning}\n</think>\n{answer}<|im_end|>\n      a turn with reasoning
    <|im_start|>assistant\n<think></think>{answer}<|im_end|>\n                       a turn without

The system block is always there (empty when there is neither a system prompt nor tools). Tools are
declared as XML entries (<function><name>, <description>, <parameters> with one <parameter> each).
A tool call goes on its own lines after the answer text,

    <tool_call>\n<function=NAME>\n<parameter=P>\nvalue\n</parameter>\n</function>\n</tool_call>\n

and the results come back in the next user turn, one `<tool_response>\n…\n</tool_response>\n` per
call. Assistant turns before the last user query keep only their answer (`<think></think>` + answer):
the reasoning of an old turn is not shown to the model again. Whether a turn renders its reasoning
depends on the turn alone (it has some or not); the mode, thinking or not, only picks how the
generation prompt ends, "<think>\n" or "<think></think>", and a "/think" or "/no_think" in the system
prompt or a user turn switches it (the latest one wins). data/DOMAINS.md lists where we deviate
from the published template, and why; data/hf.py writes the same template in Jinja for Hugging Face.

Two facts drive the code below:
- Training and generation must agree token for token. So the text is built as a list of pieces
  and each piece is tokenized on its own: the generation prompt ("...assistant\n<think>\n") is then
  exactly a prefix of the training sequence, and the model's first generated token starts a piece.
- The loss (SFT) and the policy gradient (RL) may only touch tokens the model produces: an assistant
  turn's reasoning, answer, tool calls and closing <|im_end|>. Everything else is prompt, including
  the tool responses that the environment writes, so those pieces carry trained=False.

Messages may use our field names or the Hugging Face / OpenAI ones: "reasoning" or
"reasoning_content", and tool calls as {"name", "arguments"} or {"type": "function", "function":
{"name", "arguments"}} with the arguments an object or a JSON string (`message` reads them all).
"""

import json
import re

SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>",
                  "</tool_call>", "<tool_response>", "</tool_response>", "<tools>", "</tools>"]
PAD, IM_START, IM_END = "<|pad|>", "<|im_start|>", "<|im_end|>"

# The line before the tool declarations is ours, and the published template's paragraph of calling
# instructions after them is left out (data/DOMAINS.md says why); the markup is the published one.
TOOLS_HEAD = "# Tools\n\nYou can call the functions below.\n\n"


# ----------------------------------------------------------------------------------------------
# messages in either spelling -> ours


def tool_call(call):
    """One tool call, ours ({"name", "arguments"}) or OpenAI's ({"type": "function", "function":
    {"name", "arguments"}}, the arguments an object or a JSON string) -> {"name": str, "arguments":
    dict}. Raises ValueError(what is wrong) on anything else."""
    fn = call.get("function", call) if isinstance(call, dict) else None
    args = fn.get("arguments") if isinstance(fn, dict) else None
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            raise ValueError(f"tool call arguments are a string that is not JSON: {args[:80]!r}") from None
    if not (isinstance(fn, dict) and isinstance(fn.get("name"), str) and isinstance(args, dict)):
        raise ValueError('a tool call must be {"name": str, "arguments": object} or {"type": "function", '
                         f'"function": {{"name": str, "arguments": object or JSON string}}}}, got {json.dumps(call)[:80]}')
    return {"name": fn["name"], "arguments": args}


def message(m):
    """A message with our field names: "reasoning" (from "reasoning" or "reasoning_content"), "content"
    a string, "tool_calls" as {"name", "arguments"} (data/jsonl.py has checked the shapes)."""
    out = {"role": m["role"], "content": m.get("content") or ""}
    reasoning = m["reasoning"] if m.get("reasoning") is not None else m.get("reasoning_content")
    if reasoning is not None:
        out["reasoning"] = reasoning
    if m.get("tool_calls"):
        out["tool_calls"] = [tool_call(c) for c in m["tool_calls"]]
    return out


# ----------------------------------------------------------------------------------------------
# rendering


def _value(v):
    # how the template prints a value: objects and lists as JSON, anything else as Python's str()
    # does (Jinja's `string`): 3, 2.5, Oslo, True
    return json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) else str(v)


def _extra_keys(d, handled):
    # schema keys the layout below has no place for, each kept as <key>value</key>
    return "".join(f"\n<{k}>{_value(v)}</{k}>" for k, v in d.items() if k not in handled) \
        if isinstance(d, dict) else ""


def declare_tool(tool):
    """A JSON-schema function declaration (OpenAI's {"type": "function", "function": {...}} or the bare
    function) -> its XML entry in <tools>."""
    fn = tool.get("function", tool)
    out = f"\n<function>\n<name>{fn.get('name', '')}</name>"
    if "description" in fn:
        out += f"\n<description>{str(fn['description']).strip()}</description>"
    out += "\n<parameters>"
    params = fn.get("parameters")
    props = params.get("properties") if isinstance(params, dict) else None
    for name, spec in (props.items() if isinstance(props, dict) else []):
        spec = spec if isinstance(spec, dict) else {}
        out += f"\n<parameter>\n<name>{name}</name>"
        if "type" in spec:
            out += f"\n<type>{spec['type']}</type>"  # str() even of a list of types, as published
        if "description" in spec:
            out += f"\n<description>{str(spec['description']).strip()}</description>"
        if "enum" in spec:
            out += f"\n<enum>{json.dumps(spec['enum'], ensure_ascii=False)}</enum>"
        out += _extra_keys(spec, ("name", "type", "description", "enum")) + "\n</parameter>"
    out += _extra_keys(params, ("type", "properties", "required"))
    if isinstance(params, dict) and "required" in params:
        out += f"\n<required>{json.dumps(params['required'], ensure_ascii=False)}</required>"
    return out + "\n</parameters>" + _extra_keys(fn, ("type", "name", "description", "parameters")) + "\n</function>"


def format_tool_call(call):
    """{"name": "get_weather", "arguments": {"city": "Oslo"}} ->
    '<tool_call>\\n<function=get_weather>\\n<parameter=city>\\nOslo\\n</parameter>\\n</function>\\n</tool_call>\\n'"""
    params = "".join(f"<parameter={k}>\n{_value(v)}\n</parameter>\n" for k, v in call["arguments"].items())
    return f"<tool_call>\n<function={call['name']}>\n{params}</function>\n</tool_call>\n"


def _tool_responses(results):
    return "".join(f"<tool_response>\n{r}\n</tool_response>\n" for r in results)


def _think_prefix(thinking):
    # the part of the assistant header that belongs to the prompt: generation starts right after it
    return "<think>\n" if thinking else "<think></think>"


def _assistant_body(m, history):
    """An assistant turn between '<|im_start|>assistant\\n' and '<|im_end|>'. A turn's reasoning is shown
    only from the last user query on; an older turn keeps `<think></think>` and what follows it."""
    content, calls = m["content"], m.get("tool_calls", [])
    if m.get("reasoning", "").strip():
        text = f"<think>\n{m['reasoning']}\n</think>\n{content}"
    elif "<think>" in content or "</think>" in content:
        text = content  # reasoning written inline in the content: taken as it stands
    else:
        text = "<think></think>" + content
    if not history:
        body = text.strip()
    elif calls:  # (the published template cuts a turn with calls and one without slightly differently)
        after = text.rsplit("</think>", 1)[-1] if "</think>" in text else text.split("<think>", 1)[0]
        body = "<think></think>" + after.strip()
    else:
        both = "<think>" in text and "</think>" in text
        body = ("<think></think>" + text.rsplit("</think>", 1)[-1] if both else text).strip()
    return body + "\n" + "".join(format_tool_call(c) for c in calls) if calls else body


def render(messages, tools=None):
    """Messages (+ tool declarations) -> list of (text, trained) pieces; their concatenation is the text
    the Jinja template of data/hf.py renders. Consecutive "tool" messages become one user turn."""
    msgs = [message(m) for m in messages]
    system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else ""
    if tools:
        decls = "".join(declare_tool(t) for t in tools)
        system += ("\n\n" if system else "") + f"{TOOLS_HEAD}<tools>{decls}\n</tools>"
    pieces = [(f"{IM_START}system\n{system}{IM_END}\n", False)]
    # the last user query: assistant turns after it keep their reasoning
    last_query = max([i for i, m in enumerate(msgs) if m["role"] == "user"], default=-1)
    i = 0
    while i < len(msgs):
        m = msgs[i]
        if m["role"] == "user":
            pieces.append((f"{IM_START}user\n{m['content']}{IM_END}\n", False))
        elif m["role"] == "tool":
            results = []
            while i < len(msgs) and msgs[i]["role"] == "tool":
                results.append(msgs[i]["content"])
                i += 1
            pieces.append((f"{IM_START}user\n{_tool_responses(results)}{IM_END}\n", False))
            continue
        elif m["role"] == "assistant":
            body = _assistant_body(m, history=i < last_query)
            # the generation prompt ends with the turn's opening think tag(s): that much is prompt
            head = next((p for p in ("<think>\n", "<think></think>") if body.startswith(p)), "")
            pieces.append((f"{IM_START}assistant\n{head}", False))
            pieces.append((body[len(head):] + IM_END, True))
            pieces.append(("\n", False))
        else:
            raise ValueError(f"unknown role {m['role']!r} (expected system, user, assistant or tool)")
        i += 1
    return pieces


def thinking_mode(messages, default=True):
    """The mode of the next turn when none is given: the latest "/think" or "/no_think" in the system
    prompt or a user turn, else `default`."""
    mode = default
    for m in messages:
        text = m.get("content") if m["role"] in ("system", "user") else None
        if isinstance(text, str):
            on, off = text.rfind("/think"), text.rfind("/no_think")
            mode = True if on > off else False if off > on else mode
    return mode


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def encode_chat(tok, messages, tools=None):
    """-> (ids, mask): mask[i] = 1 where token i was produced by the model (the SFT/RL loss mask)."""
    ids, mask = [], []
    for text, trained in render(messages, tools):
        piece = _ids(tok, text)
        ids += piece
        mask += [int(trained)] * len(piece)
    return ids, mask


def generation_prompt_ids(tok, messages, tools=None, thinking=None):
    """The prompt for a new assistant turn; it ends with '<|im_start|>assistant\\n<think>\\n' (thinking)
    or '<|im_start|>assistant\\n<think></think>' (non-thinking). thinking=None: the messages' switch
    (thinking_mode); True or False overrides it, as `enable_thinking` does the Jinja template's."""
    thinking = thinking_mode(messages) if thinking is None else thinking
    ids = []
    for text, _ in render(messages, tools):
        ids += _ids(tok, text)
    return ids + _ids(tok, f"{IM_START}assistant\n") + _ids(tok, _think_prefix(thinking))


def tool_response_ids(tok, results, thinking):
    """What the environment appends after a turn that stopped at </tool_call>: close the turn as the
    template does ('\\n<|im_end|>'), give the results in a user turn, and open the next assistant turn
    (all of it prompt, never trained)."""
    text = f"\n{IM_END}\n{IM_START}user\n{_tool_responses(results)}{IM_END}\n{IM_START}assistant\n"
    return _ids(tok, text) + _ids(tok, _think_prefix(thinking))


def stop_ids(tok):
    """Token ids that end a turn: <|im_end|> (and <|endoftext|> where a tokenizer has one)."""
    ids = [tok.token_to_id(IM_END)]
    eos = tok.token_to_id("<|endoftext|>")
    return ids + ([eos] if eos is not None else [])


def decode(tok, ids):
    """Token ids -> text with the template's special tokens kept (the parser needs them)."""
    return tok.decode(list(ids), skip_special_tokens=False)


_PYTHON_LITERALS = {"True": True, "False": False, "None": None}  # what the template's str() writes


def _parse_value(text):
    text = text.strip()
    if text in _PYTHON_LITERALS:
        return _PYTHON_LITERALS[text]
    try:
        return json.loads(text)  # numbers, lists, objects, quoted strings (and JSON's true/false/null)
    except (ValueError, RecursionError):  # RecursionError: [[[[...]]]] deeper than the stack
        return text  # a bare string such as Oslo


# The tags as regexes. Each body is "tempered": it may not run past the next opener, so a flood of
# openers that never close is scanned once, not once per opener (a plain lazy `.*?` would rescan the
# rest of the text from every opener: quadratic on such output), and a malformed call cannot
# swallow the next one.
_TOOL_RESPONSE = re.compile(r"<tool_response>(?:(?!<tool_response>).)*?</tool_response>", re.S)
_CALL = re.compile(r"<tool_call>\s*<function=([^>\s]+)>((?:(?!<tool_call>).)*?)</function>\s*</tool_call>", re.S)
_PARAM = re.compile(r"<parameter=([^>\s]+)>((?:(?!<parameter=).)*?)</parameter>", re.S)


def parse_response(text):
    """Generated text (everything after the generation prompt, special tokens kept) ->
    dict(reasoning, answer, tool_calls). Never raises, whatever the text, and takes linear time.

    - tool_calls: every well-formed <tool_call> the model wrote, in order (tool responses skipped);
      argument values are JSON-decoded where they parse, else kept as strings.
    - answer: the final assistant segment (after the last </tool_response>), after its last </think>,
      cut at <|im_end|>, with tool calls removed. With no </think> it is that whole segment, unless
      the segment opened a <think> it never closed: then the model is still thinking, answer "".
    - reasoning: the text before the first </think> (empty without one).
    """
    text = str(text)
    calls = []
    for m in _CALL.finditer(_TOOL_RESPONSE.sub("", text)):
        args = {k: _parse_value(v) for k, v in _PARAM.findall(m.group(2))}
        calls.append({"name": m.group(1), "arguments": args})
    reasoning = text.split("</think>", 1)[0].removeprefix("<think>\n").removeprefix("<think>").strip() \
        if "</think>" in text else ""
    segment = text.rsplit("</tool_response>", 1)[-1]
    if "<think>" in segment and "</think>" not in segment.rsplit("<think>", 1)[-1]:
        segment = ""  # reasoning cut off (or never closed): no answer to score
    answer = segment.rsplit("</think>", 1)[-1].split(IM_END, 1)[0]
    answer = re.sub(r"<tool_call>.*?(</tool_call>|$)", "", answer, flags=re.S)
    for special in SPECIAL_TOKENS + ["<|endoftext|>"]:
        answer = answer.replace(special, "")
    return {"reasoning": reasoning, "answer": answer.strip(), "tool_calls": calls}

"""
The chat template of Nemotron-Cascade 2 (ChatML), in one place.

    <|im_start|>system\n{system}\n<tools>\n{one JSON declaration per line}\n</tools><|im_end|>\n
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n<think>\n{reasoning}\n</think>\n{answer}<|im_end|>\n      thinking mode
    <|im_start|>assistant\n<think></think>{answer}<|im_end|>\n                       non-thinking mode

Tool calls are written `<tool_call><function=NAME><parameter=P>value</parameter></function></tool_call>`
after the answer text; the results come back in the next user turn, one
`<tool_response>\n…\n</tool_response>` per call. Assistant turns before the last user query keep only
their answer (`<think></think>` + answer): the reasoning of an old turn is not shown to the model again.

Two facts drive the code below:
- Training and generation must agree token for token. So the text is built as a list of pieces
  and each piece is tokenized on its own: the generation prompt ("...assistant\n<think>\n") is then
  exactly a prefix of the training sequence, and the model's first generated token starts a piece.
- The loss (SFT) and the policy gradient (RL) may only touch tokens the model produces: an assistant
  turn's reasoning, answer, tool calls and closing <|im_end|>. Everything else is prompt, including
  the tool responses that the environment writes, so those pieces carry trained=False.
"""

import json
import re

SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<tool_call>",
                  "</tool_call>", "<tool_response>", "</tool_response>", "<tools>", "</tools>"]
PAD, IM_START, IM_END = "<|pad|>", "<|im_start|>", "<|im_end|>"


def _value_text(v):
    # strings go in raw (the common case: a city, an item); anything else as JSON
    return v if isinstance(v, str) else json.dumps(v)


def format_tool_call(call):
    """{"name": "get_weather", "arguments": {"city": "Oslo"}} -> '<tool_call><function=get_weather>…'"""
    params = "".join(f"<parameter={k}>{_value_text(v)}</parameter>" for k, v in call["arguments"].items())
    return f"<tool_call><function={call['name']}>{params}</function></tool_call>"


def _tool_responses(results):
    return "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)


def _think_prefix(thinking):
    # the part of the assistant header that belongs to the prompt: generation starts right after it
    return "<think>\n" if thinking else "<think></think>"


def render(messages, tools=None, thinking=None):
    """Messages (+ tool declarations) -> list of (text, trained) pieces.

    thinking=None infers the mode: thinking iff some assistant turn carries a "reasoning" key.
    Consecutive "tool" messages become one user turn of <tool_response> blocks.
    """
    if thinking is None:
        thinking = any(m["role"] == "assistant" and "reasoning" in m for m in messages)
    pieces = []
    msgs = list(messages)
    system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else None
    if system is not None or tools:
        text = system or ""
        if tools:
            decls = "\n".join(json.dumps(t, separators=(",", ":")) for t in tools)
            text += ("\n" if text else "") + f"<tools>\n{decls}\n</tools>"
        pieces.append((f"{IM_START}system\n{text}{IM_END}\n", False))
    # the last real user query: assistant turns after it keep their reasoning
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
            current = i > last_query
            think = thinking and current
            pieces.append((f"{IM_START}assistant\n{_think_prefix(think)}", False))
            body = f"{m.get('reasoning', '')}\n</think>\n" if think else ""
            calls = "".join(format_tool_call(c) for c in m.get("tool_calls") or [])
            content = m.get("content") or ""
            body += content + ("\n" if content and calls else "") + calls
            pieces.append((body + IM_END, True))
            pieces.append(("\n", False))
        else:
            raise ValueError(f"unknown role {m['role']!r} (expected system, user, assistant or tool)")
        i += 1
    return pieces


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def encode_chat(tok, messages, tools=None, thinking=None):
    """-> (ids, mask): mask[i] = 1 where token i was produced by the model (the SFT/RL loss mask)."""
    ids, mask = [], []
    for text, trained in render(messages, tools, thinking):
        piece = _ids(tok, text)
        ids += piece
        mask += [int(trained)] * len(piece)
    return ids, mask


def generation_prompt_ids(tok, messages, tools=None, thinking=True):
    """The prompt for a new assistant turn; it ends with '<|im_start|>assistant\\n<think>\\n'
    (thinking) or '<|im_start|>assistant\\n<think></think>' (non-thinking)."""
    ids = []
    for text, _ in render(messages, tools, thinking):
        ids += _ids(tok, text)
    return ids + _ids(tok, f"{IM_START}assistant\n") + _ids(tok, _think_prefix(thinking))


def tool_response_ids(tok, results, thinking):
    """What the environment appends after a turn that stopped at </tool_call>: close the turn, give
    the results in a user turn, and open the next assistant turn (all of it prompt, never trained)."""
    text = f"{IM_END}\n{IM_START}user\n{_tool_responses(results)}{IM_END}\n{IM_START}assistant\n"
    return _ids(tok, text) + _ids(tok, _think_prefix(thinking))


def stop_ids(tok):
    """Token ids that end a turn: <|im_end|> (and <|endoftext|> where a tokenizer has one)."""
    ids = [tok.token_to_id(IM_END)]
    eos = tok.token_to_id("<|endoftext|>")
    return ids + ([eos] if eos is not None else [])


def decode(tok, ids):
    """Token ids -> text with the template's special tokens kept (the parser needs them)."""
    return tok.decode(list(ids), skip_special_tokens=False)


def _parse_value(text):
    text = text.strip()
    try:
        return json.loads(text)  # numbers, booleans, lists, objects, quoted strings
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

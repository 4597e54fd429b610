"""The chat template: rendering, the trained-token mask, generation prompts, and parsing."""
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.chat import (SPECIAL_TOKENS, decode, encode_chat, generation_prompt_ids, parse_response,
                       render, stop_ids, thinking_mode, tool_response_ids)

TOOLS = [{"name": "get_weather", "description": "Weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    t.train_from_iterator(["the weather in Oslo is rainy", "what is 2 + 3? \\boxed{5}"] * 20, trainer)
    return t


def conversation():
    return [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning": "old thoughts", "content": "Hello!"},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "reasoning": "I should call the tool.", "content": "",
         "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
        {"role": "tool", "content": "rainy"},
        {"role": "assistant", "reasoning": "It says rainy.", "content": "It is rainy."},
    ]


def test_render_text_and_history_drops_old_reasoning():
    text = "".join(t for t, _ in render(conversation(), TOOLS))
    assert text.startswith("<|im_start|>system\nYou are helpful.\n\n# Tools\n\n")
    assert ("<tools>\n<function>\n<name>get_weather</name>\n<description>Weather of a city</description>\n"
            "<parameters>\n<parameter>\n<name>city</name>\n<type>string</type>\n</parameter>\n"
            "<required>[\"city\"]</required>\n</parameters>\n</function>\n</tools>") in text
    # history: the answer only, and (it had reasoning) the newline that followed </think>
    assert "<|im_start|>assistant\n<think></think>\nHello!<|im_end|>\n" in text
    assert "old thoughts" not in text
    assert ("<|im_start|>assistant\n<think>\nI should call the tool.\n</think>\n"
            "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n"
            "</tool_call>\n<|im_end|>\n"
            "<|im_start|>user\n<tool_response>\nrainy\n</tool_response>\n<|im_end|>\n"
            "<|im_start|>assistant\n<think>\nIt says rainy.\n</think>\nIt is rainy.<|im_end|>\n") in text


def test_render_published_details():
    """The published template's smaller rules: the system block is always there; a turn without
    reasoning is '<think></think>' + answer in either mode; a history turn without reasoning keeps
    no newline; parameter values print as Python's str() does (True, 2.5), objects and lists as JSON;
    the OpenAI / Hugging Face field spellings render as ours."""
    user = {"role": "user", "content": "Hi"}
    assert "".join(t for t, _ in render([user])) == "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    plain = "".join(t for t, _ in render([user, {"role": "assistant", "content": "Hey"}]))
    assert plain.endswith("<|im_start|>assistant\n<think></think>Hey<|im_end|>\n")
    old = "".join(t for t, _ in render([user, {"role": "assistant", "content": "Hey"}, user]))
    assert "<think></think>Hey<|im_end|>" in old
    call = {"name": "f", "arguments": {"flag": True, "x": 2.5, "tags": ["a", "b"], "none": None}}
    text = "".join(t for t, _ in render([user, {"role": "assistant", "content": "", "tool_calls": [call]}]))
    assert ("<parameter=flag>\nTrue\n</parameter>\n<parameter=x>\n2.5\n</parameter>\n"
            "<parameter=tags>\n[\"a\", \"b\"]\n</parameter>\n<parameter=none>\nNone\n</parameter>\n") in text
    assert parse_response(text.split("<|im_start|>assistant\n")[-1])["tool_calls"] == [call]
    openai = {"role": "assistant", "content": None, "reasoning_content": "think",
              "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": json.dumps(call["arguments"])}}]}
    ours = {"role": "assistant", "content": "", "reasoning": "think", "tool_calls": [call]}
    assert render([user, openai]) == render([user, ours])


def test_thinking_switches():
    """enable_thinking's counterpart: an explicit mode wins; without one the latest /think or
    /no_think in the system prompt or a user turn decides; with neither, thinking."""
    assert thinking_mode([{"role": "user", "content": "Hi"}])
    assert not thinking_mode([{"role": "system", "content": "/no_think"}, {"role": "user", "content": "Hi"}])
    assert thinking_mode([{"role": "system", "content": "/no_think"}, {"role": "user", "content": "Hi /think"}])
    assert not thinking_mode([{"role": "user", "content": "/think then /no_think"}])
    assert thinking_mode([{"role": "user", "content": "x"}, {"role": "assistant", "content": "/no_think"}])


@pytest.mark.parametrize("thinking", [True, False])
def test_generation_prompt_is_a_prefix_of_training_ids(tok, thinking):
    msgs = [{"role": "user", "content": "what is 2 + 3?"}]
    reply = {"role": "assistant", "content": "\\boxed{5}"}
    if thinking:
        reply["reasoning"] = "2 + 3 = 5."
    ids, mask = encode_chat(tok, msgs + [reply])
    prompt = generation_prompt_ids(tok, msgs, thinking=thinking)
    assert ids[:len(prompt)] == prompt
    assert mask[:len(prompt)] == [0] * len(prompt) and mask[len(prompt)] == 1
    assert decode(tok, prompt).endswith("<think>\n" if thinking else "<think></think>")
    assert ids[len(prompt) + sum(mask) - 1] == stop_ids(tok)[0]  # the trained part ends at <|im_end|>


def test_tool_response_ids_match_the_rendered_conversation(tok):
    # what the rollout environment appends must be what SFT trained on
    conv = conversation()
    ids, _ = encode_chat(tok, conv, TOOLS)
    text = decode(tok, ids)
    appended = decode(tok, tool_response_ids(tok, ["rainy"], thinking=True))
    assert ("</tool_call>" + appended) in text


def test_parse_response():
    out = parse_response("Let me see.\n</think>\n<tool_call><function=get_weather><parameter=city>Oslo"
                         "</parameter><parameter=days>3</parameter></function></tool_call><|im_end|>\n"
                         "<|im_start|>user\n<tool_response>\n<tool_call><function=x></function></tool_call>"
                         "\n</tool_response><|im_end|>\n<|im_start|>assistant\n<think></think>It is rainy.<|im_end|>")
    assert out["reasoning"] == "Let me see."
    assert out["tool_calls"] == [{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}]
    assert out["answer"] == "It is rainy."
    assert parse_response("2 + 3 = 5.\n</think>\nThe answer is \\boxed{5}.<|im_end|>junk")["answer"] == \
        "The answer is \\boxed{5}."
    assert parse_response("no think at all")["answer"] == "no think at all"
    # thinking mode: the verifiers see the turn from its <think>; reasoning never closed = no answer
    assert parse_response("<think>\nthe answer is \\boxed{5}<|im_end|>")["answer"] == ""
    closed = parse_response("<think>\n2 + 3 = 5.\n</think>\n\\boxed{5}<|im_end|>")
    assert closed == {"reasoning": "2 + 3 = 5.", "answer": "\\boxed{5}", "tool_calls": []}
    assert parse_response("<think></think>\\boxed{5}<|im_end|>")["answer"] == "\\boxed{5}"
    for garbage in ["", "</think>" * 5, "<tool_call><function=", "\x00\xff" * 100, "<tool_call>" * 1000]:
        assert isinstance(parse_response(garbage)["answer"], str)


def test_parse_response_keeps_odd_parameter_values_as_text():
    deep = "[" * 5000 + "]" * 5000  # valid JSON, nested deeper than the interpreter's stack
    for value in (deep, "9" * 5000, "[1, 2"):  # too deep, too many digits for int(), not JSON
        text = f"<tool_call><function=f><parameter=x>{value}</parameter></function></tool_call>"
        assert parse_response(text)["tool_calls"] == [{"name": "f", "arguments": {"x": value}}]


@pytest.mark.parametrize("unit", ["<tool_call><function=a>", "<tool_call><function=a><parameter=x>",
                                  "<tool_response>", "<tool_call><function=a>x</function>"])
def test_parse_response_of_unclosed_markers(unit):
    """200 KB of openers that never close (model output can be anything). The parser's tempered
    regexes scan such text once (milliseconds); plain lazy ones rescanned the rest of the text from
    each opener (quadratic: about 20 s for this text on the development machine, measured once,
    not asserted here)."""
    text = unit * (200_000 // len(unit)) + "</tool_call>"
    out = parse_response(text)
    if unit.endswith("</function>"):  # only the last opener before the closer makes a call
        assert out["tool_calls"] == [{"name": "a", "arguments": {}}]
    else:
        assert out["tool_calls"] == []


def test_parse_response_calls_and_parameters():
    # whitespace between the tags is allowed; a call ends at its own </tool_call>; a malformed call or
    # parameter is skipped, the others are kept
    text = ("<tool_call>\n<function=f>\n<parameter=a>1</parameter>\n<parameter=b c>2</parameter>"
            "<parameter=d>x</parameter>\n</function>\n</tool_call> text <tool_call><function=g></tool_call>"
            "<tool_call><function= h></function></tool_call><tool_call><function=k></function></tool_call>")
    assert parse_response(text)["tool_calls"] == [{"name": "f", "arguments": {"a": 1, "d": "x"}},
                                                  {"name": "k", "arguments": {}}]
    assert parse_response(text)["answer"] == "text"

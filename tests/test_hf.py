"""Checkpoints for Hugging Face tools (data/hf.py): the Jinja chat template renders what data/chat.py
renders, token for token (with jinja2, set up as transformers sets it up); every checkpoint carries
tokenizer_config.json and generation_config.json (an init checkpoint's generation_config.json kept);
and, where transformers is installed, a saved checkpoint loads in AutoTokenizer +
AutoModelForCausalLM, apply_chat_template gives data/chat.py's ids and generate stops at <|im_end|>."""
import json
import os

import pytest
import torch

from common import save_checkpoint
from data.chat import IM_END, encode_chat, generation_prompt_ids, render
from data.domains import DOMAINS, generate, prompt_record, sft_record
from data.hf import CHAT_TEMPLATE
from data.tokenizer import save_tokenizer, train_tokenizer
from model import ModelConfig, Transformer
from verifiers.tool import TOOLS

CALL = {"name": "convert_units", "arguments": {"value": 12.5, "unit": "km"}}
CONVERSATIONS = [   # (messages, tools): every branch of the template at least once
    ([{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Hi"},
      {"role": "assistant", "reasoning": "old thoughts", "content": "Hello!"},
      {"role": "user", "content": "12.5 km in miles?"},
      {"role": "assistant", "reasoning": "Convert it.", "content": "", "tool_calls": [CALL, CALL]},
      {"role": "tool", "content": "7.77"}, {"role": "tool", "content": "7.77"},
      {"role": "assistant", "reasoning": "It says 7.77.", "content": "About 7.77 miles."}], TOOLS),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {"on": True, "xs": [1, 2], "o": {"a": None}}}}]},
      {"role": "tool", "content": "done"}, {"role": "user", "content": "And? /no_think"},
      {"role": "assistant", "reasoning_content": "hmm", "content": "  Done.  "}], None),
    ([{"role": "system", "content": ""}, {"role": "user", "content": "a"},
      {"role": "assistant", "content": "<think>inline</think>b"}, {"role": "user", "content": "c"},
      {"role": "assistant", "content": "", "reasoning": "r", "tool_calls": [CALL]},
      {"role": "user", "content": "d"}], [{"name": "bare", "parameters": {"type": "object"}, "strict": True},
                                          {"name": "g", "description": " padded ", "parameters": {"type": "object",
                                           "properties": {"x": {"type": ["string", "null"], "default": None,
                                                                "items": {"type": "integer"}}}}}]),
]


def domain_records():
    """Every built-in domain's SFT conversations (both modes) and RL prompts."""
    out = []
    for d in DOMAINS:
        for it in generate(d, "sft", 2, seed=3):
            out += [sft_record(d, it, thinking=True), sft_record(d, it, thinking=False), prompt_record(d, it)]
    return [(r["messages"], r.get("tools")) for r in out]


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    texts = ["".join(t for t, _ in render(m, tools)) for m, tools in CONVERSATIONS + domain_records()]
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
    save_tokenizer(train_tokenizer(texts, 600), path)
    return path


@pytest.fixture(scope="module")
def template():
    """CHAT_TEMPLATE compiled as transformers compiles chat templates."""
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(CHAT_TEMPLATE)


def test_jinja_template_renders_what_chat_renders(template, tok_path):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(tok_path)
    cases = CONVERSATIONS + domain_records()
    for messages, tools in cases:
        text = template.render(messages=messages, tools=tools)
        assert text == "".join(t for t, _ in render(messages, tools))
        # the same ids: tokenizing the whole text gives what data/chat.py's pieces give
        assert tok.encode(text, add_special_tokens=False).ids == encode_chat(tok, messages, tools)[0]
    for messages, tools in [(m[:-1], t) for m, t in cases if m[-1]["role"] == "assistant"] + cases[-1:]:
        for thinking in (True, False, None):   # None: the messages' /think, /no_think switches
            kw = {} if thinking is None else {"enable_thinking": thinking}
            text = template.render(messages=messages, tools=tools, add_generation_prompt=True, **kw)
            assert tok.encode(text, add_special_tokens=False).ids == generation_prompt_ids(tok, messages, tools, thinking)


def rigged_model(tok):
    """A random model that answers <|im_end|> to anything: every layer's output projection is zero,
    so the last hidden state is the token's embedding, whose coordinate 0 is large, and only
    <|im_end|>'s row of lm_head reads that coordinate."""
    config = ModelConfig.from_dict(dict(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                                        num_experts_per_tok=2, moe_intermediate_size=16, intermediate_size=24,
                                        tie_word_embeddings=False))
    torch.manual_seed(0)
    model = Transformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "o_proj" in name or "down_proj" in name or name == "lm_head.weight":
                p.zero_()
        model.model.embed_tokens.weight[:, 0] = 100.0
        model.lm_head.weight[tok.token_to_id(IM_END), 0] = 1.0
    return model


def test_checkpoint_carries_tokenizer_config_and_generation_config(tmp_path, tok_path):
    from data.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_path)
    save_checkpoint(tmp_path / "ckpt", rigged_model(tok), tok_path)
    config = json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["pad_token"], config["chat_template"]) == (IM_END, "<|pad|>", CHAT_TEMPLATE)
    generation = json.loads((tmp_path / "ckpt" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tok.token_to_id(IM_END)]
    assert generation["pad_token_id"] == tok.token_to_id("<|pad|>")
    # a checkpoint saved from one that has its own generation_config.json keeps that file
    mine = {"eos_token_id": [tok.token_to_id(IM_END)], "temperature": 0.6, "top_p": 0.95}
    (tmp_path / "ckpt" / "generation_config.json").write_text(json.dumps(mine))
    save_checkpoint(tmp_path / "next", rigged_model(tok), str(tmp_path / "ckpt" / "tokenizer.json"))
    assert json.loads((tmp_path / "next" / "generation_config.json").read_text()) == mine


HF_CHAT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
cases = json.load(open("cases.json"))
tok = AutoTokenizer.from_pretrained("ckpt")
model = AutoModelForCausalLM.from_pretrained("ckpt", dtype=torch.float32)
rendered = [tok.apply_chat_template(c["messages"], tools=c["tools"], tokenize=True, return_dict=True,
                                    add_generation_prompt=c["prompt"])["input_ids"] for c in cases]
prompt = torch.tensor([rendered[-1]])
out = model.generate(prompt, max_new_tokens=8, do_sample=False)
print(json.dumps({"rendered": rendered, "new": out[0, prompt.shape[1]:].tolist(), "eos": tok.eos_token}))
"""


def test_transformers_loads_a_checkpoint_chats_and_stops(tmp_path, tok_path, transformers_python):
    from data.tokenizer import load_tokenizer
    tok = load_tokenizer(tok_path)
    save_checkpoint(tmp_path / "ckpt", rigged_model(tok), tok_path)
    cases = [dict(messages=m, tools=t, prompt=False) for m, t in CONVERSATIONS[:1]]
    cases += [dict(messages=[{"role": "user", "content": "What is 2 + 3?"}], tools=None, prompt=True)]
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    got = json.loads(transformers_python(HF_CHAT, tmp_path).strip().splitlines()[-1])
    assert got["rendered"][0] == encode_chat(tok, cases[0]["messages"], cases[0]["tools"])[0]
    assert got["rendered"][1] == generation_prompt_ids(tok, cases[1]["messages"])
    # generate stops at <|im_end|>: without eos in the checkpoint it would write it 8 times
    assert got["eos"] == IM_END and got["new"] == [tok.token_to_id(IM_END)]
    assert os.path.isfile(tmp_path / "ckpt" / "generation_config.json")

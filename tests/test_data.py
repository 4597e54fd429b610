"""The data side: tokenizer, domain generators, dataset build, JSONL loading.

The chat template itself is tested in test_chat.py; here it is exercised on what the generators
produce (tools, thinking, multi-turn), with a tokenizer trained on that data on the fly.
"""
import json
import os
import random
import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import verifiers
from data import DOMAINS, build, load_jsonl, load_tokenizer, train_tokenizer
from data.chat import SPECIAL_TOKENS, decode, encode_chat, generation_prompt_ids, render
from data.domains import EVAL_EVERY, generate, preference_pair, sft_record, split_of
from data.tokenizer import save_tokenizer
from verifiers.chat import judge

SIZES = dict(sft=180, rl=12, eval=10, prefs=16)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("data"))
    return build(out, seed=3, sizes=SIZES, vocab_size=700, doc_lines=8)


@pytest.fixture(scope="module")
def tok(built):
    return load_tokenizer(built)


# ---------------------------------------------------------------------------------------------
# tokenizer

WEIRD = ["", " ", "  two leading spaces", "tabs\tand\nnewlines\n\n", "trailing space ", "héllo wörld ✓ 日本語 🙂",
         "\\boxed{12}", "<|im_sta", "<think", "a<think>b</think>c", "<|im_start|><|im_end|>", "\x00\x7f\r\n",
         "x" * 300, "def f(xs):\n    return [x + 1 for x in xs]\n"]


def test_tokenizer_round_trips_any_text_and_keeps_special_tokens_whole(tok):
    for text in WEIRD:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert decode(tok, ids) == text, text
    for t in SPECIAL_TOKENS:
        tid = tok.token_to_id(t)
        assert tid is not None
        ids = tok.encode(f"ab{t}cd", add_special_tokens=False).ids
        assert ids.count(tid) == 1 and decode(tok, ids) == f"ab{t}cd"
    assert tok.get_vocab_size() <= 700


def test_tokenizer_learns_the_domain_text():
    # trained on the rendered chat data, the BPE compresses it: frequent words become single tokens
    texts = [t for d in DOMAINS for it in generate(d, "sft", 10, seed=0)
             for t, _ in render(sft_record(d, it, thinking=True)["messages"])]
    small, big = train_tokenizer(texts, 300), train_tokenizer(texts, 1000)
    assert 950 <= big.get_vocab_size() <= 1000
    n_small = sum(len(small.encode(t).ids) for t in texts)
    n_big = sum(len(big.encode(t).ids) for t in texts)
    assert n_big < 0.7 * n_small
    assert big.token_to_id("boxed") is not None


def test_load_tokenizer_checks_special_tokens(tmp_path, tok):
    save_tokenizer(tok, str(tmp_path / "ours" / "tokenizer.json"))
    again = load_tokenizer(str(tmp_path / "ours"))  # a directory works too
    assert again.encode("<|im_start|>user\nhi").ids == tok.encode("<|im_start|>user\nhi").ids

    # a foreign tokenizer without some of the markers: the error names them
    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    t.train_from_iterator(["some text"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>", "<think>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.save(str(tmp_path / "foreign.json"))
    with pytest.raises(ValueError, match=r"foreign.json.*'</think>', '<tool_call>'"):
        load_tokenizer(str(tmp_path / "foreign.json"))

    # Qwen3-like: every structural marker, but no <|pad|> and no <tools>: loads, <|pad|> is added
    qwen = [s for s in SPECIAL_TOKENS if s not in ("<|pad|>", "<tools>", "</tools>")]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    t.train_from_iterator(["some text"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"] + qwen, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t.save(str(tmp_path / "qwen.json"))
    q = load_tokenizer(str(tmp_path / "qwen.json"))
    assert q.token_to_id("<|pad|>") == t.get_vocab_size()
    assert decode(q, q.encode("<tools>\n{}\n</tools>").ids) == "<tools>\n{}\n</tools>"

    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        load_tokenizer(str(tmp_path / "broken.json"))


# ---------------------------------------------------------------------------------------------
# template + mask on generated conversations

def response_of(tok, rec):
    """What a rollout would have produced for this SFT record: the tokens after the generation
    prompt up to the last trained token (<|im_end|>), decoded; tool responses included."""
    msgs, tools = rec["messages"], rec.get("tools")
    thinking = any("reasoning" in m for m in msgs)
    ids, mask = encode_chat(tok, msgs, tools)
    first_reply = next(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    prompt = generation_prompt_ids(tok, msgs[:first_reply], tools, thinking)
    assert ids[:len(prompt)] == prompt and not any(mask[:len(prompt)])
    end = max(i for i, m in enumerate(mask) if m) + 1
    return decode(tok, ids[len(prompt):end])


@pytest.mark.parametrize("thinking", [True, False])
def test_tool_conversation_mask(tok, thinking):
    it = generate("tool", "sft", 1, seed=5)[0]
    rec = sft_record("tool", it, thinking)
    ids, mask = encode_chat(tok, rec["messages"], rec["tools"])
    text = "".join(t for t, _ in render(rec["messages"], rec["tools"]))
    assert decode(tok, ids) == text  # the template round-trips through the tokenizer
    trained = decode(tok, [i for i, m in zip(ids, mask) if m])
    call, result, final = it["turns"]
    assert call["content"] == ""  # the call turn: (reasoning,) a newline, the call
    expect = ((f"{call['reasoning']}\n</think>" if thinking else "") + "\n" + _call_text(call) + "<|im_end|>"
              + (f"{final['reasoning']}\n</think>\n" if thinking else "") + final["content"] + "<|im_end|>")
    assert trained == expect
    untrained = decode(tok, [i for i, m in zip(ids, mask) if not m])
    assert f"<tool_response>\n{result['content']}\n</tool_response>" in untrained
    assert "<tools>" in untrained and it["prompt"] in untrained
    assert ("<think>\n" in untrained) == thinking


def _call_text(m):
    (c,) = m["tool_calls"]
    params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in c["arguments"].items())
    return f"<tool_call>\n<function={c['name']}>\n{params}</function>\n</tool_call>\n"


# ---------------------------------------------------------------------------------------------
# generators: correct answers, determinism, difficulty, disjoint splits

SANDBOXED = {"code", "swe"}


@pytest.mark.parametrize("domain", DOMAINS)
def test_every_reference_answer_scores_one(tok, domain):
    # both difficulties, both modes, through the tokenizer exactly as a rollout would see it
    n = 8 if domain in SANDBOXED else 40
    items = generate(domain, "sft", n, seed=1) + generate(domain, "rl", n, seed=1, difficulty=1.0)
    recs = [sft_record(domain, it, thinking=i % 2 == 0) for i, it in enumerate(items)]
    responses = [response_of(tok, r) for r in recs]
    scores = verifiers.score_many([domain] * len(items), responses, [it["meta"] for it in items])
    bad = [(r, it["meta"]) for r, it, s in zip(responses, items, scores) if s != 1.0]
    assert not bad, bad[:2]


def test_tasks_are_not_degenerate():
    # a test suite that a constant function passes, or a swe bug the tests do not catch, would
    # reward the wrong thing: code tests have at least two distinct outputs, and the unpatched swe
    # module (a patch that changes nothing) fails its tests
    for it in generate("code", "x", 200, seed=0, difficulty=0.5):
        assert len({json.dumps(t[1]) for t in it["meta"]["tests"]}) >= 2, it["prompt"]
    items = generate("swe", "x", 4, seed=0, difficulty=0.5)
    noops = []
    for it in items:
        search = it["turns"][0]["content"].split("\n")[2]  # the buggy line
        noops.append(f"module.py\n<<<<<<< SEARCH\n{search}\n=======\n{search}\n>>>>>>> REPLACE")
    assert verifiers.score_many(["swe"] * 4, noops, [it["meta"] for it in items]) == [0.0] * 4


def test_generation_is_deterministic_and_seeded():
    for d in DOMAINS:
        a, b = generate(d, "rl", 6, seed=7, difficulty=0.5), generate(d, "rl", 6, seed=7, difficulty=0.5)
        assert a == b
        assert [x["key"] for x in a] != [x["key"] for x in generate(d, "rl", 6, seed=8, difficulty=0.5)]


def test_build_is_deterministic_idempotent_and_atomic(built, tmp_path):
    other = build(str(tmp_path / "again"), seed=3, sizes=SIZES, vocab_size=700, doc_lines=8)
    names = sorted(os.path.relpath(os.path.join(r, f), built) for r, _, fs in os.walk(built) for f in fs)
    assert len(names) == 5 + 2 * len(DOMAINS)  # build.json, tokenizer, sft, prefs x2; rl + eval per domain
    for name in names:
        with open(os.path.join(built, name), "rb") as f, open(os.path.join(other, name), "rb") as g:
            assert f.read() == g.read(), name
    # a second run changes nothing; a lost file is rebuilt identically; other arguments are refused
    mtimes = {n: os.stat(os.path.join(other, n)).st_mtime_ns for n in names}
    build(other, seed=3, sizes=SIZES, vocab_size=700, doc_lines=8)
    assert mtimes == {n: os.stat(os.path.join(other, n)).st_mtime_ns for n in names}
    os.remove(os.path.join(other, "rl", "math.jsonl"))
    build(other, seed=3, sizes=SIZES, vocab_size=700, doc_lines=8)
    assert open(os.path.join(other, "rl", "math.jsonl")).read() == open(os.path.join(built, "rl", "math.jsonl")).read()
    with pytest.raises(ValueError, match="built with"):
        build(other, seed=4, sizes=SIZES, vocab_size=700, doc_lines=8)
    assert not [n for n in os.listdir(other) if ".tmp" in n]


def test_built_files_load_and_have_the_right_shape(built):
    sft = load_jsonl(os.path.join(built, "sft.jsonl"), "sft")
    assert len(sft) == SIZES["sft"]
    counts = {d: sum(r["domain"] == d for r in sft) for d in DOMAINS}
    assert set(counts.values()) == {SIZES["sft"] // len(DOMAINS)}
    thinking = sum("reasoning" in r["messages"][-1] for r in sft)
    assert 0.3 * len(sft) < thinking < 0.7 * len(sft)  # a mix of both modes
    for r in sft:  # a conversation is in one mode: every assistant turn has reasoning, or none has
        assert len({"reasoning" in m for m in r["messages"] if m["role"] == "assistant"}) == 1
        assert ("tools" in r) == (r["domain"] == "tool")
    for d in DOMAINS:
        for split in ("rl", "eval"):
            recs = load_jsonl(os.path.join(built, split, f"{d}.jsonl"), "rl")
            assert len(recs) == SIZES[split] and {r["domain"] for r in recs} == {d}
            assert all(r["messages"][-1]["role"] == "user" for r in recs)
    assert len(load_jsonl(os.path.join(built, "prefs", "train.jsonl"), "prefs")) == SIZES["prefs"]


def test_train_and_eval_are_disjoint(built):
    for d in DOMAINS:
        ev = generate(d, "eval", 30, seed=0, difficulty=0.5)
        train = generate(d, "sft", 100, seed=0) + generate(d, "rl", 60, seed=0, difficulty=0.5)
        ev_keys = {x["key"] for x in ev}
        assert len(ev_keys) == len(ev)  # eval has no duplicates
        assert not ev_keys & {x["key"] for x in train}
        assert all(split_of(d, k) == "eval" for k in ev_keys)
        # the partition is the same whatever the seed: a different seed's eval stays out of train
        assert not {x["key"] for x in generate(d, "eval", 10, seed=9)} & {x["key"] for x in train}
    # and in the files: no eval prompt text appears as a training prompt
    seen = {r["messages"][0]["content"] for r in load_jsonl(os.path.join(built, "sft.jsonl"), "sft")}
    for d in DOMAINS:
        seen |= {r["messages"][-1]["content"] for r in load_jsonl(os.path.join(built, "rl", f"{d}.jsonl"), "rl")}
    for d in DOMAINS:
        for r in load_jsonl(os.path.join(built, "eval", f"{d}.jsonl"), "rl"):
            assert r["messages"][-1]["content"] not in seen
    # the eval bucket is about 1 in EVAL_EVERY of the keys
    keys = [x["key"] for x in generate("math", "sft", 2000, seed=0)]
    frac = sum(split_of("math", f"{k}?") == "eval" for k in keys) / len(keys)
    assert abs(frac - 1 / EVAL_EVERY) < 0.03


def test_difficulty_makes_tasks_harder():
    def mean(xs):
        return sum(xs) / len(xs)
    easy, hard = generate("math", "x", 200, seed=0), generate("math", "x", 200, seed=0, difficulty=1.0)
    steps = [mean([it["turns"][0]["reasoning"].count("=") for it in items]) for items in (easy, hard)]
    assert steps[1] > steps[0] + 0.8
    easy, hard = generate("longctx", "x", 5, doc_lines=10), generate("longctx", "x", 5, difficulty=1.0, doc_lines=10)
    assert {it["prompt"].count(": ") for it in easy} == {10} and {it["prompt"].count(": ") for it in hard} == {20}
    easy, hard = generate("if", "x", 200, seed=0), generate("if", "x", 200, seed=0, difficulty=1.0)
    assert mean([len(it["meta"]["constraints"]) for it in hard]) > mean([len(it["meta"]["constraints"]) for it in easy]) + 0.6


def test_preference_pairs_are_ordered_by_the_judge(built):
    pairs = load_jsonl(os.path.join(built, "prefs", "train.jsonl"), "prefs")
    metas = {it["prompt"]: it["meta"] for it in generate("chat", "prefs", SIZES["prefs"], seed=3)}
    for p in pairs:
        meta = metas[p["messages"][-1]["content"]]
        assert judge(p["chosen"], meta) > judge(p["rejected"], meta)
    # the flaws vary: not every rejected answer fails the same check
    rng = random.Random(0)
    items = generate("chat", "x", 60, seed=0)
    gaps = {round(judge(c, it["meta"]) - judge(r, it["meta"]), 1)
            for it in items for c, r in [preference_pair(rng, it)]}
    assert len(gaps) >= 2 and min(gaps) > 0


# ---------------------------------------------------------------------------------------------
# JSONL loading

GOOD_SFT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "domain": "chat"}
GOOD_RL = {"domain": "math", "messages": [{"role": "user", "content": "1+1?"}], "meta": {"answer": "2"}}
BAD = [  # (kind, line, what the message must say)
    ("sft", '{"messages": [', "invalid JSON"),
    ("sft", "[1, 2]", "expected a JSON object"),
    ("sft", '{"domain": "chat"}', "missing key 'messages'"),
    ("sft", '{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
    ("sft", '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}', "must be a string"),
    ("sft", '{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', 'missing key "content"'),
    ("sft", '{"messages": [{"role": "user", "content": "x"}]}', "at least one assistant"),
    ("sft", '{"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "r"}, '
            '{"role": "assistant", "content": "x"}]}', "must follow an assistant message with tool_calls"),
    ("sft", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",'
            ' "tool_calls": [{"name": "f", "arguments": "city=Oslo"}]}]}', "tool_calls[0]: tool call arguments are a string that is not JSON"),
    ("sft", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",'
            ' "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]}', "a tool call must be"),
    ("sft", '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y",'
            ' "reasoning": "a", "reasoning_content": "b"}]}', 'not both'),
    ("sft", '{"messages": [{"role": "user", "content": "x", "reasoning_content": "b"}, '
            '{"role": "assistant", "content": "y"}]}', 'only assistant messages may carry "reasoning_content"'),
    ("sft", '{"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "x"}, '
            '{"role": "assistant", "content": "x"}]}', "system message may only come first"),
    ("rl", '{"domain": "math", "messages": [{"role": "user", "content": "x"}]}', "missing key 'meta'"),
    ("rl", '{"domain": "poetry", "messages": [{"role": "user", "content": "x"}], "meta": {}}', "no verifier"),
    ("rl", '{"domain": "code", "messages": [{"role": "user", "content": "x"}], "meta": {"tests": []}}',
     "lacks ['entry_point']"),
    # the verifier's own meta check, reported at path:line (these would otherwise score 0 silently)
    ("rl", '{"domain": "mcqa", "messages": [{"role": "user", "content": "x"}], '
           '"meta": {"answer": "AB", "choices": ["a", "b", "c", "d"]}}', "mcqa meta: answer 'AB' is not one of"),
    ("rl", '{"domain": "if", "messages": [{"role": "user", "content": "x"}], "meta": {"constraints": '
           '[{"type": "length_constraints:number_words", "num_words": 3, "relation": "at most"}]}}', "bad relation"),
    ("rl", '{"domain": "structured", "messages": [{"role": "user", "content": "x"}], '
           '"meta": {"schema": {"type": "string", "pattern": "^a"}}}', "['pattern']"),
    ("rl", '{"domain": "math", "messages": [{"role": "user", "content": "x"}, {"role": "assistant", '
           '"content": "y"}], "meta": {"answer": "1"}}', "must end with a user message"),
    ("prefs", '{"messages": [{"role": "user", "content": "x"}], "chosen": "a", "rejected": null}',
     "'rejected' must be a string"),
]


@pytest.mark.parametrize("kind,line,reason", BAD)
def test_malformed_lines_name_file_line_and_reason(tmp_path, kind, line, reason):
    good = {"sft": GOOD_SFT, "rl": GOOD_RL,
            "prefs": {"messages": GOOD_RL["messages"], "chosen": "a", "rejected": "b"}}[kind]
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(ValueError) as e:
        load_jsonl(str(path), kind)
    msg = str(e.value)
    assert msg.startswith(f"{path}:4: ") and reason in msg, msg


@pytest.mark.parametrize("line,reason", [
    (b'{"messages": "caf\xe9"}', "not UTF-8 text: byte 18 of the line is b'\\xe9'"),  # Latin-1, not UTF-8
    (b"[" * 100000 + b"]" * 100000, "invalid JSON: RecursionError"),                   # deeper than the stack
    (b'{"messages": ' + b"1" * 5000 + b"}", "invalid JSON: ValueError"),               # too many digits for int()
])
def test_undecodable_lines_name_file_and_line(tmp_path, line, reason):
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD_SFT).encode() + b"\n" + line + b"\n")
    with pytest.raises(ValueError) as e:
        load_jsonl(str(path), "sft")
    assert str(e.value).startswith(f"{path}:2: ") and reason in str(e.value), str(e.value)


def test_a_line_longer_than_the_limit_is_refused_before_it_is_parsed(tmp_path):
    from data.jsonl import MAX_LINE_BYTES
    long = dict(GOOD_SFT, messages=[{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}])
    pad = MAX_LINE_BYTES - len(json.dumps(long)) - 1   # the newline counts
    long["messages"][1]["content"] = "y" * pad
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(GOOD_SFT) + "\n" + json.dumps(long) + "\n")
    assert len(load_jsonl(str(path), "sft")) == 2   # a line of exactly the limit loads
    long["messages"][1]["content"] += "y"
    path.write_text(json.dumps(GOOD_SFT) + "\n" + json.dumps(long) + "\n" + json.dumps(GOOD_SFT) + "\n")
    with pytest.raises(ValueError, match=rf"long\.jsonl:2: the line is longer than {MAX_LINE_BYTES:,} bytes"):
        load_jsonl(str(path), "sft")
    path.write_bytes(b"x" * (3 * MAX_LINE_BYTES))   # no newline at all: never read whole
    with pytest.raises(ValueError, match=r"long\.jsonl:1: the line is longer than"):
        load_jsonl(str(path), "sft")


def test_load_jsonl_accepts_good_files_and_rejects_empty_ones(tmp_path):
    path = tmp_path / "ok.jsonl"
    path.write_text(json.dumps(GOOD_SFT) + "\n" + json.dumps(GOOD_SFT))  # no final newline
    assert load_jsonl(str(path), "sft") == [GOOD_SFT, GOOD_SFT]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: no records"):
        load_jsonl(str(tmp_path / "empty.jsonl"), "sft")
    with pytest.raises(ValueError, match="unknown kind"):
        load_jsonl(str(path), "dpo")


def test_load_jsonl_reads_the_hugging_face_spellings(tmp_path):
    """reasoning_content, and OpenAI tool calls with the arguments an object or a JSON string: loaded
    as written, rendered as our spelling of the same conversation is."""
    call = {"name": "get_weather", "arguments": {"city": "Oslo"}}
    ours = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "reasoning": "Call it.", "tool_calls": [call]},
            {"role": "tool", "content": "rainy"}, {"role": "assistant", "content": "Rainy."}]
    for arguments in (call["arguments"], json.dumps(call["arguments"])):
        hf = [ours[0], {"role": "assistant", "content": None, "reasoning_content": "Call it.", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}]}, *ours[2:]]
        path = tmp_path / "hf.jsonl"
        path.write_text(json.dumps({"messages": hf}) + "\n")
        (rec,) = load_jsonl(str(path), "sft")
        assert render(rec["messages"]) == render(ours)


def test_a_domain_file_holds_that_domain_only(tmp_path):
    path = tmp_path / "math.jsonl"   # as DATA/rl/math.jsonl or DATA/eval/math.jsonl
    path.write_text(json.dumps(GOOD_RL) + "\n" + json.dumps(dict(GOOD_RL, domain="longctx")) + "\n")
    assert load_jsonl(str(path), "rl")[0] == GOOD_RL
    with pytest.raises(ValueError, match=r"math\.jsonl:2: a row of domain 'longctx' in a file of domain 'math'"):
        load_jsonl(str(path), "rl", "math")



def test_build_shows_progress_with_an_eta(tmp_path, capsys):
    """Data building prints one line per domain with the time spent and an ETA, then the tokenizer
    step, each a line of its own (a piped log stays readable)."""
    build(str(tmp_path / "d"), seed=1, sizes=dict(sft=18, rl=2, eval=2, prefs=2), vocab_size=300)
    lines = capsys.readouterr().out.splitlines()
    steps = [line for line in lines if line.startswith("build: ") and " domains, " in line]
    assert [s.split()[1] for s in steps] == [f"{i}/{len(DOMAINS)}" for i in range(1, len(DOMAINS))]
    assert all(re.search(r"\d+s, eta \d+s$", s) for s in steps)
    assert lines[-1] == "build: training the tokenizer (300 tokens)"

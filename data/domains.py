"""
The nine built-in synthetic domains: prompts, reference answers and verifier metadata.

Each domain mirrors one of the paper's (DESIGN.md) at a scale a ~2M-parameter model can learn in a
few minutes on a CPU: small numbers, short prompts, answers of a few dozen tokens, a short
reasoning trace ("7 + 5 = 12. 12 - 3 = 9."). The contract with verifiers/ is data/DOMAINS.md: what
the prompt says, what `meta` holds, how a response is scored.

A generator `make_<domain>(rng, hard)` draws one *item*:

    key     canonical identity of the task (the question; for code/swe the function name + spec)
    prompt  the user message
    meta    what the verifier needs (DOMAINS.md)
    turns   the reference completion: assistant message(s), each with "reasoning" (its thinking
            trace) and "content", plus "tool_calls" and "tool" results in the tool domain
    tools   the declared tools (tool domain only)

`hard` is the difficulty knob: False draws SFT-level tasks, True harder ones (more operations,
bigger numbers, longer documents, more constraints) for RL, so RL has room to improve on SFT.

Train and eval never share a task: a hash of (domain, key) puts every key in exactly one split,
1 in EVAL_EVERY keys in eval. The partition does not depend on the seed or on how many items are
drawn, so "disjoint" is a property of the key alone and a test can check it item by item.
"""

import hashlib
import json
import random
import re

DOMAINS = ("math", "code", "if", "mcqa", "structured", "tool", "longctx", "chat", "swe")

EVAL_EVERY = 8
NAMES = ["Ann", "Ben", "Cal", "Dan", "Eva", "Fay", "Gus", "Ivy", "Jon", "Kim", "Leo", "Mia", "Ned",
         "Pam", "Sam", "Tom", "Zoe", "Ada"]


def item(key, prompt, meta, turns, tools=None):
    return {"key": key, "prompt": prompt, "meta": meta, "turns": turns, "tools": tools}


def reply(reasoning, content, **extra):
    return {"role": "assistant", "reasoning": reasoning, "content": content, **extra}


# ---------------------------------------------------------------------------------------------
# math: arithmetic word problems, answer in \boxed{}

THINGS = ["pens", "apples", "books", "coins", "cards", "shells", "stamps", "marbles", "cookies", "stickers"]
MATH_STEPS = [("+", "buys {n} more"), ("+", "finds {n} more"), ("+", "gets {n} more"),
              ("-", "gives away {n}"), ("-", "loses {n}"), ("-", "sells {n}"),
              ("*", "doubles them"), ("*", "triples them")]


def make_math(rng, hard):
    name, thing, top = rng.choice(NAMES), rng.choice(THINGS), (20 if hard else 10)
    x = x0 = rng.randint(2, top)
    clauses, trace = [], []
    for _ in range(rng.randint(2, 4) if hard else rng.randint(1, 3)):
        op, phrase = rng.choice([s for s in MATH_STEPS if (s[0] != "*" or 0 < x <= top) and (s[0] != "-" or x)])
        n = 2 if "doubles" in phrase else 3 if "triples" in phrase else rng.randint(1, x if op == "-" else top)
        y = x + n if op == "+" else x - n if op == "-" else x * n
        clauses.append(phrase.format(n=n))
        trace.append(f"{x} {op} {n} = {y}.")
        x = y
    question = (f"{name} has {x0} {thing}. {name} {', then '.join(clauses)}. "
                f"How many {thing} does {name} have now? Put the final answer in \\boxed{{}}.")
    return item(question, question, {"answer": str(x)},
                [reply(" ".join(trace), f"The answer is \\boxed{{{x}}}.")])


# ---------------------------------------------------------------------------------------------
# code: a list function built from a fixed family of steps (map, filter, then a reduction)

CODE_MAPS = [  # (prompt phrase, trace phrase, list comprehension, python function)
    ("adds {k} to every element", "add {k}", "[x + {k} for x in xs]", lambda x, k: x + k),
    ("subtracts {k} from every element", "subtract {k}", "[x - {k} for x in xs]", lambda x, k: x - k),
    ("multiplies every element by {k}", "multiply by {k}", "[x * {k} for x in xs]", lambda x, k: x * k),
]
CODE_FILTERS = [
    ("keeps only the elements greater than {k}", "keep x > {k}", "[x for x in xs if x > {k}]", lambda x, k: x > k),
    ("keeps only the elements less than {k}", "keep x < {k}", "[x for x in xs if x < {k}]", lambda x, k: x < k),
    ("removes every element equal to {k}", "drop x == {k}", "[x for x in xs if x != {k}]", lambda x, k: x != k),
    ("keeps only the even elements", "keep even x", "[x for x in xs if x % 2 == 0]", lambda x, k: x % 2 == 0),
]
CODE_ENDS = [("the resulting list", "return the list", "xs", lambda xs: xs),
             ("their sum", "return the sum", "sum(xs)", sum),
             ("how many elements are left", "return the count", "len(xs)", len)]
CODE_NAMES = ["solve", "f", "transform", "process", "compute", "calc", "apply_steps"]
RANDOM_TESTS = 6  # per code task, besides the empty list, the range and the near misses' (make_code)


def code_program(steps, end):
    """The function a spec describes, in Python: steps [(template, k)] then the end's reduction."""
    def run(xs):
        for template, k in steps:
            fn = template[3]
            xs = [fn(x, k) for x in xs] if template in CODE_MAPS else [x for x in xs if fn(x, k)]
        return end[3](xs)
    return run


def code_near_misses(steps, end):
    """The programs one careless edit away from the spec: a step left out, a step with another
    constant (0 to 10: the constants drawn, and one off either end) or swapped for another of its
    kind (> for <, + for -), or the wrong reduction. The tests must tell each from the right one."""
    for i, (template, k) in enumerate(steps):
        yield steps[:i] + steps[i + 1:], end
        for other in CODE_MAPS if template in CODE_MAPS else CODE_FILTERS:
            for k2 in range(11):
                if (other, k2) != (template, k):
                    yield steps[:i] + [(other, k2)] + steps[i + 1:], end
    for other_end in CODE_ENDS:
        if other_end is not end:
            yield steps, other_end


def make_code(rng, hard):
    steps = [(rng.choice(rng.choice([CODE_MAPS, CODE_FILTERS])), rng.randint(1, 9))
             for _ in range(rng.randint(2, 3) if hard else rng.randint(1, 2))]
    end = rng.choice(CODE_ENDS)
    name = rng.choice(CODE_NAMES)
    spec = ", then ".join(s[0].format(k=k) for s, k in steps) + f", and returns {end[0]}"
    lines = [f"    xs = {s[2].format(k=k)}" for s, k in steps]
    code = f"def {name}(xs):\n" + "\n".join(lines) + f"\n    return {end[2]}\n"
    run = code_program(steps, end)

    # Tests: the empty list; every value of the input range, twice shuffled into lists of up to 8 (so
    # each filter meets the values on both sides of its bound and the value it drops, and two values
    # rarely share a list both times, which a count could not tell apart); RANDOM_TESTS random
    # lists; then for each near miss that still passes them, the first of 30 spare random lists
    # that catches it. A near miss that none catches computes the same function on this input range
    # (keep x > 3 is keep x >= 4): it is not wrong.
    lo, hi = (-9, 20) if hard else (0, 9)
    pool = [[]]
    for _ in range(2):
        every = rng.sample(range(lo, hi + 1), hi + 1 - lo)
        pool += [every[i:i + 8] for i in range(0, len(every), 8)]
    pool += [[rng.randint(lo, hi) for _ in range(rng.randint(2, 8))] for _ in range(RANDOM_TESTS)]
    first_spare = len(pool)
    pool += [[rng.randint(lo, hi) for _ in range(rng.randint(2, 8))] for _ in range(30)]
    want = [run(xs) for xs in pool]
    chosen = list(range(first_spare))
    for miss in (code_program(*m) for m in code_near_misses(steps, end)):
        if all(miss(pool[i]) == want[i] for i in chosen):
            chosen += [i for i in range(first_spare, len(pool)) if miss(pool[i]) != want[i]][:1]
    tests = [[[pool[i]], want[i]] for i in sorted(set(chosen))]
    if len({json.dumps(t[1]) for t in tests}) < 2:  # e.g. "keep x < 1, then keep x > 7": always []
        return make_code(rng, hard)  # tests that a constant passes would teach nothing: redraw
    prompt = f"Write a Python function `{name}(xs)` that takes a list of integers, {spec}."
    trace = "; ".join(s[1].format(k=k) for s, k in steps) + f"; {end[1]}."
    return item(f"{name}: {spec}", prompt, {"entry_point": name, "tests": tests},
                [reply(trace, f"```python\n{code}```")])


# ---------------------------------------------------------------------------------------------
# if: a writing request plus checkable constraints (IFEval instruction ids and kwargs)

IF_TOPICS = {
    "the sea": ["The sea is wide and deep.", "Waves roll onto the sand.", "Fish swim under the blue water.",
                "Boats sail far from the shore.", "The wind smells of salt.", "At night, the water looks dark."],
    "the forest": ["The forest is green and quiet.", "Tall trees block the sun.", "Birds sing in the branches.",
                   "Moss grows on the old rocks.", "A small path winds between the pines.", "In autumn, the leaves turn red."],
    "the city": ["The city never sleeps.", "Cars fill the busy streets.", "Lights shine from tall towers.",
                 "People hurry to the train.", "Cafes open early in the morning.", "At dusk, the windows glow."],
    "rain": ["Rain taps on the roof.", "Clouds hide the sun all day.", "Puddles form on the road.",
             "The air smells fresh and clean.", "Children jump in the water.", "After the storm, a rainbow appears."],
    "winter": ["Winter brings cold mornings.", "Snow covers the hills.", "We drink hot tea by the fire.",
               "The lake turns to ice.", "Days are short and nights are long.", "In the park, kids build a snowman."],
    "music": ["Music fills the room.", "A soft song can calm the mind.", "Drums keep a steady beat.",
              "The piano plays a sweet tune.", "Friends sing along together.", "At the concert, the crowd dances."],
    "cats": ["Cats love to sleep in the sun.", "A cat moves without a sound.", "Kittens play with string.",
             "Cats purr when they are happy.", "My cat waits by the door.", "At night, cats hunt for mice."],
    "the moon": ["The moon lights the night sky.", "Its face changes every week.", "Tides follow the moon.",
                 "Astronauts once walked on its dust.", "A full moon looks bright and round.", "In the dark, it glows silver."],
}
IF_REQUESTS = ["Write about {t}.", "Write a short text about {t}.", "Describe {t}.", "Tell me about {t}."]
START_PHRASES = ["Here is my answer.", "Let me tell you.", "Dear reader."]
END_PHRASES = ["Is there anything else I can help with?", "That is all.", "Thank you for reading."]
# constraint -> the parts of the answer it governs; two constraints that share a part do not mix
IF_SLOTS = {"change_case:english_lowercase": {"case"}, "change_case:english_capital": {"case"},
            "punctuation:no_comma": {"comma"}, "keywords:existence": {"kw"}, "keywords:frequency": {"kw"},
            "keywords:forbidden_words": {"forbid"}, "length_constraints:number_words": {"length"},
            "length_constraints:number_sentences": {"length", "shape", "start", "end"},
            "length_constraints:number_paragraphs": {"shape"},
            # a bullet's "* " would pair with a highlight's first "*": the two do not mix
            "detectable_format:number_bullet_lists": {"shape", "highlight"},
            "detectable_format:number_highlighted_sections": {"highlight"},
            "detectable_format:json_format": {"shape", "start", "end", "wrap"},
            "detectable_format:title": {"start"}, "startend:start_checker": {"start"},
            "startend:end_checker": {"end"}, "startend:quotation": {"start", "end", "wrap"},
            "detectable_content:postscript": {"end"}}


def _words(text):  # as verifiers/ifeval.py counts them
    return re.findall(r"\w+", text)


def _sentences(text):
    return [s for s in re.split(r"[.!?]+(?:\s+|$)", text) if s.strip()]


def make_if(rng, hard):
    topic = rng.choice(sorted(IF_TOPICS))
    bank = IF_TOPICS[topic]
    sentences = [bank[i] for i in sorted(rng.sample(range(len(bank)), rng.randint(2, 3)))]
    want, kinds = (2 if hard else 1), []
    for kind in rng.sample(sorted(IF_SLOTS), len(IF_SLOTS)):
        if len(kinds) < want and not any(IF_SLOTS[kind] & IF_SLOTS[k] for k in kinds):
            kinds.append(kind)
    chosen = set(kinds)
    plain = " ".join(sentences)
    cons, notes = {}, []  # constraint kwargs by kind; the reasoning trace lists what to do

    if "punctuation:no_comma" in chosen:
        sentences = [s.replace(",", "") for s in sentences]
        notes.append("no commas")
    content_words = sorted({w.lower() for w in _words(plain) if len(w) >= 4})
    if "keywords:existence" in chosen:
        cons["keywords:existence"] = {"keywords": rng.sample(content_words, 2)}
        notes.append("use " + " and ".join(cons["keywords:existence"]["keywords"]))
    if "keywords:frequency" in chosen:
        kw = rng.choice(content_words)
    if "keywords:forbidden_words" in chosen:  # words of other topics, never in this answer
        others = sorted({w.lower() for t, b in IF_TOPICS.items() if t != topic for w in _words(" ".join(b))
                         if len(w) >= 4} - set(content_words))
        cons["keywords:forbidden_words"] = {"forbidden_words": rng.sample(others, 2)}
        notes.append("avoid " + " and ".join(cons["keywords:forbidden_words"]["forbidden_words"]))
    if "detectable_format:number_highlighted_sections" in chosen:
        n = rng.randint(1, 2)
        sentences = [re.sub(r"\w{4,}", lambda m: f"*{m.group()}*", s, count=1) if i < n else s
                     for i, s in enumerate(sentences)]
        cons["detectable_format:number_highlighted_sections"] = {"num_highlights": n}
        notes.append(f"highlight {n}")
    if "detectable_format:number_bullet_lists" in chosen:
        body = "\n".join("* " + s for s in sentences)
        cons["detectable_format:number_bullet_lists"] = {"num_bullets": len(sentences)}
        notes.append(f"{len(sentences)} bullets")
    elif "length_constraints:number_paragraphs" in chosen:
        n = rng.randint(2, len(sentences))
        cuts = [round(i * len(sentences) / n) for i in range(n + 1)]
        body = "\n***\n".join(" ".join(sentences[a:b]) for a, b in zip(cuts, cuts[1:]))
        cons["length_constraints:number_paragraphs"] = {"num_paragraphs": n}
        notes.append(f"{n} paragraphs split by ***")
    else:
        body = " ".join(sentences)
    sep = "\n" if "\n" in body else " "
    if "detectable_format:title" in chosen:
        body = f"<<{topic.title()}>>\n" + body
        notes.append("a title in << >>")
    if "startend:start_checker" in chosen:
        phrase = rng.choice(START_PHRASES)
        body = phrase + sep + body
        cons["startend:start_checker"] = {"start_phrase": phrase}
        notes.append(f"start with {phrase}")
    if "detectable_content:postscript" in chosen:
        marker = rng.choice(["P.S.", "P.P.S."])
        body += f"\n\n{marker} Thank you for reading."
        cons["detectable_content:postscript"] = {"postscript_marker": marker}
        notes.append(f"end with a {marker}")
    if "startend:end_checker" in chosen:
        phrase = rng.choice(END_PHRASES)
        body += sep + phrase
        cons["startend:end_checker"] = {"end_phrase": phrase}
        notes.append(f"finish with {phrase}")
    if "detectable_format:json_format" in chosen:
        body = json.dumps({"text": body})
        notes.append("wrap in JSON")
    if "startend:quotation" in chosen:
        body = f'"\n{body}\n"' if "\n" in body else f'"{body}"'  # bullets must start their lines
        notes.append("wrap in double quotes")
    if "change_case:english_lowercase" in chosen:  # last, so a JSON key or title is cased too
        body = body.lower()
        notes.append("all lowercase")
    if "change_case:english_capital" in chosen:
        body = body.upper()
        notes.append("all capitals")
    # counts are taken on the finished answer (a title or a postscript adds words), the length
    # bounds with a margin so that they are never tight
    if "keywords:frequency" in chosen:
        count = len(re.findall(re.escape(kw), body, re.I))  # as the verifier counts: substrings
        rel, n = rng.choice([("at least", count), ("less than", count + 1)])
        cons["keywords:frequency"] = {"keyword": kw, "frequency": n, "relation": rel}
        notes.append(f"say {kw} {rel} {n} times")
    if "length_constraints:number_words" in chosen:
        w = len(_words(body))
        rel, n = rng.choice([("at least", max(5, (w - 2) // 5 * 5)), ("less than", (w + 7) // 5 * 5)])
        cons["length_constraints:number_words"] = {"num_words": n, "relation": rel}
        notes.append(f"{rel} {n} words")
    if "length_constraints:number_sentences" in chosen:
        s = len(_sentences(body))
        rel, n = rng.choice([("at least", s - 1), ("less than", s + 2)])
        cons["length_constraints:number_sentences"] = {"num_sentences": n, "relation": rel}
        notes.append(f"{rel} {n} sentences")

    texts = {
        "change_case:english_lowercase": "Your answer must be in all lowercase letters.",
        "change_case:english_capital": "Your answer must be in all capital letters.",
        "punctuation:no_comma": "Do not use any commas.",
        "keywords:existence": "Include the words {keywords}.",
        "keywords:frequency": "Use the word {keyword} {relation} {frequency} times.",
        "keywords:forbidden_words": "Do not use the words {forbidden_words}.",
        "length_constraints:number_words": "Answer with {relation} {num_words} words.",
        "length_constraints:number_sentences": "Answer with {relation} {num_sentences} sentences.",
        "length_constraints:number_paragraphs": "Write exactly {num_paragraphs} paragraphs separated by ***.",
        "detectable_format:number_bullet_lists": "Answer with exactly {num_bullets} bullet points like * this.",
        "detectable_format:number_highlighted_sections": "Highlight at least {num_highlights} words like *this*.",
        "detectable_format:json_format": "Wrap your whole answer in JSON.",
        "detectable_format:title": "Give it a title in double angular brackets, like <<title>>.",
        "startend:start_checker": 'Start your answer with "{start_phrase}"',
        "startend:end_checker": 'End your answer with "{end_phrase}"',
        "startend:quotation": "Wrap your whole answer in double quotation marks.",
        "detectable_content:postscript": "End with a postscript starting with {postscript_marker}",
    }
    constraints = []
    for kind in kinds:
        kw = cons.get(kind, {})
        shown = {k: " and ".join(v) if isinstance(v, list) else v for k, v in kw.items()}
        constraints.append((texts[kind].format(**shown), {"type": kind, **kw}))
    constraints.sort(key=lambda c: c[1]["type"])  # a canonical order, so the key is the task
    question = rng.choice(IF_REQUESTS).format(t=topic) + " " + " ".join(c[0] for c in constraints)
    return item(question, question, {"constraints": [c[1] for c in constraints]},
                [reply("; ".join(notes).capitalize() + ".", body)])


# ---------------------------------------------------------------------------------------------
# mcqa: four options, the letter in \boxed{}

CATEGORIES = {"fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "pear", "plum"],
              "animal": ["cat", "dog", "horse", "mouse", "tiger", "zebra", "sheep", "goat"],
              "color": ["red", "blue", "green", "yellow", "purple", "pink", "brown", "black"],
              "metal": ["iron", "gold", "silver", "copper", "tin", "zinc", "lead", "nickel"],
              "planet": ["Mars", "Venus", "Jupiter", "Saturn", "Mercury", "Neptune", "Earth", "Uranus"],
              "vehicle": ["car", "bus", "train", "bike", "truck", "boat", "plane", "tram"]}
LETTERS = "ABCD"


def make_mcqa(rng, hard):
    # SFT-level questions are lookups a small model can learn (a word's category, the next letter);
    # the hard ones add arithmetic and comparison, which it mostly cannot: RL's room to move
    kind = rng.choice(["arith", "extreme", "category", "letter"] if hard else ["category", "letter"])
    if kind == "arith":
        op = rng.choice("+-*" if hard else "+-")
        a, b = rng.randint(2, 30 if hard else 12), rng.randint(2, 12 if hard else 9)
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        right = a + b if op == "+" else a - b if op == "-" else a * b
        stem, why = f"What is {a} {op} {b}?", f"{a} {op} {b} = {right}."
        wrong = {right + d for d in (-10, -2, -1, 1, 2, 10) if right + d >= 0}
    elif kind == "extreme":
        word = rng.choice(["largest", "smallest"])
        nums = rng.sample(range(1, 100 if hard else 30), 4)
        right = max(nums) if word == "largest" else min(nums)
        stem, why, wrong = f"Which number is the {word}?", f"The {word} is {right}.", set(nums) - {right}
    elif kind == "category":
        cat = rng.choice(sorted(CATEGORIES))
        right = rng.choice(CATEGORIES[cat])
        wrong = {w for c, ws in CATEGORIES.items() if c != cat for w in ws}
        stem, why = f"Which of these is a {cat}?", f"{right.capitalize()} is a {cat}."
    else:
        step = rng.randint(1, 3) if hard else 1
        i = rng.randrange(26 - step)
        right = chr(65 + i + step)
        where = "right after" if step == 1 else f"{step} places after"
        stem, why = f"Which letter comes {where} {chr(65 + i)}?", f"{where.capitalize()} {chr(65 + i)} comes {right}."
        wrong = {chr(65 + j) for j in range(26)} - {right}
    choices = rng.sample(sorted(wrong, key=str), 3) + [right]
    rng.shuffle(choices)
    choices = [str(c) for c in choices]
    letter = LETTERS[choices.index(str(right))]
    prompt = stem + "\n" + "\n".join(f"{L}) {c}" for L, c in zip(LETTERS, choices)) + \
        "\nAnswer with the letter in \\boxed{}."
    return item(stem + " | " + ", ".join(sorted(choices)), prompt, {"answer": letter, "choices": choices},
                [reply(f"{why} That is option {letter}.", f"The answer is \\boxed{{{letter}}}.")])


# ---------------------------------------------------------------------------------------------
# structured: a JSON object that must satisfy a schema given in the prompt

CITIES = ["Oslo", "Paris", "Rome", "Lima", "Tokyo", "Cairo", "Quito", "Seoul"]
WORDS = ["red", "blue", "new", "old", "big", "small", "fast", "cheap", "fresh", "rare"]
DAYS = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
FIELDS = {  # field -> (schema, value sampler)
    "name": ({"type": "string", "minLength": 1}, lambda r: r.choice(NAMES)),
    "age": ({"type": "integer", "minimum": 0, "maximum": 120}, lambda r: r.randint(1, 99)),
    "city": ({"type": "string"}, lambda r: r.choice(CITIES)),
    "active": ({"type": "boolean"}, lambda r: r.random() < 0.5),
    "price": ({"type": "number", "minimum": 0}, lambda r: r.randint(1, 999) / 100),
    "stock": ({"type": "integer", "minimum": 0}, lambda r: r.randint(0, 50)),
    "tags": ({"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
             lambda r: r.sample(WORDS, r.randint(1, 3))),
    "day": ({"type": "string", "enum": DAYS}, lambda r: r.choice(DAYS)),
    "hour": ({"type": "integer", "minimum": 0, "maximum": 23}, lambda r: r.randint(0, 23)),
}
ENTITIES = {"user": ["name", "age", "city", "active"], "product": ["name", "price", "stock", "tags"],
            "event": ["name", "day", "hour", "tags"]}
ENTITY_NAMES = {"user": NAMES, "product": ["lamp", "desk", "kettle", "chair", "radio", "clock", "mug", "scarf"],
                "event": ["party", "meeting", "concert", "picnic", "lecture", "match", "dinner", "workshop"]}


def make_structured(rng, hard):
    entity = rng.choice(sorted(ENTITIES))
    fields = ["name"] + rng.sample(ENTITIES[entity][1:], rng.randint(2, 3) if hard else 1)
    obj = {f: FIELDS[f][1](rng) if f != "name" else rng.choice(ENTITY_NAMES[entity]) for f in fields}
    schema = {"type": "object", "properties": {f: FIELDS[f][0] for f in fields}, "required": fields}
    if hard:
        schema["additionalProperties"] = False
    values = [f"{f} {json.dumps(v)}" for f, v in obj.items()]
    desc = ", ".join(values[:-1]) + " and " + values[-1]
    prompt = f"Return a JSON object for a {entity} with {desc}. Schema: {json.dumps(schema)}"
    return item(prompt, prompt, {"schema": schema},
                [reply("Fields: " + ", ".join(fields) + ".", json.dumps(obj))])


# ---------------------------------------------------------------------------------------------
# tool: one call to a built-in tool, then an answer that reads its result back

def make_tool(rng, hard):
    from verifiers.tool import CAPITALS, PRICES, TOOLS, WEATHER, ToolEnv  # the tables live with the tools
    kind = rng.choice(["get_weather", "get_price", "get_capital", "convert_units"])
    if kind == "get_weather":
        city = rng.choice(sorted(WEATHER))
        args = {"city": city}
        ask = rng.choice(["What is the weather in {c}?", "How is the weather in {c} today?",
                          "Tell me the weather in {c}.", "Is it nice outside in {c}?",
                          "What is the weather like in {c}?", "Check the weather in {c} for me.",
                          "Should I take an umbrella in {c}?", "How does the sky look in {c}?"]).format(c=city)
        answer = f"The weather in {city} is {{r}}."
    elif kind == "get_price":
        thing = rng.choice(sorted(PRICES))
        args = {"item": thing}
        ask = rng.choice(["How much does {i} cost?", "What is the price of {i}?",
                          "Tell me the price of {i}.", "I want to buy {i}. What does it cost?",
                          "Look up the price of {i}.", "What would {i} cost me?",
                          "Is {i} expensive? Give me its price.", "Find the price of {i}, please."]).format(i=thing)
        answer = f"{thing.capitalize()} costs {{r}} dollars."
    elif kind == "get_capital":
        country = rng.choice(sorted(CAPITALS))
        args = {"country": country}
        ask = rng.choice(["What is the capital of {c}?", "Which city is the capital of {c}?",
                          "Name the capital of {c}.", "Tell me the capital city of {c}.",
                          "Look up the capital of {c}.", "What city is {c} governed from?",
                          "I am visiting {c}. What is its capital?", "Find the capital of {c}."]).format(c=country)
        answer = f"The capital of {country} is {{r}}."
    else:
        unit = rng.choice(["km", "kg", "c"])
        value = rng.randint(1, 500 if hard else 100)
        args = {"value": value, "unit": unit}
        words = {"km": ("km", "miles"), "kg": ("kg", "pounds"), "c": ("degrees C", "degrees F")}[unit]
        ask = rng.choice(["Convert {v} {a} to {b}.", "How many {b} is {v} {a}?", "What is {v} {a} in {b}?",
                          "Turn {v} {a} into {b}.", "I have {v} {a}. How many {b} is that?",
                          "Express {v} {a} in {b}."]).format(v=value, a=words[0], b=words[1])
        answer = f"{value} {words[0]} is {{r}} {words[1]}."
    result = ToolEnv().run(kind, args)
    assert not result.startswith("error"), (kind, args, result)
    call = {"name": kind, "arguments": args}
    turns = [reply(f"I will call {kind}.", "", tool_calls=[call]),
             {"role": "tool", "content": result},
             reply(f"The tool says {result}.", answer.replace("{r}", result))]
    return item(ask, ask, {"expected_calls": [call], "answer": result}, turns, tools=TOOLS)


# ---------------------------------------------------------------------------------------------
# longctx: find one `key: value` line in a document of many

DOC_WORDS = ["amber", "birch", "cedar", "delta", "ember", "fjord", "grove", "harbor", "iris", "jade",
             "kelp", "lotus", "maple", "nova", "onyx", "pearl", "quartz", "river", "sage", "tulip"]
COLORS = ["red", "blue", "green", "gold", "gray", "pink", "teal", "navy", "lime", "plum", "violet", "white"]


def make_longctx(rng, hard, doc_lines=24):
    n = doc_lines * 2 if hard else doc_lines
    keys = rng.sample([f"{w}-{i}" for w in DOC_WORDS for i in range(1, 100)], n)
    values = [f"{rng.choice(COLORS)}-{rng.randint(1, 99)}" for _ in keys]
    i = rng.randrange(n)
    doc = "\n".join(f"{k}: {v}" for k, v in zip(keys, values))
    prompt = f"Document:\n{doc}\n\nWhat is the value of `{keys[i]}`? Answer with the value only."
    return item(prompt, prompt, {"answer": values[i]},
                [reply(f"The line says {keys[i]}: {values[i]}.", values[i])])


# ---------------------------------------------------------------------------------------------
# chat: open-ended advice; the hidden judge (verifiers/chat.py) plays human preference

CHAT_TOPICS = {  # topic -> (request phrase, keywords, sentences; the polite ones address the reader)
    "sleep": ("sleeping well", ["sleep", "bed", "routine"], [
        "Go to bed at the same time every night.", "A calm routine before bed helps your body relax.",
        "Keep your room cool, dark and quiet.", "I suggest avoiding screens for an hour before you sleep.",
        "You can read a book to wind down.", "Try to get up at the same hour each morning."]),
    "exercise": ("exercising", ["exercise", "walk", "muscles"], [
        "Start with a short walk every day.", "Regular exercise makes your heart stronger.",
        "Stretch your muscles after each session.", "I suggest picking a sport that you enjoy.",
        "You can ask a friend to join you.", "Try to rest one day each week."]),
    "cooking": ("cooking at home", ["cook", "recipe", "kitchen"], [
        "Begin with a simple recipe and fresh food.", "Keep your kitchen tidy while you work.",
        "Taste the dish as you cook.", "I suggest learning to use a sharp knife.",
        "You can cook a big batch and save some for later.", "Try to plan your meals for the week."]),
    "study": ("studying", ["study", "notes", "focus"], [
        "Study in short blocks with small breaks.", "Write your own notes in plain words.",
        "A quiet desk helps you focus.", "I suggest testing yourself instead of rereading.",
        "You can explain the ideas to a friend.", "Try to sleep well before an exam."]),
    "money": ("saving money", ["money", "budget", "save"], [
        "Write down where your money goes each month.", "A simple budget shows what you can cut.",
        "Save a small part of every paycheck.", "I suggest cooking at home more often.",
        "You can wait a day before buying something big.", "Try to pay off expensive debt first."]),
    "travel": ("traveling", ["travel", "trip", "pack"], [
        "Plan the main parts of your trip early.", "Pack light and bring only what you need.",
        "Travel during the off season to pay less.", "I suggest keeping copies of your documents.",
        "You can learn a few words of the local language.", "Try to leave room for surprises."]),
    "garden": ("gardening", ["garden", "plants", "water"], [
        "Choose plants that like your climate.", "Water the garden early in the morning.",
        "Good soil matters more than fancy tools.", "I suggest starting with herbs or tomatoes.",
        "You can add compost to feed the soil.", "Try to pull weeds while they are small."]),
    "stress": ("handling stress", ["stress", "breathe", "calm"], [
        "Stress is easier to handle when you name it.", "Breathe slowly for a minute when you feel tense.",
        "A short walk can help you feel calm.", "I suggest talking to someone you trust.",
        "You can write your worries on paper.", "Try to keep a steady daily rhythm."]),
    "writing": ("writing", ["write", "draft", "read"], [
        "Write a little every day, even on busy days.", "Your first draft does not need to be good.",
        "Read your text out loud to find weak spots.", "I suggest cutting words that add nothing.",
        "You can read good books to learn new tricks.", "Try to finish a piece before you polish it."]),
    "friends": ("making friends", ["friends", "people", "club"], [
        "Join a club around something you enjoy.", "Say yes when people invite you out.",
        "Friends grow from many small meetings.", "I suggest asking people about their day.",
        "You can offer help to a neighbor.", "Try to follow up after a good talk."]),
}
CHAT_REQUESTS = ["Give me some advice about {t}.", "Do you have any tips for {t}?", "How do I get better at {t}?",
                 "What should I know about {t}?", "Help me with {t}, please."]
CHAT_OPENERS = ["", "Hi! ", "Hello. ", "Quick question. ", "I need help. ", "Hey there. ", "Good morning. ",
                "Hi again. ", "One more thing. ", "Sorry to bother you. ", "I am curious. ", "Hello there! "]
CHAT_CLOSERS = ["", " Thanks!", " Be brief.", " Thank you.", " Keep it short.", " Any ideas?"]
CHAT_LENGTH = [20, 80]


def chat_answer(rng, topic, meta):
    """3-4 sentences of the topic's bank, redrawn until the hidden judge finds no fault: keywords,
    length, no repeated 3-word phrase, final period, and a polite sentence."""
    from verifiers.chat import judge
    bank = CHAT_TOPICS[topic][2]
    while True:
        text = " ".join(bank[i] for i in sorted(rng.sample(range(len(bank)), rng.randint(3, 4))))
        if judge(text, meta) == 1.0:
            return text


def make_chat(rng, hard):
    topic = rng.choice(sorted(CHAT_TOPICS))
    phrase, keywords, _ = CHAT_TOPICS[topic]
    prompt = rng.choice(CHAT_OPENERS) + rng.choice(CHAT_REQUESTS).format(t=phrase) + rng.choice(CHAT_CLOSERS)
    meta = {"topic": topic, "keywords": keywords, "length": CHAT_LENGTH}
    return item(prompt, prompt, meta,
                [reply(f"The user wants tips on {phrase}. I will give a few kind, concrete tips.",
                       chat_answer(rng, topic, meta))])


def worse_chat_answer(rng, answer, topic):
    """A flawed variant of a chat answer: each flaw breaks one of the judge's checks."""
    sentences = re.findall(r"[^.!?]+[.!?]", answer)
    other = CHAT_TOPICS[rng.choice(sorted(set(CHAT_TOPICS) - {topic}))][2]
    flaw = rng.choice(["repeat", "off_topic", "short", "no_punct", "blunt"])
    if flaw == "repeat":  # say the same thing twice
        i = rng.randrange(len(sentences))
        sentences.insert(i + 1, sentences[i])
    elif flaw == "off_topic":  # keep the form, lose the subject
        sentences = [other[i] for i in sorted(rng.sample(range(len(other)), len(sentences)))]
    elif flaw == "short":
        sentences = [sentences[0]]
    elif flaw == "no_punct":
        sentences[-1] = sentences[-1].rstrip(".!?")
    else:  # drop the sentences that address the reader
        sentences = [s for s in sentences if not re.search(r"\b(I suggest|You can|Try to)\b", s)] or sentences[:1]
        sentences = [re.sub(r"\b(I suggest|You can|Try to)\b ?", "", s) for s in sentences]
    return " ".join(s.strip() for s in sentences)


def preference_pair(rng, it):
    """(chosen, rejected) for a chat item, the chosen one judged strictly higher by the hidden judge.
    Mostly the reference answer against a flawed copy; sometimes a flawed answer against a doubly
    flawed one, so the reward model also sees that fewer faults beat more."""
    from verifiers.chat import judge
    meta, best = it["meta"], it["turns"][-1]["content"]
    while True:
        chosen = best if rng.random() < 0.7 else worse_chat_answer(rng, best, meta["topic"])
        rejected = worse_chat_answer(rng, chosen, meta["topic"])
        if judge(chosen, meta) > judge(rejected, meta):
            return chosen, rejected


# ---------------------------------------------------------------------------------------------
# swe: a small module with one planted bug and tests; the fix is a SEARCH/REPLACE patch

SWE_FUNCS = [  # (names, parameters, body with {k}, [(correct fragment, buggy fragment)]); k in 2..99
    (["scale", "times", "multiply", "scaled", "mul_k", "grow", "stretch", "boost"], "x", "return x * {k}", [("x * {k}", "x + {k}"), ("x * {k}", "x * {k1}")]),
    (["shift", "offset", "add_k", "plus_k", "bump", "raise_by", "nudge", "move_up"], "x", "return x + {k}", [("x + {k}", "x - {k}"), ("x + {k}", "x + {k1}")]),
    (["at_least", "clamp_low", "floor_at", "min_bound", "not_below", "lower_clip"], "x", "return max(x, {k})", [("max(", "min(")]),
    (["count_above", "num_greater", "count_big", "how_many_above", "tally_over", "n_above"], "xs", "return len([x for x in xs if x > {k}])", [(" > ", " < "), (" > ", " >= ")]),
    (["keep_below", "small_ones", "under_k", "filter_small", "only_low", "below_k"], "xs", "return [x for x in xs if x < {k}]", [(" < ", " > "), (" < ", " <= ")]),
    (["total", "sum_all", "add_up", "list_sum", "summed", "grand_total"], "xs", "s = 0\n    for x in xs:\n        s += x\n    return s", [("s = 0", "s = 1"), ("+=", "-=")]),
    (["is_even", "even", "even_check", "has_no_rest", "divides_two", "parity_ok"], "x", "return x % 2 == 0", [("==", "!=")]),
    (["sum_to", "triangle", "gauss", "tri_num", "running_sum", "sum_upto"], "n", "return sum(range(n + 1))", [("n + 1", "n")]),
    (["diff", "minus", "subtract", "gap", "take_away", "sub"], "a, b", "return a - b", [("a - b", "b - a"), ("a - b", "a + b")]),
    (["area", "product", "mult", "times_two_args", "rect_area", "prod"], "a, b", "return a * b", [("a * b", "a + b")]),
    (["bigger", "max_of", "larger", "pick_max", "top_of_two", "greater"], "a, b", "return max(a, b)", [("max(", "min(")]),
    (["last", "final", "tail_item", "end_item", "last_one", "ultimate"], "xs", "return xs[-1]", [("xs[-1]", "xs[0]")]),
    (["head", "take", "first_k", "prefix", "front", "leading"], "xs", "return xs[:{k}]", [("xs[:{k}]", "xs[:{k1}]")]),  # k in 1..4
]


def _swe_args(rng, params, k):
    if params == "xs":
        return ([rng.randint(0, 2 * k + 3) for _ in range(rng.randint(2, 8))],)
    return tuple(rng.randint(-3, 12) for _ in params.split(", "))


def _define(name, params, body):
    src = f"def {name}({params}):\n    {body}\n"
    scope = {}
    exec(src, scope)  # our own template code, never model output
    return src, scope[name]


def make_swe(rng, hard):
    picks = rng.sample(range(len(SWE_FUNCS)), rng.randint(3, 4) if hard else 2)
    funcs = []  # (name, params, correct source, correct function, k, template index)
    for i in picks:
        names, params, body, muts = SWE_FUNCS[i]
        k = 0 if "{k}" not in body else rng.randint(1, 4) if "xs[:" in body else rng.randint(2, 99)
        name = rng.choice(names)
        funcs.append((name, params, *_define(name, params, body.format(k=k)), k, i))
    name, params, good_src, good_fn, k, i = funcs[0]  # the first pick gets the bug
    body, (good, bad) = SWE_FUNCS[i][2], rng.choice(SWE_FUNCS[i][3])
    good, bad = good.format(k=k, k1=k + 1), bad.format(k=k, k1=k + 1)
    bad_src, bad_fn = _define(name, params, body.format(k=k).replace(good, bad, 1))
    line_good = next(ln for ln in good_src.splitlines() if good in ln)
    line_bad = line_good.replace(good, bad, 1)
    # the bug shows on the call the prompt names and on five more: a patch that keeps the bug and
    # special-cases that call, or returns its expected value always, fails the tests; a list
    # function also gets every value of its range in one list, so another bound fails too
    showing = []
    for _ in range(200):
        a = _swe_args(rng, params, k)
        if good_fn(*a) != bad_fn(*a) and a not in showing:
            showing.append(a)
            if len(showing) == 6:
                break
    rng.shuffle(funcs)
    module = "\n\n".join(bad_src if f[0] == name else f[2] for f in funcs)
    if (len(showing) < 6 or len({repr(good_fn(*a)) for a in showing}) < 2 or module.count(line_bad) != 1
            or len({f[0] for f in funcs}) < len(funcs)):
        return make_swe(rng, hard)  # the bug shows too rarely, or the patch would be ambiguous: redraw
    failing = showing[0]
    tests = []
    for fname, fparams, _, fn, fk, _ in funcs:
        cases = list(showing) if fname == name else []
        cases += [_swe_args(rng, fparams, fk) for _ in range(4 if fname == name else 2)]
        if fname == name and fparams == "xs":
            cases.append((rng.sample(range(2 * fk + 4), 2 * fk + 4),))
        asserts = "\n".join(f"    assert {fname}({', '.join(map(repr, a))}) == {fn(*a)!r}" for a in cases)
        tests.append(f"def test_{fname}():\n{asserts}\n")
    test_src = f"from module import {', '.join(sorted(f[0] for f in funcs))}\n\n\n" + "\n\n".join(tests)
    call = f"{name}({', '.join(map(repr, failing))})"
    prompt = (f"module.py:\n```python\n{module}```\nBug: `{call}` returns {bad_fn(*failing)!r} but should "
              f"return {good_fn(*failing)!r}.\nReply with a SEARCH/REPLACE patch.")
    patch = f"module.py\n<<<<<<< SEARCH\n{line_bad}\n=======\n{line_good}\n>>>>>>> REPLACE"
    trace = f"`{line_bad.strip()}` is wrong; it should be `{line_good.strip()}`."
    return item(f"{name}: {good_src} / {line_bad.strip()}", prompt,
                {"files": {"module.py": module}, "tests": test_src}, [reply(trace, patch)])


# ---------------------------------------------------------------------------------------------
# drawing splits and writing records

GENERATORS = {"math": make_math, "code": make_code, "if": make_if, "mcqa": make_mcqa,
              "structured": make_structured, "tool": make_tool, "longctx": make_longctx,
              "chat": make_chat, "swe": make_swe}


def split_of(domain, key):
    """'eval' for 1 in EVAL_EVERY keys, else 'train': a fixed partition of each domain's tasks."""
    h = int.from_bytes(hashlib.sha256(f"{domain}\0{key}".encode()).digest()[:8], "big")
    return "eval" if h % EVAL_EVERY == 0 else "train"


def generate(domain, split, n, seed=0, difficulty=0.0, doc_lines=24):
    """n items of `domain` for split "sft", "rl", "eval" (or another name, e.g. "prefs": also train).

    Deterministic in (seed, domain, split). Each item is hard with probability `difficulty`
    (0 = SFT level, 1 = all RL level). Eval items are distinct; training items may repeat a task,
    as draws from a distribution do, but never one whose key belongs to eval."""
    rng = random.Random(f"{seed}:{domain}:{split}")
    want = "eval" if split == "eval" else "train"
    kwargs = {"doc_lines": doc_lines} if domain == "longctx" else {}
    items, seen, tries = [], set(), 0
    while len(items) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise RuntimeError(f"{domain}: could not draw {n} distinct {split} tasks "
                               f"(got {len(items)}); the domain has too few for that size")
        it = GENERATORS[domain](rng, rng.random() < difficulty, **kwargs)
        if split_of(domain, it["key"]) != want or (split == "eval" and it["key"] in seen):
            continue
        seen.add(it["key"])
        items.append(it)
    return items


def sft_record(domain, it, thinking):
    """A training conversation; without thinking the assistant turns lose their "reasoning"."""
    turns = [m if thinking or m["role"] != "assistant" else {k: v for k, v in m.items() if k != "reasoning"}
             for m in it["turns"]]
    rec = {"messages": [{"role": "user", "content": it["prompt"]}] + turns, "domain": domain}
    if it["tools"]:
        rec["tools"] = it["tools"]
    return rec


def prompt_record(domain, it):
    """An RL / eval prompt: the user turn and the verifier's meta."""
    rec = {"domain": domain, "messages": [{"role": "user", "content": it["prompt"]}], "meta": it["meta"]}
    if it["tools"]:
        rec["tools"] = it["tools"]
    return rec

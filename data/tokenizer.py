"""
The tokenizer: a byte-level BPE trained on our own data, or any Hugging Face tokenizer.json.

Byte-level means the base alphabet is the 256 bytes, so every string (any language, any emoji,
any whitespace) encodes and decodes back to exactly itself: nothing is ever <unk>, and with no
normalizer and no added prefix space, decode(encode(text)) == text. BPE then merges the most
frequent pairs until the vocabulary has `vocab_size` entries; trained on the rendered chat data it
learns whole tokens for what recurs there ("boxed", "tool_call", the tool declarations).

The chat template's markers (data.chat.SPECIAL_TOKENS) are *added special tokens*: the tokenizer
cuts them out of any text before BPE runs, so "<|im_start|>" is always one id and never split,
whatever surrounds it. The rollout engine and the loss mask rely on that (a stop token must be one id).

A tokenizer brought from elsewhere (a Qwen3 checkpoint's tokenizer.json) is loaded the same way and
checked: the structural markers must each be one token. Qwen3 has all of them but writes `<tools>`
as plain text and pads with <|endoftext|>; `<tools>` then simply encodes as text, and a missing
`<|pad|>` is added at the end of the vocabulary (padding is never attended to or trained on, so
which embedding row it uses does not matter, as long as the model's vocab_size covers it).
"""

import os
import re

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from data.chat import PAD, SPECIAL_TOKENS

# markers the template cannot work without: they delimit turns, reasoning, tool calls and results
REQUIRED_TOKENS = [t for t in SPECIAL_TOKENS if t not in (PAD, "<tools>", "</tools>")]
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def train_tokenizer(texts, vocab_size):
    """Train a byte-level BPE of `vocab_size` ids (special tokens included) on an iterable of str.

    The special tokens are cut out of the training text first, exactly as encoding will cut them
    out, so no merge is ever spent on pieces of "<|im_start|>"."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    fragments = (frag for text in texts for frag in _SPECIAL_RE.split(text) if frag)
    tok.train_from_iterator(fragments, trainer)
    return tok


def save_tokenizer(tok, path):
    """Write tokenizer.json atomically (temp file + rename): a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        tok.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_tokenizer(path):
    """Load any Hugging Face tokenizer.json (ours or a checkpoint's) and check the chat template can
    use it: each required marker must exist and encode as exactly one id."""
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no tokenizer.json there")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # the Rust error is terse; say which file
        raise ValueError(f"{path}: not a valid Hugging Face tokenizer.json ({e})") from None
    missing = [t for t in REQUIRED_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{path}: the chat template's special tokens {missing} are missing from the "
                         f"vocabulary (required: {REQUIRED_TOKENS})")
    split = [t for t in REQUIRED_TOKENS if tok.encode(t, add_special_tokens=False).ids != [tok.token_to_id(t)]]
    if split:
        raise ValueError(f"{path}: {split} are in the vocabulary but not added tokens, so text "
                         f"containing them would be split into several ids")
    if tok.token_to_id(PAD) is None:
        tok.add_special_tokens([AddedToken(PAD, special=True, normalized=False)])
    return tok

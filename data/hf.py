"""
What a checkpoint needs beyond its weights for Hugging Face tools to use it as a chat model.

`tokenizer.json` alone loads in `AutoTokenizer`, but knows nothing of turns: `apply_chat_template`
fails without a template, and `generate` runs past the end of a turn without an eos. So every
checkpoint also gets (common.save_checkpoint calls `write_hf_files`):

- tokenizer_config.json: the chat template of data/chat.py written in Jinja (CHAT_TEMPLATE below),
  eos = <|im_end|> (a turn ends there), and the pad token.
- generation_config.json: eos ids (<|im_end|>, and <|endoftext|> where the vocabulary has it), the pad
  id, and the sampling the RL stages use by default (temperature 1, top-p 1: the policy's own
  distribution). A generation_config.json next to the source tokenizer.json (an `init` checkpoint's,
  with the sampling its authors chose) is carried over unchanged instead.

CHAT_TEMPLATE renders exactly the text data.chat.render does, block for block in the same order
(tests/test_hf.py checks it token for token, with jinja2 and with transformers where installed). It
reads the same message fields, ours and the Hugging Face ones; what it cannot do is parse tool-call
arguments given as a JSON string (Jinja has no JSON parser): give them as objects. Like Hugging
Face's templates it takes `enable_thinking` (True/False) for the mode of the generation prompt;
left out, the latest "/think" or "/no_think" in the system prompt or a user turn decides, else thinking.
"""

import json
import os
import shutil

from tokenizers import Tokenizer

from data.chat import IM_END, PAD, TOOLS_HEAD


def _jinja_str(text):
    # a Python string as a Jinja string literal (JSON's escapes are Jinja's)
    return json.dumps(text)


# Whitespace control: every tag trims around itself ({%- -%}), so the template's own layout adds
# nothing; the text comes only from {{ }} expressions.
CHAT_TEMPLATE = """\
{%- macro value(v) -%}
  {%- if v is mapping or (v is sequence and v is not string) -%}{{- v | tojson -}}
  {%- else -%}{{- v | string -}}{%- endif -%}
{%- endmacro -%}
{%- macro extra_keys(d, handled) -%}
  {%- if d is mapping -%}{%- for k in d if k not in handled -%}
    {{- '\\n<' ~ k ~ '>' ~ value(d[k]) ~ '</' ~ k ~ '>' -}}
  {%- endfor -%}{%- endif -%}
{%- endmacro -%}
{#- the system block, always there; the tools declared in it -#}
{%- set msgs = messages -%}
{%- set system = '' -%}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system = messages[0]['content'] or '' -%}
  {%- set msgs = messages[1:] -%}
{%- endif -%}
{{- '<|im_start|>system\\n' ~ system -}}
{%- if tools -%}
  {%- if system -%}{{- '\\n\\n' -}}{%- endif -%}
  {{- TOOLS_HEAD ~ '<tools>' -}}
  {%- for tool in tools -%}
    {%- set fn = tool['function'] if 'function' in tool else tool -%}
    {{- '\\n<function>\\n<name>' ~ (fn['name'] if 'name' in fn else '') ~ '</name>' -}}
    {%- if 'description' in fn -%}{{- '\\n<description>' ~ (fn['description'] | string | trim) ~ '</description>' -}}{%- endif -%}
    {{- '\\n<parameters>' -}}
    {%- set params = fn['parameters'] if 'parameters' in fn else none -%}
    {%- if params is mapping and 'properties' in params and params['properties'] is mapping -%}
      {%- for name, spec in params['properties'] | items -%}
        {%- set spec = spec if spec is mapping else {} -%}
        {{- '\\n<parameter>\\n<name>' ~ name ~ '</name>' -}}
        {%- if 'type' in spec -%}{{- '\\n<type>' ~ (spec['type'] | string) ~ '</type>' -}}{%- endif -%}
        {%- if 'description' in spec -%}{{- '\\n<description>' ~ (spec['description'] | string | trim) ~ '</description>' -}}{%- endif -%}
        {%- if 'enum' in spec -%}{{- '\\n<enum>' ~ (spec['enum'] | tojson) ~ '</enum>' -}}{%- endif -%}
        {{- extra_keys(spec, ['name', 'type', 'description', 'enum']) ~ '\\n</parameter>' -}}
      {%- endfor -%}
    {%- endif -%}
    {{- extra_keys(params, ['type', 'properties', 'required']) -}}
    {%- if params is mapping and 'required' in params -%}{{- '\\n<required>' ~ (params['required'] | tojson) ~ '</required>' -}}{%- endif -%}
    {{- '\\n</parameters>' ~ extra_keys(fn, ['type', 'name', 'description', 'parameters']) ~ '\\n</function>' -}}
  {%- endfor -%}
  {{- '\\n</tools>' -}}
{%- endif -%}
{{- '<|im_end|>\\n' -}}
{#- assistant turns before the last user query are shown without their reasoning -#}
{%- set ns = namespace(last_query=-1, thinking=true) -%}
{%- for m in msgs -%}{%- if m['role'] == 'user' -%}{%- set ns.last_query = loop.index0 -%}{%- endif -%}{%- endfor -%}
{%- for m in msgs -%}
  {%- if m['role'] == 'user' -%}
    {{- '<|im_start|>user\\n' ~ (m['content'] or '') ~ '<|im_end|>\\n' -}}
  {%- elif m['role'] == 'tool' -%}
    {#- consecutive tool results share one user turn -#}
    {%- if loop.first or loop.previtem['role'] != 'tool' -%}{{- '<|im_start|>user\\n' -}}{%- endif -%}
    {{- '<tool_response>\\n' ~ (m['content'] or '') ~ '\\n</tool_response>\\n' -}}
    {%- if loop.last or loop.nextitem['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}
  {%- elif m['role'] == 'assistant' -%}
    {%- set content = m['content'] or '' -%}
    {%- set reasoning = m['reasoning'] if m['reasoning'] is defined and m['reasoning'] is not none
        else (m['reasoning_content'] if m['reasoning_content'] is defined and m['reasoning_content'] is not none else '') -%}
    {%- set calls = m['tool_calls'] if m['tool_calls'] is defined and m['tool_calls'] else [] -%}
    {%- if reasoning | trim -%}{%- set text = '<think>\\n' ~ reasoning ~ '\\n</think>\\n' ~ content -%}
    {%- elif '<think>' in content or '</think>' in content -%}{%- set text = content -%}
    {%- else -%}{%- set text = '<think></think>' ~ content -%}{%- endif -%}
    {%- if loop.index0 >= ns.last_query -%}
      {%- set body = text | trim -%}
    {%- elif calls -%}
      {%- set after = text.split('</think>')[-1] if '</think>' in text else text.split('<think>')[0] -%}
      {%- set body = '<think></think>' ~ (after | trim) -%}
    {%- elif '<think>' in text and '</think>' in text -%}
      {%- set body = ('<think></think>' ~ text.split('</think>')[-1]) | trim -%}
    {%- else -%}
      {%- set body = text | trim -%}
    {%- endif -%}
    {{- '<|im_start|>assistant\\n' ~ body -}}
    {%- if calls -%}
      {{- '\\n' -}}
      {%- for call in calls -%}
        {%- set f = call['function'] if 'function' in call else call -%}
        {{- '<tool_call>\\n<function=' ~ f['name'] ~ '>\\n' -}}
        {%- for k, v in f['arguments'] | items -%}{{- '<parameter=' ~ k ~ '>\\n' ~ value(v) ~ '\\n</parameter>\\n' -}}{%- endfor -%}
        {{- '</function>\\n</tool_call>\\n' -}}
      {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\\n' -}}
  {%- else -%}
    {{- raise_exception('unknown role ' ~ m['role'] ~ ' (expected system first, then user, assistant or tool)') -}}
  {%- endif -%}
{%- endfor -%}
{#- the generation prompt: enable_thinking if given, else the latest /think or /no_think -#}
{%- if add_generation_prompt -%}
  {%- if enable_thinking is defined and enable_thinking is not none -%}
    {%- set ns.thinking = enable_thinking -%}
  {%- else -%}
    {%- for m in messages if m['role'] in ['system', 'user'] and m['content'] is string -%}
      {%- set on = m['content'].rfind('/think') -%}
      {%- set off = m['content'].rfind('/no_think') -%}
      {%- if on > off -%}{%- set ns.thinking = true -%}{%- elif off > on -%}{%- set ns.thinking = false -%}{%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{- '<|im_start|>assistant\\n' ~ ('<think>\\n' if ns.thinking else '<think></think>') -}}
{%- endif -%}
""".replace("TOOLS_HEAD", _jinja_str(TOOLS_HEAD))

# the sampling the RL stages use by default (grpo.py --temperature, --top_p)
SAMPLING = {"do_sample": True, "temperature": 1.0, "top_p": 1.0}


def write_hf_files(ckpt_dir, tokenizer_path):
    """Write tokenizer_config.json and generation_config.json into `ckpt_dir` for the tokenizer at
    `tokenizer_path` (copied there as tokenizer.json); a generation_config.json beside
    `tokenizer_path` is copied instead of writing ours."""
    try:
        tok = Tokenizer.from_file(tokenizer_path)
    except Exception as e:  # the Rust error is terse; say which file
        raise ValueError(f"{tokenizer_path}: not a valid Hugging Face tokenizer.json ({e})") from None
    # a tokenizer brought from elsewhere may have no <|pad|> in its file (data.tokenizer adds it in
    # memory only): then pad with its <|endoftext|>, or with the eos; padding is never attended to
    pad = next(t for t in (PAD, "<|endoftext|>", IM_END) if tok.token_to_id(t) is not None)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": IM_END,
              "pad_token": pad, "unk_token": None, "add_bos_token": False, "add_eos_token": False,
              "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE}
    with open(os.path.join(ckpt_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    theirs = os.path.join(os.path.dirname(os.path.abspath(tokenizer_path)), "generation_config.json")
    if os.path.isfile(theirs):
        shutil.copyfile(theirs, os.path.join(ckpt_dir, "generation_config.json"))
        return
    eos = [tok.token_to_id(t) for t in (IM_END, "<|endoftext|>") if tok.token_to_id(t) is not None]
    generation = {"eos_token_id": eos, "pad_token_id": tok.token_to_id(pad), "bos_token_id": None, **SAMPLING}
    with open(os.path.join(ckpt_dir, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)

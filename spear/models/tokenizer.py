"""A small byte-level BPE tokenizer built locally from task text, with a Hermes-style chat template.

Digit runs are cut into chunks of at most three digits, left to right, and every number below 1,000
is a single token (added explicitly, so unseen numbers are single tokens too): a number is copied
as one or two tokens, which a tiny model learns quickly, instead of digit by digit; the chat markup
(``<|im_start|>``, ``<|im_end|>``, ``<tool_call>`` ...) consists of single tokens. The chat template
renders every message as a self-contained block, so rendering is *prefix-stable*: the ids of a
conversation ending in an assistant turn start with the ids of the conversation before it plus
the generation prompt. A multi-turn loop can therefore append tokens without re-encoding drift.

Rendering (``tools`` shown compactly in the system block)::

    <|im_start|>system\\n{system}\\n<tools>calculator(expression): {description}</tools><|im_end|>\\n
    <|im_start|>user\\n{prompt}<|im_end|>\\n
    <|im_start|>assistant\\n{text}<|im_end|>\\n
    <|im_start|>tool\\n<tool_response>{result}</tool_response><|im_end|>\\n
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from spear.types import Message

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
TOOL_CALL, TOOL_CALL_END = "<tool_call>", "</tool_call>"
TOOL_RESPONSE, TOOL_RESPONSE_END = "<tool_response>", "</tool_response>"
TOOLS, TOOLS_END = "<tools>", "</tools>"
CONTROL_TOKENS = (IM_START, IM_END, PAD)  # special: never produced by decoding user text
MARKUP_TOKENS = (TOOL_CALL, TOOL_CALL_END, TOOL_RESPONSE, TOOL_RESPONSE_END, TOOLS, TOOLS_END)

# Qwen/Hermes-style template; every piece of output is an explicit string so whitespace is exact.
CHAT_TEMPLATE = (
    "{%- set sys = messages[0].content if messages and messages[0].role == 'system' else none -%}"
    "{%- if tools or sys is not none -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if sys is not none -%}{{- sys -}}{%- if tools -%}{{- '\\n' -}}{%- endif -%}{%- endif -%}"
    "{%- if tools -%}{{- '<tools>' -}}"
    "{%- for t in tools -%}{%- set f = t.function if t.function is defined else t -%}"
    "{%- if not loop.first -%}{{- ' ' -}}{%- endif -%}"
    "{{- f.name ~ '(' ~ ((f.parameters.properties if f.parameters is defined and"
    " f.parameters.properties is defined else {}) | list | join(',')) ~ ')' -}}"
    "{%- if f.description is defined and f.description -%}{{- ': ' ~ f.description -}}{%- endif -%}"
    "{%- endfor -%}{{- '</tools>' -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}"
    "{%- if not loop.first -%}{{- raise_exception('a system message must come first') -}}{%- endif -%}"
    "{%- elif m.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if m.content is string -%}{{- m.content -}}{%- endif -%}"
    "{%- for c in (m.tool_calls or []) -%}{%- set f = c.function if c.function is defined else c -%}"
    '{{- \'<tool_call>{"name": "\' ~ f.name ~ \'", "arguments": \' -}}'
    "{%- if f.arguments is string -%}{{- f.arguments -}}{%- else -%}{{- f.arguments | tojson -}}{%- endif -%}"
    "{{- '}</tool_call>' -}}"
    "{%- endfor -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif m.role == 'tool' -%}"
    "{{- '<|im_start|>tool\\n<tool_response>' ~ m.content ~ '</tool_response><|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' ~ m.role ~ '\\n' ~ m.content ~ '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


NUMBER_TOKENS = 1000  # every integer below this is one token, whatever the corpus held
MIN_PAIR_FREQUENCY = 2  # a BPE merge needs its pair seen at least twice in the corpus


@dataclass(frozen=True, slots=True)
class TokenizerParams:
    """``vocab_size``: largest BPE vocabulary (bytes, markup tokens and merges included); a
    small templated corpus may yield fewer merges."""

    vocab_size: int


@dataclass(frozen=True, slots=True)
class Conversation:
    """One chat: the messages and the tool schemas offered (``tools=`` of the template)."""

    messages: list[Message]
    tools: list[dict[str, Any]] | None


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Digit runs are cut into chunks of at most three digits, left to right, before the GPT-2
    # style byte-level split (as Llama 3 / GPT-4 tokenizers do).
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"\d{1,3}"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _backend(corpus: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on ``corpus``; markup tokens get the first ids (0, 1, ...)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False) for t in CONTROL_TOKENS]
    markup = [AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_PAIR_FREQUENCY,
        special_tokens=control + markup,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.add_special_tokens(control)
    tok.add_tokens(markup)
    tok.add_tokens(
        [AddedToken(str(i), special=False, normalized=False) for i in range(NUMBER_TOKENS)]
    )
    return tok


def wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a backend tokenizer with the chat template and special tokens set."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=IM_END,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        model_max_length=1_000_000,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def render(tok: PreTrainedTokenizerFast, conv: Conversation, *, generation_prompt: bool) -> str:
    """The chat-template text of ``conv``."""
    messages: Any = conv.messages  # TypedDict messages; transformers annotates plain dicts
    tools: Any = conv.tools
    text = tok.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=generation_prompt
    )
    if not isinstance(text, str):
        raise TypeError("apply_chat_template(tokenize=False) did not return a string")
    return text


def train_tokenizer(
    conversations: Sequence[Conversation], params: TokenizerParams
) -> PreTrainedTokenizerFast:
    """Train the BPE on the rendered ``conversations`` and return the wrapped tokenizer."""
    if not conversations:
        raise ValueError("train_tokenizer needs at least one conversation")
    if params.vocab_size < 300:
        raise ValueError(
            f"vocab_size must be >= 300 (256 bytes + markup + merges), got {params.vocab_size}"
        )
    bootstrap = wrap(_backend([], 0))  # bytes only: enough to render the template
    texts = [render(bootstrap, c, generation_prompt=False) for c in conversations]
    return wrap(_backend(texts, params.vocab_size))


def chat_ids(
    tok: PreTrainedTokenizerFast, conv: Conversation, *, generation_prompt: bool
) -> list[int]:
    """Token ids of the rendered conversation."""
    ids = tok(render(tok, conv, generation_prompt=generation_prompt), add_special_tokens=False)
    return list(ids["input_ids"])

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from spear.envs.arithmetic import SYSTEM_PROMPT, Calculator, CalculatorLimits, generate_tasks
from spear.envs.base import tool_schema
from spear.models.tokenizer import (
    IM_END,
    IM_START,
    MARKUP_TOKENS,
    NUMBER_TOKENS,
    PAD,
    Conversation,
    TokenizerParams,
    chat_ids,
    render,
    train_tokenizer,
)

TOOLS = [tool_schema(Calculator(CalculatorLimits(max_chars=50, max_digits=20, max_exponent=8)))]


def conversation(prompt: str, expression: str, answer: str) -> Conversation:
    call = f'<tool_call>{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}</tool_call>'
    return Conversation(
        [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": call},
            {"role": "tool", "content": answer},
            {"role": "assistant", "content": f"\\boxed{{{answer}}}"},
        ],
        TOOLS,
    )


@pytest.fixture(scope="module")
def convs() -> list[Conversation]:
    tasks = generate_tasks("train", 200, 0, 2)
    return [conversation(t.prompt, str(t.meta["expression"]), str(t.answer)) for t in tasks]


@pytest.fixture(scope="module")
def tok(convs: list[Conversation]):
    return train_tokenizer(convs, TokenizerParams(vocab_size=400))


def test_markup_tokens_are_single_tokens(tok) -> None:
    for t in (IM_START, IM_END, PAD, *MARKUP_TOKENS):
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1, t
    assert tok.eos_token == IM_END
    assert tok.pad_token == PAD
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) <= 400 + NUMBER_TOKENS


def test_numbers_are_three_digit_chunks(tok) -> None:
    # every number below 1000 is one token (even ones the corpus never held); longer digit runs
    # are cut left to right into chunks of three: 1234567 -> 123 456 7, 4007 -> 400 7
    for n in (0, 7, 42, 999, 555, 318):
        assert len(tok(str(n), add_special_tokens=False)["input_ids"]) == 1, n
    pieces = tok.convert_ids_to_tokens(
        tok("1234567 x4007, 12", add_special_tokens=False)["input_ids"]
    )
    assert [p for p in pieces if any(c.isdigit() for c in p)] == [
        "123",
        "456",
        "7",
        "400",
        "7",
        "12",
    ]
    assert tok.decode(tok("a 4007-12*3", add_special_tokens=False)["input_ids"]) == "a 4007-12*3"


def test_template_layout(tok, convs: list[Conversation]) -> None:
    text = render(tok, convs[0], generation_prompt=False)
    assert text.startswith(
        "<|im_start|>system\n" + SYSTEM_PROMPT + "\n<tools>calculator(expression): "
        "Evaluate an arithmetic expression.</tools><|im_end|>\n<|im_start|>user\n"
    )
    assert "<|im_start|>tool\n<tool_response>" in text
    assert text.endswith("<|im_end|>\n")
    gen = render(tok, Conversation(convs[0].messages[:2], TOOLS), generation_prompt=True)
    assert gen.endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_template_renders_structured_tool_calls(tok) -> None:
    msgs = [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "calculator", "arguments": {"expression": "1+2"}},
                }
            ],
        },
    ]
    text = tok.apply_chat_template(msgs, tokenize=False)
    assert (
        '<tool_call>{"name": "calculator", "arguments": {"expression": "1+2"}}</tool_call>' in text
    )


def test_template_without_tools_or_system(tok) -> None:
    text = render(
        tok, Conversation([{"role": "user", "content": "hi"}], None), generation_prompt=True
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_prefix_stability(tok, convs: list[Conversation]) -> None:
    for conv in convs[:50]:
        for k, m in enumerate(conv.messages):
            if m["role"] != "assistant":
                continue
            head = chat_ids(
                tok, Conversation(conv.messages[:k], conv.tools), generation_prompt=True
            )
            full = chat_ids(
                tok, Conversation(conv.messages[: k + 1], conv.tools), generation_prompt=False
            )
            assert full[: len(head)] == head
            # the appended assistant turn encodes exactly as its own text + end-of-turn
            own = tok(m["content"] + IM_END, add_special_tokens=False)["input_ids"]
            assert full[len(head) : len(head) + len(own)] == own


def test_round_trip_task_text(tok, convs: list[Conversation]) -> None:
    for conv in convs[:50]:
        text = render(tok, conv, generation_prompt=False)
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=40))
def test_round_trip_any_text(text: str) -> None:
    tok = _SHARED["tok"]
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


_SHARED: dict = {}


@pytest.fixture(autouse=True, scope="module")
def _share(tok) -> None:
    _SHARED["tok"] = tok


def test_save_and_load(tok, convs: list[Conversation], tmp_path) -> None:
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = render(tok, convs[1], generation_prompt=False)
    assert (
        loaded(text, add_special_tokens=False)["input_ids"]
        == tok(text, add_special_tokens=False)["input_ids"]
    )
    again = loaded.apply_chat_template(convs[1].messages, tools=TOOLS, tokenize=False)
    assert again == text
    assert loaded.eos_token == IM_END and loaded.pad_token == PAD


def test_bad_params(convs: list[Conversation]) -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(convs[:3], TokenizerParams(vocab_size=100))
    with pytest.raises(ValueError, match="conversation"):
        train_tokenizer([], TokenizerParams(vocab_size=400))

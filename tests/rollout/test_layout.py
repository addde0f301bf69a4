"""Chat rendering without drift, token tracks, turn samples and turn prompts."""

from __future__ import annotations

import pytest
import torch

from spear.envs.base import Task, tool_schema
from spear.registry import UnknownNameError
from spear.rollout.layout import (
    TURN_PROMPTS,
    ChatFormat,
    ChatTemplateError,
    TokenTrack,
    TurnContext,
    TurnRecord,
    end_of_turn_text,
    history_turn_prompt,
    message_text,
    observation_turn_prompt,
    turn_sample,
)
from tests.rollout.conftest import CalcTool, build_tokenizer

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 times 34?"},
    {"role": "assistant", "content": "I will use the tool."},
]
OBS = [{"role": "tool", "content": "408"}, {"role": "tool", "content": "ok"}]


def test_end_of_turn_marker_is_read_off_the_template(tokenizer) -> None:
    assert end_of_turn_text(tokenizer) == "<|im_end|>"
    fmt = ChatFormat(tokenizer, None)
    assert fmt.eot_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    # stop ids: the one-token marker and eos (<|endoftext|>, id 0)
    assert fmt.stop_token_ids() == tuple(sorted({0, fmt.eot_ids[0]}))


def test_observation_delta_starts_after_the_end_of_turn_marker(tokenizer) -> None:
    fmt = ChatFormat(tokenizer, [tool_schema(CalcTool())])
    obs = fmt.observation_ids(CONV, OBS)
    assert obs.exact
    # the newline after <|im_end|>, both tool results in one user turn, the generation prompt
    assert tokenizer.decode(obs.ids) == (
        "\n<|im_start|>user\n<tool_response>\n408\n</tool_response>"
        "\n<tool_response>\nok\n</tool_response><|im_end|>\n<|im_start|>assistant\n"
    )


def test_pieced_tokens_equal_the_full_rendering_when_the_reply_is_canonical(tokenizer) -> None:
    fmt = ChatFormat(tokenizer, [tool_schema(CalcTool())])
    prompt = fmt.prompt_ids(CONV[:2])
    reply = fmt.encode(CONV[2]["content"]) + fmt.eot_ids
    pieced = prompt + reply + fmt.observation_ids(CONV, OBS).ids
    assert pieced == fmt.prompt_ids([*CONV, *OBS])


def test_unstable_template_falls_back_to_the_stand_in_delta(unstable_tokenizer) -> None:
    fmt = ChatFormat(unstable_tokenizer, None)
    conv = [*CONV[:2], {"role": "assistant", "content": "<think>hmm</think>look"}]
    assert fmt.observation_ids(conv, [{"role": "tool", "content": "x"}]).exact  # no new user turn
    obs = fmt.observation_ids(conv, [{"role": "user", "content": "look"}])  # drops the reasoning
    assert not obs.exact
    assert (
        unstable_tokenizer.decode(obs.ids)
        == "\n<|im_start|>user\nlook<|im_end|>\n<|im_start|>assistant\n"
    )


def test_templates_that_cannot_serve_the_loop_are_rejected() -> None:
    tok = build_tokenizer()
    tok.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat_template"):
        ChatFormat(tok, None)
    tok.chat_template = "{{ raise_exception('nope') }}"
    with pytest.raises(ChatTemplateError, match="probe"):
        ChatFormat(tok, None)


def test_response_text_strips_the_marker_and_decode_never_raises(tokenizer) -> None:
    fmt = ChatFormat(tokenizer, None)
    body = fmt.encode("Take the key.")
    assert fmt.response_text(body + fmt.eot_ids, (0,)) == "Take the key."
    assert fmt.response_text([*body, 0], (0,)) == "Take the key."  # eos stop token
    assert fmt.ends_turn(body + fmt.eot_ids) and not fmt.ends_turn(body)
    half = fmt.encode("é")[:1]  # first byte of a two-byte character
    assert "\ufffd" in fmt.decode(half)
    assert isinstance(fmt.decode([10**9, *body]), str)  # out-of-vocabulary id


def test_token_track_masks_and_logprobs() -> None:
    track = TokenTrack()
    track.add_context([1, 2])
    track.add_sampled([3, 4], [-0.5, -0.25])
    track.add_context([5])
    s = track.to_sample(group_id=7, episode_id=9, step=3, turn_index=0)
    assert s.input_ids.tolist() == [1, 2, 3, 4, 5]
    assert s.loss_mask.tolist() == [False, False, True, True, False]
    assert s.behavior_logprobs.tolist() == [0.0, 0.0, -0.5, -0.25, 0.0]
    assert (s.group_id, s.episode_id, s.step, s.num_response_tokens) == (7, 9, 3, 2)
    assert s.input_ids.dtype == torch.long and s.loss_mask.dtype == torch.bool
    with pytest.raises(ValueError, match="2 sampled ids but 1 log-probs"):
        track.add_sampled([1, 2], [0.0])


def test_turn_sample_carries_turn_anchor_and_reward() -> None:
    s = turn_sample(
        [1, 2, 3],
        [4, 5],
        [-1.0, -2.0],
        [9],
        group_id=1,
        episode_id=2,
        step=5,
        turn_index=3,
        anchor="You see a key.",
        reward=0.5,
    )
    assert s.input_ids.tolist() == [1, 2, 3, 4, 5, 9]
    assert s.loss_mask.tolist() == [False, False, False, True, True, False]
    assert s.behavior_logprobs.tolist() == [0.0, 0.0, 0.0, -1.0, -2.0, 0.0]
    assert (s.turn_index, s.anchor, s.turn_reward, s.step) == (3, "You see a key.", 0.5, 5)


def _ctx(turn_index: int, history: tuple[TurnRecord, ...]) -> TurnContext:
    first = (
        {"role": "system", "content": "Act."},
        {"role": "user", "content": "Open the door."},
    )
    return TurnContext(
        task=Task(task_id="t", prompt="Open the door."),
        first_messages=first,
        history=history,
        observation=({"role": "user", "content": "The door is locked."},),
        turn_index=turn_index,
    )


def test_history_turn_prompt_shows_task_recent_pairs_and_observation() -> None:
    ctx0 = _ctx(0, ())
    assert history_turn_prompt(ctx0) == list(ctx0.first_messages)
    hist = (TurnRecord("You see a key.", "take key"), TurnRecord("You hold a key.", "go north"))
    msgs = history_turn_prompt(_ctx(3, hist))
    assert msgs[0] == {"role": "system", "content": "Act."}
    # turn 3 with two records: they are steps 2 and 3
    assert msgs[1] == {
        "role": "user",
        "content": "Open the door.\n\nYou have taken 3 steps.\n"
        "Your last 2 observations and actions:\n"
        "[Observation 2: 'You see a key.', Action 2: 'take key']\n"
        "[Observation 3: 'You hold a key.', Action 3: 'go north']\n\n"
        "Current observation (step 4):\nThe door is locked.",
    }


def test_observation_turn_prompt_and_registry() -> None:
    ctx = _ctx(2, ())
    assert observation_turn_prompt(ctx) == [ctx.first_messages[0], *ctx.observation]
    assert TURN_PROMPTS.get("observation") is observation_turn_prompt
    with pytest.raises(UnknownNameError, match="history"):
        TURN_PROMPTS.get("histroy")
    assert (
        message_text([{"role": "tool", "content": "a"}, {"role": "tool", "content": "b"}]) == "a\nb"
    )


def test_prompt_ids_render_each_distinct_message_list_once(tokenizer, monkeypatch) -> None:
    fmt = ChatFormat(tokenizer, [tool_schema(CalcTool())])
    renders: list[int] = []
    real = fmt.render
    monkeypatch.setattr(fmt, "render", lambda m, **k: renders.append(1) or real(m, **k))
    a = [{"role": "user", "content": "What is 2+3?"}]
    b = [{"role": "user", "content": "What is 2+4?"}]
    first = fmt.prompt_ids(a)
    text = tokenizer.apply_chat_template(
        a, tools=fmt.tools, add_generation_prompt=True, tokenize=False
    )
    assert first == tokenizer(text, add_special_tokens=False)["input_ids"]
    again = fmt.prompt_ids([dict(m) for m in a])  # an equal list, not the same object
    other = fmt.prompt_ids(b)
    assert again == first and other != first
    assert len(renders) == 2
    again.append(0)  # each call returns its own list
    assert fmt.prompt_ids(a) == first

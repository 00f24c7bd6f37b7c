"""Prompt construction of the nine new tasks through PromptBuilder, in both modes (SCBENCH.md s.2-3)."""
import pytest

from scbench.data import generate_rows, parse_row
from scbench.prompts import MULTI_REQUEST_MARGIN, PromptBuilder
from scbench.registry import TASKS
from scbench.tasks.mf import mf_prefix


class FakeEngine:
    """ChatML join; one token per character (BOS = 1 when special tokens are added)."""

    window = 8192

    def render_chat(self, messages, add_generation_prompt=True):
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def encode(self, text, add_special_tokens=True):
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i != 1)

    def describe(self):
        return {"model": "fake"}


E = FakeEngine()
LENGTH = {"scbench_repoqa": 1000, "scbench_repoqa_and_kv": 1000}


def example(name, turns=3):
    row = generate_rows(TASKS.get(name), 1, LENGTH.get(name, 500), turns, seed=3)[0]
    return parse_row(row, name)


def ctx(ex):
    return str(ex.context)


def q_block(t):
    o = t.extra["options"]
    return f"Question: {t.input}\nA. {o[0]}\nB. {o[1]}\nC. {o[2]}\nD. {o[3]}\n\nThe the correct answer is"


REPOQA_HEAD = ("Based on the function description and code context, please retrieve and repeat the exact described "
               "function from the code context in a code block wrapped by ```:\n\n")
FIRST = {  # expected first-turn user message: (text before the context, text after it)
    "scbench_repoqa": lambda ex: (REPOQA_HEAD, "\n\n" + ex.turns[0].input),
    "scbench_qa_eng": lambda ex: ("Read the book and answer the question. Be very concise in your answer.\n\n",
                                  f"\n\nQuestion: {ex.turns[0].input}\nAnswer:"),
    "scbench_qa_chn": lambda ex: ("阅读以下书籍然后回答问题。\n\n", f"\n\n问题：{ex.turns[0].input}\n答案："),
    "scbench_choice_eng": lambda ex: ("Read the book and answer the question.\n\n", "\n\n" + q_block(ex.turns[0])),
    "scbench_mf": lambda ex: (mf_prefix(ex.turns[0].input) + "\n\n", "\n\n" + ex.turns[0].input),
    "scbench_many_shot": lambda ex: ("", "\n\n" + ex.turns[0].input),
    "scbench_summary": lambda ex: ("", "\n\n" + ex.turns[0].input),
    "scbench_summary_with_needles": lambda ex: ("", "\n\n" + ex.turns[0].input),
    "scbench_repoqa_and_kv": lambda ex: ("", "\n\n" + ex.turns[0].input),
}
FOLLOW = {  # expected follow-up user message of turn i (faithful variants)
    "scbench_qa_eng": lambda ex, i: f"Question: {ex.turns[i].input}\nAnswer:",
    "scbench_qa_chn": lambda ex, i: f"问题：{ex.turns[i].input}\n答案：",
    "scbench_choice_eng": lambda ex, i: q_block(ex.turns[i]),
    "scbench_mf": lambda ex, i: mf_prefix(ex.turns[-1].input) + "\n\n" + ex.turns[i].input,  # last turn's prefix
}
MAX_NEW = {"scbench_repoqa": 1024, "scbench_qa_eng": 40, "scbench_qa_chn": 40, "scbench_choice_eng": 40,
           "scbench_mf": 5, "scbench_many_shot": 10, "scbench_summary": 200}
MIXED = {"scbench_summary_with_needles": {"scbench_summary": 800, "scbench_passkey": 15},
         "scbench_repoqa_and_kv": {"scbench_repoqa": 1024, "scbench_kv": 80}}


@pytest.mark.parametrize("name", sorted(FIRST))
def test_multi_turn(name):
    task, ex = TASKS.get(name), example(name)
    b = PromptBuilder(E, task, ex, mode="multi_turn", n_turns=3, max_seq_length=131072)
    reserved = sum(MIXED[name].values()) * 3 // 2 if name in MIXED else MAX_NEW[name] * 3
    assert b.budget == E.window - reserved
    before, after = FIRST[name](ex)
    first = b.first()
    assert first.ids[0] == 1  # faithful BOS on top of the template
    text = E.decode(first.ids)
    assert text == E.render_chat([{"role": "user", "content": before + ctx(ex) + after}]) or b.truncated
    assert text.endswith(after + "<|im_end|>\n<|im_start|>assistant\n")
    for i in range(3):
        tp = first if i == 0 else b.delta(i)
        want = MIXED[name][ex.turns[i].extra["task"]] if name in MIXED else MAX_NEW[name]
        assert tp.max_new_tokens == want
        if i:
            delta = E.decode(tp.ids)
            gold = task.answer_text(ex.turns[i - 1])
            user = FOLLOW.get(name, lambda e, j: e.turns[j].input)(ex, i)
            assert gold + "<|im_end|>\n<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n" in delta
            if name == "scbench_summary":  # "This paper" forced after the header, and replayed in the history
                assert delta.endswith("assistant\nThis paper") and tp.rewind == len("This paper")
                if i == 2:
                    assert delta.startswith("This paper" + gold)
            else:
                assert tp.rewind == 0


@pytest.mark.parametrize("name", sorted(FIRST))
def test_multi_request(name):
    task, ex = TASKS.get(name), example(name)
    b = PromptBuilder(E, task, ex, mode="multi_request", n_turns=3, max_seq_length=131072)
    reserved = sum(MIXED[name].values()) * 3 // 2 if name in MIXED else MAX_NEW[name] * 3
    assert b.budget == E.window - reserved - MULTI_REQUEST_MARGIN
    before, _ = FIRST[name](ex)
    head = E.decode(b.context())
    assert head.endswith(ctx(ex)[-200:]) and before in head
    for j in range(3):
        tp = b.request(j)
        req = E.decode(tp.ids)
        assert tp.rewind == 0  # no "This paper" in multi-request mode (the reference adds it to follow-ups only)
        assert req.startswith("\n\n") and req.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert ex.turns[j].input in req
        if name == "scbench_mf" and j:
            assert req.startswith("\n\n" + mf_prefix(ex.turns[j].input) + "\n\n")


def test_mf_fixed_variant_uses_each_turns_prefix():
    ex = example("scbench_mf", turns=4)
    faithful, fixed = TASKS.get("scbench_mf"), TASKS.get("scbench_mf").with_variant("fixed")
    for i in range(1, 4):
        assert fixed.followup_prompt(ex, i) == mf_prefix(ex.turns[i].input) + "\n\n" + ex.turns[i].input
        assert faithful.followup_prompt(ex, i).startswith(mf_prefix(ex.turns[3].input))
    # the runner keeps 2 of 4 turns: the faithful "last" prefix is the last KEPT turn's (as the reference cuts rows)
    b = PromptBuilder(E, faithful, ex, mode="multi_turn", n_turns=2, max_seq_length=131072)
    b.first()
    assert (mf_prefix(ex.turns[1].input) + "\n\n" + ex.turns[1].input) in E.decode(b.delta(1).ids)


def test_truncation_keeps_both_ends():
    ex = example("scbench_qa_eng")
    b = PromptBuilder(E, TASKS.get("scbench_qa_eng"), ex, mode="multi_turn", n_turns=3, max_seq_length=1000)
    first = b.first()
    assert len(first.ids) == 2 * ((1000 - 120) // 2) and b.truncated > 0
    assert E.decode(first.ids).endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")


def test_mf_context_is_python_list_repr():
    ex = example("scbench_mf")
    parts = TASKS.get("scbench_mf").first_prompt(ex, 0)
    assert parts.context == str(ex.context) and parts.context.startswith("[") and ", " in parts.context


def test_context_truncation_gives_both_modes_one_context():
    """``truncation=context``: multi-turn's first prompt is multi-request's request 0 (its context cut alone to the
    multi-request budget, then the query whole), so both modes first feed the same context; by default (the
    reference) each mode cuts its own prompt to its own budget and the contexts differ."""
    task, ex = TASKS.get("scbench_qa_eng"), example("scbench_qa_eng")
    built = {}
    for rule in ("reference", "context"):
        mt = PromptBuilder(E, task, ex, mode="multi_turn", n_turns=3, max_seq_length=1800, truncation=rule)
        mr = PromptBuilder(E, task, ex, mode="multi_request", n_turns=3, max_seq_length=1800, truncation=rule)
        first, context, request = mt.first(), mr.context(), mr.request(0)
        assert mt.truncated > 0 and mr.truncated > 0
        built[rule] = (first, context)
        if rule == "context":
            assert first.ids[: first.query_start] == context and first.ids == context + request.ids
            assert E.decode(first.ids).endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
            assert len(context) == 2 * ((1800 - 120 - MULTI_REQUEST_MARGIN) // 2)
    first, context = built["reference"]
    assert first.ids[: first.query_start] != context and len(first.ids) == 2 * ((1800 - 120) // 2)
    with pytest.raises(ValueError, match="truncation must be one of"):
        PromptBuilder(E, task, ex, mode="multi_turn", n_turns=3, max_seq_length=2000, truncation="middle")

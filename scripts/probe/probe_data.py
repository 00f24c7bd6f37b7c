"""Training and evaluation data for the smollm2-135m-probe adapter, in the exact token format the runner feeds.

Rows come from the repository's own offline generators (``Task.generate_row``) plus a passkey task
defined here (labelled pass keys hidden in filler). Sequences are built with ``scbench.prompts.PromptBuilder``
over a tokenizer wrapper, so they are token-for-token what ``scbench.runner.Replay`` feeds:

- multi-turn: first prompt (chat template, faithful BOS) + for every later turn the delta (previous GOLD
  answer, end of turn, follow-up, generation prompt) + the last answer and ``<|im_end|>``;
- multi-request: prompt 0 (template cut after the context) + request j (query, end of user turn,
  generation prompt) + answer j and ``<|im_end|>``.

Labels are -100 everywhere except on the answer tokens (and their closing ``<|im_end|>``).

Seeds. Every row is drawn from ``random.Random(f"{task}:{seed}:{i}")`` as ``scbench.data.generate_rows``
does. Training uses seeds >= TRAIN_SEED_BASE (one row per seed, i = 0); evaluation uses the seeds in
EVAL_SEEDS and the benchmark / CI seed 0. ``check_disjoint`` asserts the two never meet.
"""
from __future__ import annotations

import functools
import random
import string

from scbench.prompts import PromptBuilder
from scbench.records import Example, Turn
from scbench.tasks.base import Task, fit_length
from scbench.tasks.scoring import passkey_score

TRAIN_SEED_BASE = 10_000_000
"""Training row k uses seed TRAIN_SEED_BASE + k."""
EVAL_SEEDS = frozenset({0, 1, 2, 3, 4, 777, 778, 779, 780, 781})
"""Seeds the evaluation, the default benchmark (seed 0) and the CI regression test may use."""
END = "<|im_end|>"


def check_disjoint(train_seeds, eval_seeds=EVAL_SEEDS) -> None:
    train_seeds = set(train_seeds)
    assert min(train_seeds) >= TRAIN_SEED_BASE, "training seeds must start at TRAIN_SEED_BASE"
    overlap = train_seeds & set(eval_seeds)
    assert not overlap, f"training and evaluation seeds overlap: {sorted(overlap)[:5]}"
    assert max(eval_seeds) < TRAIN_SEED_BASE, "evaluation seeds must stay below TRAIN_SEED_BASE"


# --- passkey ----------------------------------------------------------------------------------------
PK_INTRO = ("There is important information hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.\n\n")
PK_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PK_NEEDLE = 'The pass key labelled "{label}" is {key}. Remember it. {key} is the pass key labelled "{label}".'
PK_QUESTION = 'What is the pass key labelled "{label}"? Answer with the number only. The pass key labelled "{label}" is'
PK_LABELS = ("amber", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
             "kestrel", "lagoon", "meadow", "nectar", "onyx", "prairie")


class PasskeyTask(Task):
    """Labelled pass keys (5-digit numbers) at random depths of repeated filler (``filler="repeat"``) or of
    prose paragraphs from the CPython docs (``filler="prose"``); one key asked per turn. Score: the first
    digit run of the prediction equals the key."""

    name = "probe_passkey"
    category = "string_retrieval"
    version = "1"
    max_new_tokens = 15
    metric = "passkey"

    def __init__(self, filler: str = "repeat"):
        self.filler = filler

    def score(self, prediction, turn, example_extra):
        return {self.metric: passkey_score(prediction, turn.answer)}

    def generate_row(self, rng, idx, length, n_turns, count):
        n_keys = max(1, n_turns)
        labels = rng.sample(PK_LABELS, n_keys)
        keys = [str(rng.randint(10_000, 99_999)) for _ in labels]
        needles = [PK_NEEDLE.format(label=lab, key=k) for lab, k in zip(labels, keys)]
        layout = rng.getrandbits(32)
        if self.filler == "prose":
            from scbench.tasks.material import paragraphs

            pool = list(paragraphs())
            random.Random(layout).shuffle(pool)
            unit = lambda i: pool[i % len(pool)]  # noqa: E731
            sep = "\n\n"
        else:
            unit = lambda i: PK_FILLER  # noqa: E731
            sep = " "

        def build(n: int) -> str:
            r = random.Random(layout)
            slots = sorted(r.sample(range(n + len(needles)), len(needles)))
            order = list(range(len(needles)))
            r.shuffle(order)
            placed = dict(zip(slots, (needles[o] for o in order)))
            out, k = [], 0
            for i in range(n + len(needles)):
                if i in placed:
                    out.append(placed[i])
                else:
                    out.append(unit(k))
                    k += 1
            return PK_INTRO + sep.join(out)

        start = max(1, length // (24 if self.filler == "repeat" else 120))
        _, context = fit_length(build, length, count, start=start)
        asked = rng.sample(range(n_keys), n_turns)
        turns = [{"input": PK_QUESTION.format(label=labels[j]), "answer": keys[j]} for j in asked]
        return {"id": idx, "context": context, "multi_turns": turns}


# --- token formatting ---------------------------------------------------------------------------------
class TokFormatter:
    """The slice of the engine interface that PromptBuilder uses, over a bare tokenizer."""

    def __init__(self, tokenizer, window: int = 8192):
        self.tokenizer = tokenizer
        self.window = window

    def render_chat(self, messages, add_generation_prompt):
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def encode(self, text, add_special_tokens):
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def describe(self):
        return {"model": "probe-data"}


def to_example(row: dict, where: str) -> Example:
    turns = tuple(Turn(input=t["input"], answer=t["answer"], extra={k: v for k, v in t.items() if k not in ("input", "answer")})
                  for t in row["multi_turns"])
    return Example(id=str(row["id"]), context=row["context"], turns=turns,
                   extra={k: v for k, v in row.items() if k not in ("id", "context", "multi_turns")}, source=where)


def _answer_ids(fmt: TokFormatter, task, turn) -> list[int]:
    return fmt.encode(task.answer_text(turn) + END, add_special_tokens=False)


def multi_turn_sequence(fmt: TokFormatter, task, ex: Example, max_seq_length: int = 8192):
    """(ids, labels) of a whole golden multi-turn session ending with the last turn's answer."""
    n = len(ex.turns)
    pb = PromptBuilder(fmt, task, ex, mode="multi_turn", n_turns=n, max_seq_length=max_seq_length)
    tp = pb.first()
    if pb.truncated:
        return None
    ids, labels = list(tp.ids), [-100] * len(tp.ids)
    for i in range(1, n):
        tp = pb.delta(i)
        ans = _answer_ids(fmt, task, ex.turns[i - 1])
        k = len(ans) if tp.ids[: len(ans)] == ans else 0
        ids += tp.ids
        labels += tp.ids[:k] + [-100] * (len(tp.ids) - k)
    ans = _answer_ids(fmt, task, ex.turns[n - 1])
    return ids + ans, labels + ans


def multi_request_sequence(fmt: TokFormatter, task, ex: Example, j: int, max_seq_length: int = 8192):
    """(ids, labels) of prompt 0 + request j + answer j."""
    n = len(ex.turns)
    pb = PromptBuilder(fmt, task, ex, mode="multi_request", n_turns=n, max_seq_length=max_seq_length)
    ctx = pb.context()
    if pb.truncated:
        return None
    tp = pb.request(j)
    ans = _answer_ids(fmt, task, ex.turns[j])
    ids = ctx + tp.ids
    return ids + ans, [-100] * len(ids) + ans


def task_by_name(name: str):
    if name == "probe_passkey":
        return PasskeyTask("repeat")
    if name == "probe_passkey_prose":
        t = PasskeyTask("prose")
        t.name = "probe_passkey_prose"
        return t
    from scbench.registry import TASKS

    return TASKS.get(name)


# The training mixtures: (task, weight). mf (global information) is in the mixture as the issue asks;
# nobody expects a 135M model to compute medians, so it gets a small share.
MIXTURE_V1 = (
    ("scbench_kv", 0.22),
    ("scbench_prefix_suffix", 0.22),
    ("scbench_vt", 0.22),
    ("probe_passkey", 0.12),
    ("probe_passkey_prose", 0.10),
    ("scbench_mf", 0.06),
    ("scbench_kv_short", 0.06),  # kv at 200-1,500 tokens: the CI / default-benchmark regime
)
# v2 (the continuation run): passkey was already solved by v1, so its share goes to the multi-hop vt and the long
# string copies, and 8% of the rows are the base model's own chat answers (chat_distill.json), so that the adapter
# keeps the base model's chat behaviour.
MIXTURE_V2 = (
    ("scbench_kv", 0.24),
    ("scbench_prefix_suffix", 0.24),
    ("scbench_vt", 0.28),
    ("probe_passkey", 0.03),
    ("probe_passkey_prose", 0.03),
    ("scbench_mf", 0.02),
    ("scbench_kv_short", 0.04),
    ("chat_distill", 0.08),
)
MIXTURES = {"v1": MIXTURE_V1, "v2": MIXTURE_V2}


def plan_item(k: int, mixture: str = "v1") -> dict:
    """What training row k is: task, mode, context length, turns (deterministic in k and the mixture)."""
    seed = TRAIN_SEED_BASE + k
    r = random.Random(f"plan:{seed}")
    mix = MIXTURES[mixture]
    names = [n for n, _ in mix]
    name = r.choices(names, weights=[w for _, w in mix])[0]
    mode = "multi_turn" if r.random() < (0.6 if mixture == "v1" else 0.7) else "multi_request"
    if name == "scbench_kv_short":
        name, length = "scbench_kv", r.randint(200, 1500)
    elif mode == "multi_turn":
        length = int(r.triangular(300, 7300, 7300))
    else:
        length = int(r.triangular(300, 6200, 6200))
    if mixture == "v1":
        turns = r.choice([1, 2, 3, 4, 5, 5]) if name != "scbench_mf" else r.choice([1, 2, 3])
    else:  # the evaluation asks 5 turns: more late turns, more answer tokens per sequence
        turns = r.choice([2, 3, 4, 5, 5, 5]) if name != "scbench_mf" else r.choice([1, 2, 3])
    return {"k": k, "seed": seed, "task": name, "mode": mode, "length": length, "turns": turns,
            "request": r.randrange(turns)}


# --- chat self-distillation rows ----------------------------------------------------------------------
def _repetitive(text: str, n: int = 4, limit: int = 2) -> bool:
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return any(grams.count(g) > limit for g in set(grams))


def chat_rows(path=None) -> list[dict]:
    """The base model's greedy chat answers (make_chat_distill.py), minus degenerate ones: answers that loop (a
    4-word sequence more than twice) are dropped, so the adapter is not taught the base model's loops."""
    import json
    from pathlib import Path

    path = Path(path) if path else Path(__file__).with_name("chat_distill.json")
    rows = json.loads(path.read_text())["rows"]
    return [r for r in rows if r["answer"] and not _repetitive(r["answer"])]


@functools.lru_cache(maxsize=1)
def _default_chat_rows() -> tuple[dict, ...]:
    return tuple(chat_rows())


def chat_sequence(fmt: TokFormatter, seed: int):
    """(ids, labels): one chat question of chat_rows() (picked by the row's seed) and the base model's answer."""
    row = random.Random(f"chat:{seed}").choice(_default_chat_rows())
    prompt = fmt.encode(fmt.render_chat([{"role": "user", "content": row["question"]}], add_generation_prompt=True),
                        add_special_tokens=True)
    ans = fmt.encode(row["answer"] + END, add_special_tokens=False)
    return prompt + ans, [-100] * len(prompt) + ans


def build_item(fmt: TokFormatter, item: dict):
    if item["task"] == "chat_distill":
        return chat_sequence(fmt, item["seed"])
    task = task_by_name(item["task"])
    count = lambda t: len(fmt.encode(t, add_special_tokens=False))  # noqa: E731
    rng = random.Random(f"{task.name}:{item['seed']}:0")
    row = task.generate_row(rng, 0, item["length"], item["turns"], count)
    ex = to_example(row, f"train:{task.name}:seed={item['seed']}")
    if item["mode"] == "multi_turn":
        return multi_turn_sequence(fmt, task, ex)
    return multi_request_sequence(fmt, task, ex, item["request"])

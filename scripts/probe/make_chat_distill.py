"""Chat answers of the BASE model (no adapter) for the probe adapter's training mixture: self-distillation, so the
adapter learns retrieval without forgetting how the base model answers ordinary questions.

    python scripts/probe/make_chat_distill.py --out scripts/probe/chat_distill.json

Greedy answers of SmolLM2-135M-Instruct (the embedded GGUF, float32, CPU) to PROMPTS through scbench's own engine
and chat template (the same path eval_probe.chat uses). The three chat questions of the evaluation
(eval_probe.CHAT) are held out: asserted absent from PROMPTS.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

PROMPTS = (
    "What is the capital of Italy?",
    "What is the largest planet in our solar system?",
    "Who wrote the play Romeo and Juliet?",
    "How many days are there in a leap year?",
    "What is photosynthesis? Explain briefly.",
    "Why is the sky blue?",
    "What is the boiling point of water at sea level?",
    "Name three primary colors.",
    "What does a computer's CPU do?",
    "Explain what a noun is, with an example.",
    "What is the difference between weather and climate?",
    "Give me two tips for getting better sleep.",
    "How do I make a cup of tea?",
    "Suggest a name for a pet cat.",
    "What are the benefits of regular exercise?",
    "Write a short poem about the ocean.",
    "Write a haiku about autumn leaves.",
    "Tell me a fun fact about octopuses.",
    "Translate 'good morning' into Spanish.",
    "What is 12 multiplied by 8?",
    "If I have 5 apples and eat 2, how many are left?",
    "What is the square root of 81?",
    "Write a Python function that adds two numbers.",
    "Write a Python function that checks whether a number is even.",
    "What is a list in Python?",
    "Explain what a for loop does in programming.",
    "How do I reverse a string in Python?",
    "What is HTML used for?",
    "Summarize the story of Cinderella in two sentences.",
    "What should I pack for a weekend camping trip?",
    "How can I save money on groceries?",
    "What is the main function of the heart?",
    "Why do leaves change color in the fall?",
    "What is the capital of Japan?",
    "Who painted the Mona Lisa?",
    "What is the chemical symbol for gold?",
    "Describe a cat in one sentence.",
    "Give me a synonym for 'happy'.",
    "What is the opposite of 'cold'?",
    "How many continents are there? Name them.",
    "What is gravity?",
    "Write a friendly email inviting a colleague to lunch.",
    "What are three good habits for studying?",
    "Explain what the internet is to a child.",
    "What is the tallest mountain in the world?",
    "How do bees make honey?",
    "What is a healthy breakfast?",
    "Recommend a book for someone who likes adventure stories.",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).with_name("chat_distill.json")))
    ap.add_argument("--max-new", type=int, default=160)
    args = ap.parse_args()
    from eval_probe import CHAT, chat  # a sibling: the script's folder is on sys.path when it runs

    held_out = {q.strip().lower() for q in CHAT}
    assert not held_out & {p.strip().lower() for p in PROMPTS}, "an evaluation chat question is in the training prompts"
    assert len(set(PROMPTS)) == len(PROMPTS), "duplicate prompt"
    from scbench.engines.hf import HFEngine

    engine = HFEngine("embedded:smollm2", name="smollm2-135m", device="cpu", dtype="float32")
    rows, t0 = [], time.time()
    for q in PROMPTS:
        a = chat(engine, q, args.max_new).strip()
        rows.append({"question": q, "answer": a})
        print(f"Q: {q}\nA: {a}\n", flush=True)
    meta = {"model": "SmolLM2-135M-Instruct (embedded GGUF, float32, no adapter)", "decoding": "greedy",
            "max_new_tokens": args.max_new, "script": "scripts/probe/make_chat_distill.py",
            "held_out": list(CHAT), "seconds": round(time.time() - t0, 1)}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(rows)} answers to {args.out}")


if __name__ == "__main__":
    main()

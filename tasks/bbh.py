"""Exactly computable BIG-Bench-Hard-style items for the many-shot in-context-learning task.

Two task families whose answers follow from the question alone, written in the BBH format
(``Q: ...\\nOptions:\\n(A) ...\\nA: (C)``): tracking shuffled objects with seven objects (a chain of
pairwise swaps) and date understanding (date arithmetic with ``datetime``). Everything is drawn from
a seeded RNG.
"""
from __future__ import annotations

import random
from datetime import date, timedelta

PLAYERS = ("Alice", "Bob", "Claire", "Dave", "Eve", "Fred", "Gertrude")
SCENARIOS = (
    ("playing a game. At the start of the game, they are each holding a ball", "has a {x} ball",
     "As the game progresses, pairs of players trade balls.", "swap balls", "At the end of the game, {p} has the",
     "{x} ball", "red orange yellow green blue purple pink white black brown".split()),
    ("dancers at a square dance. At the start of a song, they each have a partner", "is dancing with {x}",
     "Throughout the song, the dancers often trade partners.", "switch partners",
     "At the end of the dance, {p} is dancing with", "{x}",
     "Rodrigo Sam Patrick Lola Izzi Jamie Melissa Ophelia Karl Helga Ximena".split()),
    ("friends and avid readers who occasionally trade books. At the start of the semester, they each buy one new "
     "book", "gets {x}", "As the semester proceeds, they start trading around the new books.", "swap books",
     "At the end of the semester, {p} has", "{x}",
     ["Frankenstein", "Moby Dick", "Ulysses", "The Odyssey", "Catch-22", "Lolita", "Hound of the Baskervilles",
      "The Pearl", "The Fellowship of the Ring", "The Great Gatsby"]),
)
TASK_DESCRIPTIONS = {
    "tracking_shuffled_objects_seven_objects": "tracking the final positions of seven objects after a sequence of swaps",
    "date_understanding": "inferring dates from short descriptions",
}


def _options(items: list[str]) -> str:
    return "Options:\n" + "\n".join(f"({chr(65 + i)}) {x}" for i, x in enumerate(items))


def tracking_item(rng: random.Random) -> tuple[str, str]:
    """(question text with options, answer letter in parentheses)."""
    setup, has, intro, verb, ask, option, pool = rng.choice(SCENARIOS)
    things = rng.sample(pool, len(PLAYERS))
    holding = dict(zip(PLAYERS, things))
    lines = [f"{', '.join(PLAYERS[:-1])}, and {PLAYERS[-1]} are {setup}: "
             + ", ".join(f"{p} {has.format(x=x)}" for p, x in holding.items()) + ".", "", intro]
    swaps = []
    for k in range(len(PLAYERS)):
        a, b = rng.sample(PLAYERS, 2)
        holding[a], holding[b] = holding[b], holding[a]
        lead = "First" if k == 0 else ("Finally" if k == len(PLAYERS) - 1 else "Then")
        swaps.append(f"{lead}, {a} and {b} {verb}.")
    who = rng.choice(PLAYERS)
    lines[-1] += " " + " ".join(swaps) + " " + ask.format(p=who)
    text = "\n".join(lines) + "\n" + _options([option.format(x=x) for x in things])
    return text, f"({chr(65 + things.index(holding[who]))})"


def _fmt(d: date) -> str:
    return d.strftime("%m/%d/%Y")


def _shift_years(d: date, years: int) -> date | None:
    try:
        return d.replace(year=d.year + years)
    except ValueError:
        return None


def date_item(rng: random.Random) -> tuple[str, str]:
    today = date(1950, 1, 1) + timedelta(days=rng.randrange(365 * 80))
    kind = rng.randrange(5)
    if kind == 0:
        n = rng.choice([2, 3, 5, 10, 12, 15, 20, 30])
        stem, answer = f"Today is {_fmt(today)}. What is the date {n} days ago in MM/DD/YYYY?", today - timedelta(n)
    elif kind == 1:
        stem, answer = f"Today is {_fmt(today)}. What is the date one week from today in MM/DD/YYYY?", today + timedelta(7)
    elif kind == 2:
        stem, answer = f"Yesterday was {_fmt(today - timedelta(1))}. What is the date tomorrow in MM/DD/YYYY?", today + timedelta(1)
    elif kind == 3:
        answer = _shift_years(today, -1) or today - timedelta(365)
        stem = f"Tomorrow is {_fmt(today + timedelta(1))}. What is the date one year ago from today in MM/DD/YYYY?"
    else:
        stem = (f"The meeting was planned for {_fmt(today - timedelta(1))}, but it was moved by one day to today. "
                "What is the date 24 hours later in MM/DD/YYYY?")
        answer = today + timedelta(1)
    wrong = [answer + timedelta(d) for d in (-1, 1, -7, 7, 30, -30)]
    wrong += [x for x in (_shift_years(answer, 1), _shift_years(answer, -1)) if x]
    if answer.day <= 12 and answer.day != answer.month:
        wrong.append(date(answer.year, answer.day, answer.month))
    picks = rng.sample(sorted({_fmt(w) for w in wrong} - {_fmt(answer)}), 5) + [_fmt(answer)]
    rng.shuffle(picks)
    return f"{stem}\n{_options(picks)}", f"({chr(65 + picks.index(_fmt(answer)))})"


ITEMS = {"tracking_shuffled_objects_seven_objects": tracking_item, "date_understanding": date_item}

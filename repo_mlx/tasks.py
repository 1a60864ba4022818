"""Synthetic long- and noisy-context tasks in the spirit of RULER (arXiv 2404.06654).

Every sample is made from a seed with nothing to download: the haystack is
filler prose drawn from small word lists, and each prompt is sized in tokens
with the model's own tokenizer. Tasks:

- ``niah_single``: one "special magic number" hidden in the haystack; recall it.
- ``niah_multikey``: four such needles under different keys; recall the asked one.
- ``kv_retrieval``: a JSON object of random UUID pairs; recall the value of one key.
- ``variable_tracking``: chains of ``VAR X = VAR Y`` hidden in the haystack, one
  chain as a distractor; list every variable that holds the asked value.
"""

import bisect
import random
import re
import uuid
from dataclasses import dataclass
from typing import Callable, List

TASKS = ("niah_single", "niah_multikey", "kv_retrieval", "variable_tracking")

# Filler: no digits and no all-capital words, so no needle can be guessed from it.
_SUBJECTS = (
    "The old miller", "A quiet river", "The northern wind", "Every lantern in town",
    "The patient gardener", "A young sailor", "The library clock", "Her grandmother",
    "The village baker", "A grey heron", "The mountain road", "Our neighbour",
    "The travelling painter", "A small fox", "The school choir", "The ferryman",
    "An autumn storm", "The market square", "A tired shepherd", "The lighthouse keeper",
)
_VERBS = (
    "watched", "remembered", "carried", "followed", "painted", "described",
    "ignored", "welcomed", "measured", "collected", "admired", "avoided",
    "repaired", "praised", "questioned", "gathered", "crossed", "sketched",
)
_OBJECTS = (
    "the morning light", "a basket of apples", "the long road home", "the empty harbour",
    "a bundle of letters", "the silver bells", "the narrow bridge", "a field of barley",
    "the broken fence", "a pair of boots", "the evening tide", "the chapel roof",
    "a cloud of swallows", "the copper kettle", "the winding stairs", "a box of maps",
)
_TAILS = (
    "before the rain came", "without saying a word", "near the stone wall",
    "as the bells rang", "long after sunset", "on a cold morning", "with great care",
    "while the children slept", "at the edge of the forest", "for the third time",
    "under a pale sky", "in the old manner", "despite the wind", "after the fair",
)
_ADJECTIVES = (
    "amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy",
    "jolly", "keen", "lucky", "mellow", "noble", "odd", "proud", "quiet", "rapid",
    "sober", "tidy", "vivid", "witty", "young", "zesty",
)
_NOUNS = (
    "anchor", "badger", "candle", "dragon", "ember", "falcon", "garden", "harbor",
    "island", "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pepper",
    "quarry", "river", "saddle", "tunnel", "violin", "walnut", "yarrow", "zephyr",
)


@dataclass
class Sample:
    task: str
    length: int  # token budget: the prompt has at most this many tokens
    prompt: str
    answers: List[str]  # every one should appear in the model's answer
    depth: float  # where the (first) answer needle sits: 0 = start, 1 = end
    max_tokens: int  # generation budget for the answer
    prompt_tokens: int  # the prompt's actual size


def filler_sentence(rng: random.Random) -> str:
    return f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."


def _insert(items: List[str], needles: List[str], depths: List[float]) -> List[str]:
    """``items`` with each needle placed at its relative depth (0 = first, 1 = last)."""
    out = list(items)
    # Deepest first, so earlier indices stay valid and a chain keeps its order.
    for needle, d in sorted(zip(needles, depths), key=lambda t: t[1], reverse=True):
        out.insert(round(d * len(items)), needle)
    return out


def _fit(tokenizer, length: int, render: Callable[[List[str]], str], item: Callable[[], str]) -> str:
    """``render(filler)`` with as much filler as fits in ``length`` tokens."""

    def size(items):
        return len(tokenizer.encode(render(items)))

    items: List[str] = []
    n = size(items)
    if n > length:
        raise ValueError(f"a context of {length} tokens is too short for this task ({n} needed)")
    while n < length:  # estimate from per-item counts, then check the whole prompt
        need = length - n
        while need > 0:
            items.append(item())
            need -= len(tokenizer.encode(" " + items[-1]))
        n = size(items)
    # The largest prefix that fits: the first that does not, less one.
    fits = bisect.bisect_right(range(len(items) + 1), length, key=lambda k: size(items[:k])) - 1
    return render(items[:fits])


def _niah(rng, tokenizer, length, num_needles):
    keys = [f"{a}-{b}" for a, b in rng.sample([(a, b) for a in _ADJECTIVES for b in _NOUNS], num_needles)]
    values = [str(v) for v in rng.sample(range(1_000_000, 10_000_000), num_needles)]
    depths = [rng.random() for _ in keys]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values)]
    key = keys[0]  # the asked needle; the others are distractors

    def render(filler):
        haystack = " ".join(_insert(filler, needles, depths))
        return (
            "Some special magic numbers are hidden in the text below. Memorize them; "
            "you will be asked about one of them afterwards.\n\n"
            f"{haystack}\n\n"
            f"Question: What is the special magic number for {key} mentioned in the text above?\n"
            f"Answer: The special magic number for {key} mentioned in the text above is"
        )

    return _fit(tokenizer, length, render, lambda: filler_sentence(rng)), [values[0]], depths[0]


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128)))


def _kv_retrieval(rng, tokenizer, length):
    key, value, depth = _uuid(rng), _uuid(rng), rng.random()
    needle = f'"{key}": "{value}"'

    def render(filler):
        pairs = ",\n".join("    " + p for p in _insert(filler, [needle], [depth]))
        return (
            "Extract the value of the requested key from the JSON object below.\n\n"
            f"JSON data:\n{{\n{pairs}\n}}\n\n"
            f'Question: What is the value of key "{key}" in the JSON object above?\n'
            f'Answer: The value of key "{key}" is'
        )

    return _fit(tokenizer, length, render, lambda: f'"{_uuid(rng)}": "{_uuid(rng)}"'), [value], depth


def _variable_tracking(rng, tokenizer, length, chains=2, hops=4):
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    names, statements, depths = [], [], []
    for value in rng.sample(range(10_000, 100_000), chains):
        chain = []
        while len(chain) < hops + 1:
            name = "".join(rng.choice(letters) for _ in range(5))
            if name not in names and name not in chain:
                chain.append(name)
        names += chain
        statements += [f"VAR {chain[0]} = {value}."]
        statements += [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])]
        # Keep each chain in order through the haystack.
        depths += sorted(rng.random() for _ in chain)
        if len(names) == hops + 1:
            asked, answers, depth = value, list(chain), depths[0]

    def render(filler):
        haystack = " ".join(_insert(filler, statements, depths))
        return (
            "Memorize the variable assignments hidden in the text below; you will be "
            "asked which variables end up holding a given value. For example, after "
            '"VAR QA = 7. VAR QB = VAR QA." both QA and QB hold the value 7.\n\n'
            f"{haystack}\n\n"
            f"Question: Which variables hold the value {asked} in the text above?\n"
            f"Answer: Following the chain of assignments, the variables that hold the value {asked} are:"
        )

    return _fit(tokenizer, length, render, lambda: filler_sentence(rng)), answers, depth


def make_sample(task: str, tokenizer, length: int, seed: int, index: int = 0) -> Sample:
    """Sample ``index`` of ``task`` at ``length`` tokens; the same for the same seed."""
    # A string seed is hashed with SHA-512: stable across runs and platforms.
    rng = random.Random(f"{seed}:{task}:{length}:{index}")
    makers = {"niah_single": lambda: _niah(rng, tokenizer, length, 1),
              "niah_multikey": lambda: _niah(rng, tokenizer, length, 4),
              "kv_retrieval": lambda: _kv_retrieval(rng, tokenizer, length),
              "variable_tracking": lambda: _variable_tracking(rng, tokenizer, length)}
    if task not in makers:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    prompt, answers, depth = makers[task]()
    budget = len(tokenizer.encode(" " + ", ".join(answers))) + 8
    return Sample(task, length, prompt, answers, depth, budget, len(tokenizer.encode(prompt)))


def make_samples(task: str, tokenizer, length: int, n: int, seed: int = 0) -> List[Sample]:
    return [make_sample(task, tokenizer, length, seed, i) for i in range(n)]


def first_line(text: str) -> str:
    """The answer part of a generation: its first non-blank line."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def score(prediction: str, answers: List[str]) -> float:
    """Share of ``answers`` found in ``prediction`` as whole words, ignoring case: RULER's
    "string match all", 0 or 1 for single-answer tasks, partial credit for variable tracking."""
    found = [re.search(rf"(?<![A-Za-z0-9]){re.escape(a)}(?![A-Za-z0-9])", prediction, re.IGNORECASE) for a in answers]
    return sum(f is not None for f in found) / len(answers)

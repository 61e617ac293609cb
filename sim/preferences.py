"""Hidden preferences of simulated users: plain functions `(prompt, answer) -> float`, higher is
better. The rest of the system never sees them; it only sees the votes they cast.

A new one is a few lines anywhere importable, named on the command line as `module:function`.
A preference may carry `correct(prompt, answer) -> str | None`, the answer a user would write
instead (a corrected answer, the system's demonstrations); without one its users never correct.

Changing tastes: `Switching` prefers one thing until a given round, then another; the simulation
tells it the round (`at(round)`). Named as `before>after@round` (e.g. `brevity>detail@4`: shorter
answers for rounds 1-3, longer from round 4), or the built-in `shorter_then_longer`.
"""
import importlib
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable

Preference = Callable[[str, str], float]


def brevity(prompt: str, answer: str) -> float:
    """Shorter is better; an empty answer is no answer. In (0, 1]: 1 / (1 + characters / 20)."""
    return 1.0 / (1.0 + len(answer.strip()) / 20) if answer.strip() else 0.0


def _first_sentence(prompt: str, answer: str) -> str | None:
    first = re.split(r"(?<=[.!?])\s", answer.strip(), maxsplit=1)[0]
    return first if first and first != answer.strip() else None


brevity.correct = _first_sentence


def detail(prompt: str, answer: str) -> float:
    """Longer is better, up to about two sentences: characters / 120, at most 1."""
    return min(len(answer.strip()), 120) / 120


POLITE = ("please", "thank", "welcome", "glad", "happy to help", "sorry", "kind")


def politeness(prompt: str, answer: str) -> float:
    """Polite words count: please, thank you, you are welcome, glad, sorry, kind …"""
    text = answer.lower()
    return float(sum(text.count(word) for word in POLITE))


politeness.correct = lambda prompt, answer: f"{answer.strip()} Thank you for asking!" if answer.strip() else None


_NUMBER = r"(-?\d+)"
_ARITHMETIC = [  # (pattern over the lower-cased prompt, operation)
    (rf"{_NUMBER}\s*(?:plus|\+)\s*{_NUMBER}", lambda a, b: a + b),
    (rf"add {_NUMBER} (?:and|to) {_NUMBER}", lambda a, b: a + b),
    (rf"sum of {_NUMBER} and {_NUMBER}", lambda a, b: a + b),
    (rf"{_NUMBER}\s*(?:minus|-)\s*{_NUMBER}", lambda a, b: a - b),
    (rf"subtract {_NUMBER} from {_NUMBER}", lambda a, b: b - a),
    (rf"difference between {_NUMBER} and {_NUMBER}", lambda a, b: a - b),
    (rf"{_NUMBER}\s*(?:times|x|\*)\s*{_NUMBER}", lambda a, b: a * b),
    (rf"multiply {_NUMBER} (?:by|and) {_NUMBER}", lambda a, b: a * b),
    (rf"product of {_NUMBER} and {_NUMBER}", lambda a, b: a * b),
]


def arithmetic_result(prompt: str) -> int | None:
    """The number an arithmetic prompt ("What is 7 plus 5?", "Subtract 6 from 10.") asks for."""
    for pattern, op in _ARITHMETIC:
        if m := re.search(pattern, prompt.lower()):
            return op(int(m.group(1)), int(m.group(2)))
    return None


def correct_arithmetic(prompt: str, answer: str) -> float:
    """1 when an arithmetic prompt's answer ends on the right number, 0 when on a wrong one (or
    none); 0 for every answer to other prompts, which this user does not care about."""
    expected = arithmetic_result(prompt)
    if expected is None:
        return 0.0
    numbers = re.findall(r"-?\d+", answer)
    return 1.0 if numbers and int(numbers[-1]) == expected else 0.0


def _arithmetic_correction(prompt: str, answer: str) -> str | None:
    expected = arithmetic_result(prompt)
    return f"The answer is {expected}." if expected is not None and not correct_arithmetic(prompt, answer) else None


correct_arithmetic.correct = _arithmetic_correction


TOPIC = ("cat", "cats", "dog", "dogs", "bird", "birds", "fish", "cow", "horse", "mouse", "animal", "animals")


def animals(prompt: str, answer: str) -> float:
    """Mentions an animal (the topic word): the number of animal words, capped at 2."""
    words = re.findall(r"[a-z]+", answer.lower())
    return float(min(2, sum(w in TOPIC for w in words)))


animals.correct = lambda prompt, answer: f"{answer.strip()} My cat likes that too." if answer.strip() else None


OFFERS = ("explain more", "another example", "ask me anything else", "another question")


def offers_more(prompt: str, answer: str) -> float:
    """Sparse signal: 1 when the answer offers more (to explain more, another example …), else
    0. The first policy does so in about one answer in twenty, so most answers tie: few pairs,
    mostly from the few answers that show it."""
    return float(any(o in answer.lower() for o in OFFERS))


offers_more.correct = lambda prompt, answer: (f"{answer.strip()} I can explain more if you want."
                                              if answer.strip() and not offers_more(prompt, answer) else None)


@dataclass
class Switching:
    """A taste that changes: `before` until round `switch_round`, `after` from it on."""
    before: Preference
    after: Preference
    switch_round: int
    round: int = 0

    def at(self, round: int) -> None:
        self.round = round

    @property
    def current(self) -> Preference:
        return self.after if self.round >= self.switch_round else self.before

    def __call__(self, prompt: str, answer: str) -> float:
        return self.current(prompt, answer)

    def correct(self, prompt: str, answer: str) -> str | None:
        fix = getattr(self.current, "correct", None)
        return fix(prompt, answer) if fix else None


SWITCHING = {"shorter_then_longer": "brevity>detail@4"}
"""built-in switching preferences: shorter answers for three rounds, then longer ones"""

BUILTIN: dict[str, Preference] = {f.__name__: f for f in (brevity, detail, politeness, correct_arithmetic, animals,
                                                          offers_more)}


def resolve(name: str) -> Preference:
    """A built-in preference by name, `before>after@round` (a `Switching` one; each side any
    name this takes), or `module:function` importable from the working directory. A switching
    one is made anew each time: it keeps the round it is at."""
    name = SWITCHING.get(name, name)
    if m := re.fullmatch(r"(.+)>(.+)@(\d+)", name):
        return Switching(resolve(m.group(1)), resolve(m.group(2)), int(m.group(3)))
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise ValueError(f"unknown preference {name!r}: built-in ones are {', '.join([*BUILTIN, *SWITCHING])}, "
                         "before>after@round, or name your own as module:function")
    module, _, attr = name.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the console script does not add it
        sys.path.insert(0, os.getcwd())
    fn = getattr(importlib.import_module(module), attr, None)
    if not callable(fn):
        raise ValueError(f"{name!r} is not a function")
    return fn

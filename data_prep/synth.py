"""Seeded generator of GSM-style multi-step word problems in the GSM8k-Aug line format.

    python -m data_prep synth --out data/synth --train 20000 --valid 500 --test 500 --seed 0

Each problem is a chain of binary steps ``<<a op b=r>>``: a step's left operand is the previous
result, every result is an integer in ``[2, max_result]`` (no zero, negatives or fractions), and
the answer is the last result. The sentences follow the steps, one number each, drawn from
several phrasings per operation, so a tiny model must read the text rather than a fixed template.
Splits never share a question: test is drawn first, then valid, then train, each skipping
questions already used. The defaults are a setting the tiny LLaMA learns on a CPU in minutes (CoT well above
No-CoT; measured in the README's sweep).
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass

NAMES = [("Ann", "she"), ("Ben", "he"), ("Cora", "she"), ("Dev", "he"), ("Eli", "he"), ("Fay", "she"),
         ("Gus", "he"), ("Hana", "she"), ("Ivan", "he"), ("Jade", "she"), ("Kai", "he"), ("Lena", "she"),
         ("Max", "he"), ("Nora", "she"), ("Omar", "he"), ("Pia", "she")]
ITEMS = ["apples", "pens", "cards", "books", "eggs", "coins", "shells", "stamps", "marbles", "cookies",
         "stickers", "beads"]
# First sentence: two numbers. Later sentences: one number, applied to the running total.
FIRST = {
    "+": ["{N} has {a} {x} and gets {b} more.", "{N} picks {a} {x} and then picks {b} more.",
          "{N} starts with {a} {x} and finds {b} more."],
    "-": ["{N} has {a} {x} and loses {b}.", "{N} has {a} {x} and gives {b} to a friend.",
          "{N} bakes {a} {x} and eats {b} of them."],
    "*": ["{N} buys {a} boxes of {b} {x}.", "{N} has {a} bags with {b} {x} in each bag.",
          "{N} fills {a} rows with {b} {x} each."],
    "/": ["{N} shares {a} {x} equally among {b} friends and keeps one share.",
          "{N} has {a} {x} and packs them into {b} equal bags, keeping one bag."],
}
LATER = {
    "+": ["Then {p} buys {d} more.", "Then {p} finds {d} more.", "After that {p} gets {d} more as a gift."],
    "-": ["Then {p} gives away {d}.", "Then {p} loses {d}.", "After that {p} sells {d} of them."],
    "*": ["Then {p} gets {d} times as many.", "Then the number of {x} becomes {d} times bigger."],
    "/": ["Then {p} splits them into {d} equal groups and keeps one.",
          "Then {p} keeps only one of {d} equal parts."],
}
QUESTIONS = ["How many {x} does {N} have now?", "How many {x} are left in the end?",
             "How many {x} does {N} end up with?"]
WEIGHTS = {"+": 1.0, "-": 1.0, "*": 1.0, "/": 0.5}


@dataclass(frozen=True)
class SynthConfig:
    """Knobs of the generator; the defaults: an "easy" setting a tiny model learns in minutes."""
    min_steps: int = 2
    max_steps: int = 4
    max_operand: int = 9     # a_max: addends and quotients
    max_factor: int = 5      # m_max: factors and divisors
    max_result: int = 99     # r_max: every intermediate result stays in [2, max_result]

    def __post_init__(self):
        if not 1 <= self.min_steps <= self.max_steps:
            raise ValueError(f"need 1 <= --min-steps <= --max-steps, got {self.min_steps}, {self.max_steps}")
        if self.max_operand < 3 or self.max_factor < 2 or self.max_result < 4:
            raise ValueError("--max-operand >= 3, --max-factor >= 2 and --max-result >= 4 are required")


def _first_step(rng: random.Random, op: str, cfg: SynthConfig) -> tuple[int, int] | None:
    if op == "*":
        a, b = rng.randint(2, cfg.max_factor), rng.randint(2, cfg.max_operand)
    elif op == "/":
        b, q = rng.randint(2, cfg.max_factor), rng.randint(2, cfg.max_operand)
        a = b * q
    elif op == "+":
        a, b = rng.randint(1, cfg.max_operand), rng.randint(1, cfg.max_operand)
    else:
        a = rng.randint(3, cfg.max_operand)
        b = rng.randint(1, a - 2)
    result = _apply(op, a, b)
    return (a, b) if 2 <= result <= cfg.max_result and a <= cfg.max_result else None


def _next_operand(rng: random.Random, op: str, r: int, cfg: SynthConfig) -> int | None:
    if op == "+":
        d = rng.randint(1, cfg.max_operand)
    elif op == "-":
        if r - 2 < 1:
            return None
        d = rng.randint(1, min(cfg.max_operand, r - 2))
    elif op == "*":
        d = rng.randint(2, cfg.max_factor)
    else:
        divisors = [d for d in range(2, cfg.max_factor + 1) if r % d == 0 and r // d >= 2]
        if not divisors:
            return None
        d = rng.choice(divisors)
    return d if 2 <= _apply(op, r, d) <= cfg.max_result else None


def _apply(op: str, a: int, b: int) -> int:
    return {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]


def _draw_op(rng: random.Random) -> str:
    return rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]


def generate_problem(rng: random.Random, cfg: SynthConfig) -> str:
    """One problem as a GSM8k-Aug line: ``question||<<..>> <<..>> #### answer``."""
    while True:
        line = _try_problem(rng, cfg, rng.randint(cfg.min_steps, cfg.max_steps))
        if line:
            return line


def _try_problem(rng: random.Random, cfg: SynthConfig, n_steps: int) -> str | None:
    name, pronoun = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    fields = {"N": name, "p": pronoun, "x": item}
    for _ in range(50):
        op = _draw_op(rng)
        operands = _first_step(rng, op, cfg)
        if operands:
            break
    else:
        return None
    a, b = operands
    value = _apply(op, a, b)
    sentences = [rng.choice(FIRST[op]).format(a=a, b=b, **fields)]
    steps = [f"<<{a}{op}{b}={value}>>"]
    for _ in range(n_steps - 1):
        for _ in range(50):
            op = _draw_op(rng)
            d = _next_operand(rng, op, value, cfg)
            if d is not None:
                break
        else:
            return None
        new_value = _apply(op, value, d)
        sentences.append(rng.choice(LATER[op]).format(d=d, **fields))
        steps.append(f"<<{value}{op}{d}={new_value}>>")
        value = new_value
    sentences.append(rng.choice(QUESTIONS).format(**fields))
    return f"{' '.join(sentences)}||{' '.join(steps)} #### {value}"


def generate_splits(sizes: dict[str, int], seed: int, cfg: SynthConfig) -> dict[str, list[str]]:
    """Disjoint splits (no question in two splits, none twice in one). Test first, so a bigger
    train set never changes the test set."""
    used: set[str] = set()
    splits: dict[str, list[str]] = {}
    for split in ["test", "valid", "train"]:
        rng = random.Random(f"{seed}/{split}")
        lines: list[str] = []
        misses = 0  # consecutive repeats: the knobs allow no more distinct problems
        while len(lines) < sizes[split]:
            if misses > 5000:
                raise ValueError(f"only {len(lines)} distinct {split} problems exist for these knobs; "
                                 "raise --max-operand/--max-result or --max-steps")
            line = generate_problem(rng, cfg)
            question = line.split("||", 1)[0]
            if question in used:
                misses += 1
                continue
            misses = 0
            used.add(question)
            lines.append(line)
        splits[split] = lines
    return splits


def write_splits(out_dir: str, splits: dict[str, list[str]]) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for split, lines in splits.items():
        path = os.path.join(out_dir, f"{split}.txt")
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write("".join(f"{line}\n" for line in lines))
        os.replace(tmp, path)
        paths[split] = path
    return paths

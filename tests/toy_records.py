"""Shard-shaped records with exact ids, and the layout tokens (special ids and step brackets) they
are laid out with. The ids mimic a byte-level BPE (LLaMA-3's, GPT-2's): each step's own ids are
``<< ... >>`` then the separator (85), while in the joined CoT (CODI's teacher text) the space
before every later step merges into its opening bracket (`` <<``, 82) and no separator is left."""
SPECIAL = {"bos": 1, "eos": 2, "pad": 0, "start_latent": 90, "latent": 91, "end_latent": 92, "bot": 93, "eot": 94,
           "step_open": 80, "step_close": 81, "step_open_spaced": 82}
SEPARATOR = 85


def step(*inner: int) -> list[int]:
    """One step's own ids: ``<<`` inner ``>>`` separator."""
    return [SPECIAL["step_open"], *inner, SPECIAL["step_close"], SEPARATOR]


def joined(steps: list[list[int]]) -> list[int]:
    """The steps joined by the separator and tokenised as one string (the merged `` <<``)."""
    return [t for i, s in enumerate(steps) for t in [SPECIAL["step_open_spaced"] if i else s[0], *s[1:-1]]]


# three problems of 4, 1 and 2 steps; question lengths 4, 2, 6 (rows need left padding to align)
RECORDS = [
    {"question_ids": [1, 10, 11, 12], "step_ids": [step(20, 21), step(30), step(40, 41), step(50)],
     "answer_ids": [60, 61, 62]},
    {"question_ids": [1, 13], "step_ids": [step(22)], "answer_ids": [60, 61, 63]},
    {"question_ids": [1, 14, 15, 16, 17, 18], "step_ids": [step(23, 24, 25), step(31)], "answer_ids": [60, 61, 64]},
]
for _r in RECORDS:
    _r["teacher_cot_ids"] = joined(_r["step_ids"][:-1])
    _r["cot_ids"] = joined(_r["step_ids"])

"""Shard-shaped records with exact ids, and the special-token ids they are laid out with."""
SPECIAL = {"bos": 1, "eos": 2, "pad": 0, "start_latent": 90, "latent": 91, "end_latent": 92, "bot": 93, "eot": 94}
# three problems of 4, 1 and 2 steps; question lengths 4, 2, 6 (rows need left padding to align)
RECORDS = [
    {"question_ids": [1, 10, 11, 12], "step_ids": [[20, 21], [30], [40, 41], [50]], "answer_ids": [60, 61, 62]},
    {"question_ids": [1, 13], "step_ids": [[22]], "answer_ids": [60, 61, 63]},
    {"question_ids": [1, 14, 15, 16, 17, 18], "step_ids": [[23, 24, 25], [31]], "answer_ids": [60, 61, 64]},
]
for _r in RECORDS:      # a tokenizer that merges nothing across steps: the joined CoT is the pieces'
    _r["teacher_cot_ids"] = [t for s in _r["step_ids"][:-1] for t in s]
    _r["cot_ids"] = [t for s in _r["step_ids"] for t in s]

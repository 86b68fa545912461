"""Human-readable views of a shard directory: ``inspect`` and ``verify``.

    python -m data_prep inspect data/shards
    python -m data_prep verify data/shards
"""
from __future__ import annotations

import os

from .loader import load_shards
from .manifest import ShardError, read_manifest, shard_problems


def _bar(count: int, total: int, width: int = 30) -> str:
    return "#" * max(1, round(width * count / total)) if count else ""


def inspect_shards(path: str, examples: int = 2) -> str:
    shards = load_shards(path, verify=False)
    m = shards.manifest
    c = m["counts"]
    out = [f"{path}: {c['read']} read, {c['accepted']} accepted, {c['rejected']} rejected, {c['flagged']} flagged",
           f"tokenizer {m['tokenizer']['fingerprint'][:12]} ({m['tokenizer']['size']} tokens), "
           f"special ids {m['special_tokens']}"]
    for title, key in (("rejected", "rejected_by_reason"), ("flagged", "flagged_by_reason")):
        for reason, count in m[key].items():
            out.append(f"  {title:8s} {count:6d}  {reason}")
    for split, info in m["splits"].items():
        out.append(f"\n[{split}] {info['rows']} records in {len(info['shards'])} shard(s)")
        for title, key in (("steps", "step_counts"), ("tokens", "token_lengths")):
            out.append(f"  {title} per record:")
            for value, count in sorted(info[key].items(), key=lambda kv: int(kv[0])):
                out.append(f"    {value:>5s} {count:6d} {_bar(count, info['rows'])}")
        table = shards.split(split)
        for row in table.select(range(min(examples, len(table)))):
            ids = row["question_ids"] + [t for s in row["step_ids"] for t in s] + row["answer_ids"]
            out.append(f"  {row['id']} ({row['source']}) flags={row['flags']}")
            out.append("    " + shards.tokenizer.decode(ids).replace("\n", "\n    "))
    return "\n".join(out)


def verify_shards(path: str) -> list[str]:
    """Problems found (empty when every shard and the tokenizer match the manifest)."""
    try:
        manifest = read_manifest(path)
    except ShardError as err:
        return [str(err)]
    problems = shard_problems(path, manifest)
    if not os.path.isdir(os.path.join(path, manifest["tokenizer"]["dir"])):
        problems.append(f"{path}: tokenizer directory missing")
    elif not problems:
        try:
            load_shards(path, verify=False)
        except ShardError as err:
            problems.append(str(err))
    return problems

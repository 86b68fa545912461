"""data_prep command line: ``python -m data_prep {synth,tokenizer,build,inspect,verify} --help``."""
from __future__ import annotations

import argparse
import os
import sys

from common.cli import run_cli

EXAMPLES = """examples:
  python -m data_prep synth --out data/synth --train 20000 --valid 500 --test 500 --seed 0
  python -m data_prep tokenizer --corpus data/synth/train.txt --vocab-size 512 --out data/tok
  python -m data_prep build --source gsm8k-aug:data/synth/train.txt --source gsm8k-aug:data/synth/valid.txt \\
      --source gsm8k-aug:data/synth/test.txt --tokenizer data/tok --out data/shards
  python -m data_prep inspect data/shards
  python -m data_prep verify data/shards
"""
SOURCE_HELP = """a source as KIND:PATH[@SPLIT] (repeatable). KIND: gsm8k (GSM8K jsonl; calculator
annotations become steps), gsm8k-aug (question||<<..>> <<..>> #### answer), gsm8k-aug-nl (jsonl of
{question, cot, answer} with natural-language steps, split on ". "), coconut (JSON list of
{question, steps, answer}), gsm-hard, svamp, multiarith (answer-only evaluation sets), or
hub:DATASET_ID[:SPLIT]. SPLIT is train, valid or test; by default it comes from the file name
(answer-only sets default to test)."""


def count(text: str) -> int:
    """A non-negative integer argument (problems per split)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; give 0 or more")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write synthetic GSM-style problems (train/valid/test.txt)")
    p.add_argument("--out", required=True, help="output directory")
    for split, default in (("train", 20000), ("valid", 500), ("test", 500)):
        p.add_argument(f"--{split}", type=count, default=default, help=f"{split} problems (default {default})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-steps", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--max-operand", type=int, default=9, help="largest addend/quotient (default 9)")
    p.add_argument("--max-factor", type=int, default=5, help="largest factor/divisor (default 5)")
    p.add_argument("--max-result", type=int, default=99, help="largest intermediate result (default 99)")

    p = sub.add_parser("tokenizer", help="train a SentencePiece tokenizer or extend a HF one")
    p.add_argument("--corpus", action="append", default=[], help="text file to train on (repeatable)")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--from-pretrained", help="an existing HF tokenizer (directory or hub id) to extend")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom tokenizer code (off by default)")
    p.add_argument("--out", required=True, help="output tokenizer directory")

    p = sub.add_parser("build", help="sources -> tokenized, step-annotated shards + manifest")
    p.add_argument("--source", action="append", required=True, help=SOURCE_HELP)
    p.add_argument("--tokenizer", required=True, help="tokenizer directory (latent tokens are added if missing)")
    p.add_argument("--out", required=True, help="output shard directory (written atomically)")
    p.add_argument("--shards", type=int, default=1, help="shards per split (default 1)")
    p.add_argument("--strict", action="store_true", help="stop at the first malformed record")
    p.add_argument("--max-length", type=int, default=1024, help="reject train/valid records longer than this (tokens); "
                   "test records are never cut")
    p.add_argument("--question-suffix", default="\n", help=r"text after the question (default '\n')")
    p.add_argument("--step-separator", default="\n", help=r"text after each step (default '\n'; CODI: ' ')")
    p.add_argument("--answer-prefix", default="### ", help="text before the answer ('### ' Coconut, "
                   "'The answer is: ' CODI)")
    p.add_argument("--normalise-question", action="store_true", help="strip each question and replace double "
                   "spaces by one, on every split (CODI's evaluation does it; recorded in the templates)")
    p.add_argument("--digit-answers-only", action="store_true", help="reject train problems whose answer does "
                   "not start with a digit (CODI's training filter: negative answers; counted in the manifest)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--batch-size", type=int, default=4096, help="records read, parsed, tokenised and written at "
                   "a time (default 4096): memory holds a few batches whatever the size of the sources")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes that parse and "
                   "tokenise (default: this machine's cores; 1: this process); started at a source's second batch")

    p = sub.add_parser("inspect", help="counts, histograms and decoded examples of a shard directory")
    p.add_argument("dir")
    p.add_argument("--examples", type=int, default=2, help="decoded examples per split")

    p = sub.add_parser("verify", help="re-check every shard's sha256 and the tokenizer (exit 1 on mismatch)")
    p.add_argument("dir")
    return parser


def _unescape(text: str) -> str:
    return text.encode("utf-8").decode("unicode_escape") if "\\" in text else text


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        from .synth import SynthConfig, generate_splits, write_splits
        try:
            cfg = SynthConfig(args.min_steps, args.max_steps, args.max_operand, args.max_factor, args.max_result)
            splits = generate_splits({"train": args.train, "valid": args.valid, "test": args.test}, args.seed, cfg)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        for split, path in write_splits(args.out, splits).items():
            print(f"wrote {path}: {len(splits[split])} problems")
    elif args.command == "tokenizer":
        from .tokenizer import build_tokenizer, special_token_ids
        if not args.corpus and not args.from_pretrained:
            print("error: give --corpus FILE (train SentencePiece) or --from-pretrained DIR", file=sys.stderr)
            return 2
        tok = build_tokenizer(args.corpus, args.vocab_size, args.from_pretrained, args.out, args.trust_remote_code)
        print(f"wrote {args.out}: {len(tok)} tokens, special ids {special_token_ids(tok)}")
    elif args.command == "build":
        from .build import BuildOptions, main_build
        from .templates import Templates
        templates = Templates(_unescape(args.question_suffix), _unescape(args.step_separator),
                              _unescape(args.answer_prefix), args.normalise_question)
        return main_build(BuildOptions(args.source, args.tokenizer, args.out, args.shards, args.strict,
                                       args.max_length, templates, args.overwrite, args.digit_answers_only,
                                       args.batch_size, args.workers))
    elif args.command == "inspect":
        from .summary import inspect_shards
        print(inspect_shards(args.dir, args.examples))
    elif args.command == "verify":
        from .manifest import read_manifest
        from .summary import verify_shards
        read_manifest(args.dir)             # no shard directory there: a mistake (exit 2), not a mismatch
        problems = verify_shards(args.dir)
        for problem in problems:
            print(f"MISMATCH {problem}", file=sys.stderr)
        if problems:
            return 1
        print(f"{args.dir}: every shard and the tokenizer match the manifest")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tokenizers for the shards: train a SentencePiece BPE, or extend an existing HF tokenizer.

    python -m data_prep tokenizer --corpus data/synth/train.txt --vocab-size 512 --out data/tok
    python -m data_prep tokenizer --from-pretrained meta-llama/Llama-3.2-1B-Instruct --out data/tok

Either way the latent special tokens (and a pad token if the tokenizer has none) are added, and
the result is saved as an ordinary Hugging Face tokenizer directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable

from common.cli import UserError

LATENT_TOKENS = {"start_latent": "<|start-latent|>", "latent": "<|latent|>", "end_latent": "<|end-latent|>",
                 "bot": "<bot>", "eot": "<eot>"}
PAD_TOKEN = "<|pad|>"
# Always atomic pieces: the step brackets, the answer marker and the line break that separates
# steps. With these never merged, tokenising Q, each step and the answer apart gives the same ids
# as tokenising the whole CoT text (Coconut's assertion holds).
ATOMIC_PIECES = ["<<", ">>", "###", "\n"]


def corpus_texts(paths: Iterable[str]) -> list[str]:
    """Training text from GSM8k-Aug-style files, laid out as the shards will tokenise it."""
    texts = []
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                line = line.rstrip("\n")
                if "||" in line:
                    question, _, rest = line.partition("||")
                    chain, _, answer = rest.partition("####")
                    line = "\n".join([question, *chain.split(), f"### {answer.strip()}"])
                if line.strip():
                    texts.append(line)
    if not texts:
        raise UserError(f"--corpus {', '.join(paths)}: no text found; give a file with the training text")
    return texts


def train_sentencepiece(texts: list[str], vocab_size: int, work_dir: str):
    """A byte-fallback SentencePiece BPE (one token per digit), wrapped as a fast HF tokenizer."""
    import sentencepiece as spm
    from tokenizers import decoders, pre_tokenizers, processors
    from transformers import LlamaTokenizer, PreTrainedTokenizerFast

    if vocab_size < 300:
        raise UserError("--vocab-size must be at least 300 (256 byte-fallback pieces are reserved)")
    prefix = os.path.join(work_dir, "spm")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, byte_fallback=True, split_digits=True,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, user_defined_symbols=ATOMIC_PIECES,
            # identity + no dummy prefix: text round-trips byte for byte, newlines included.
            normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
            hard_vocab_limit=False, num_threads=2, minloglevel=2)
    except RuntimeError as err:
        raise UserError(_vocab_size_advice(vocab_size, str(err))) from None
    model_dir = os.path.join(work_dir, "spm_hf")
    os.makedirs(model_dir)
    shutil.copy(f"{prefix}.model", os.path.join(model_dir, "tokenizer.model"))
    backend = LlamaTokenizer.from_pretrained(model_dir).backend_tokenizer
    # transformers' converter prepends "▁" to the first word; our model has no dummy prefix.
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 2)])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def _vocab_size_advice(vocab_size: int, spm_error: str) -> str:
    needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", spm_error)
    if needed:
        return (f"--vocab-size {vocab_size} is below the {needed.group(1)} pieces this corpus needs (every distinct "
                f"character plus the special pieces); use --vocab-size {needed.group(1)} or more")
    return f"--vocab-size {vocab_size}: SentencePiece refused it for this corpus ({' '.join(spm_error.split())})"


def load_pretrained(name_or_dir: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if not os.path.isdir(name_or_dir) and (os.path.isabs(name_or_dir) or name_or_dir.startswith(".")):
        raise UserError(f"{name_or_dir}: no such tokenizer directory")
    try:
        tok = AutoTokenizer.from_pretrained(name_or_dir, trust_remote_code=trust_remote_code)
    except OSError as err:          # no such directory, and not a hub id this machine can reach
        raise UserError(f"{name_or_dir}: not a tokenizer directory (and no hub tokenizer of that name here): "
                        f"{' '.join(str(err).split())[:200]}") from None
    if not tok.is_fast:
        raise ValueError(f"{name_or_dir}: a fast (tokenizers-backed) tokenizer is required")
    return tok


def add_latent_tokens(tok) -> dict[str, int]:
    """Add the latent markers (and a pad token if missing); return every special id by name."""
    missing = [t for t in LATENT_TOKENS.values() if t not in tok.get_vocab()]
    extra = {"additional_special_tokens": missing} if missing else {}
    if tok.pad_token is None:
        extra["pad_token"] = PAD_TOKEN
    if extra:
        tok.add_special_tokens(extra, replace_extra_special_tokens=False)
    return special_token_ids(tok)


def special_token_ids(tok) -> dict[str, int]:
    vocab = tok.get_vocab()
    missing = [t for t in LATENT_TOKENS.values() if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks {missing}; run `python -m data_prep tokenizer --from-pretrained DIR`")
    if tok.eos_token_id is None:
        raise ValueError("tokenizer has no eos token")
    ids = {name: vocab[text] for name, text in LATENT_TOKENS.items()}
    ids.update(bos=tok.bos_token_id, eos=tok.eos_token_id, pad=tok.pad_token_id)
    return ids


# The CoT's step brackets, as the CODI reference finds its steps in token ids: a step opens at "<<"
# (or " <<", the byte-level BPEs' merge of the space before it) and closes at ">>".
STEP_MARKERS = {"step_open": "<<", "step_open_spaced": " <<", "step_close": ">>"}


def step_marker_ids(tok) -> dict[str, int]:
    """The ids of the step brackets that are one token in ``tok`` (a bracket split into several
    tokens is left out: the reference's token-level rule cannot see it)."""
    ids = {name: tok(text, add_special_tokens=False)["input_ids"] for name, text in STEP_MARKERS.items()}
    return {name: found[0] for name, found in ids.items() if len(found) == 1}


def original_vocab_size(tok) -> int:
    """The vocabulary before ``add_latent_tokens`` (a pretrained model's own, unresized): the ids
    below the run of our added tokens at the end of ``tok``."""
    ours = set(LATENT_TOKENS.values()) | {PAD_TOKEN}
    size = len(tok)
    while size > 0 and tok.convert_ids_to_tokens(size - 1) in ours:
        size -= 1
    return size


def fingerprint(tok) -> str:
    """sha256 of the full tokenizer definition (model, normalisers, added tokens) and special ids."""
    definition = json.loads(tok.backend_tokenizer.to_str())
    payload = json.dumps({"tokenizer": definition, "special": special_token_ids(tok)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def save_tokenizer(tok, out_dir: str) -> None:
    """Write atomically: a crash never leaves a half-written tokenizer directory."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    tok.save_pretrained(tmp)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def build_tokenizer(corpus: list[str], vocab_size: int, from_pretrained: str | None, out_dir: str,
                    trust_remote_code: bool = False):
    if from_pretrained:
        tok = load_pretrained(from_pretrained, trust_remote_code)
    else:
        with tempfile.TemporaryDirectory() as work:
            tok = train_sentencepiece(corpus_texts(corpus), vocab_size, work)
    add_latent_tokens(tok)
    save_tokenizer(tok, out_dir)
    return tok

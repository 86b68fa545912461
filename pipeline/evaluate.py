"""Stage 3b: benchmark a merged model on GSM8K-style sets and decode its latents.

    python -m pipeline.evaluate --model runs/NAME/merged --set gsm8k=data/gsm8k-test \\
        --set gsm-hard=data/gsm-hard --split test [--batch-size 64] [--max-new-tokens 64]

Each ``--set NAME=DIR`` is a shard directory from ``python -m data_prep build`` (answer-only
evaluation sets included), made with the model's tokenizer and templates (checked). The model
runs on this rank's GPU in bf16 where CUDA is, else on the CPU in fp32 (``--device``, ``--dtype``).
Writes ``eval/report.json``, ``eval/report.md`` and PNG plots next to the model
(``runs/NAME/eval``): accuracy by both published metrics, mean tokens generated
(latents + answer), latency per problem and problems/s, model and data fingerprints, and for a
few problems each latent decoded by the step decoder plus its logit-lens top-5. Run under
``torchrun`` to split the sets across ranks (no problem counted twice).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from data_prep import UserError, load_shards, run_cli
from data_prep.manifest import read_manifest
from data_prep.templates import Templates
from pipeline.inference.generate import generate_with_latents, left_pad_prompts, prefill
from pipeline.inference.report import write_report
from pipeline.inference.scoring import hash_match, number_match
from pipeline.latent.geometry import per_problem, summarise, vocab_centre
from pipeline.latent.methods import LayoutConfig, get_method
from pipeline.merge import DECODER_INPUT, LATENT_CONFIG


def eval_device(requested: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto``: this rank's GPU in bf16 where CUDA is, else the CPU in fp32 (as training runs)."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device here; use --device cpu (or auto)")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    else:
        device = torch.device("cpu")
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]


def check_set_matches_model(latent: dict, shards, path: str) -> None:
    """Shards made with another tokenizer or other templates would be read with the wrong ids."""
    theirs, ours = shards.manifest["tokenizer"]["fingerprint"], latent.get("tokenizer_fingerprint")
    if ours and theirs != ours:
        raise UserError(f"--set {path}: built with tokenizer {theirs[:12]}, but the model was trained with "
                        f"{ours[:12]}; rebuild the set with the model's tokenizer (python -m data_prep build "
                        f"--tokenizer MODEL_DIR ...)")
    if Templates.defaults_for(shards.manifest["templates"]) != Templates.defaults_for(latent["templates"]):
        raise UserError(f"--set {path}: templates {shards.manifest['templates']} differ from the model's "
                        f"{latent['templates']}; rebuild the set with the same --question-suffix/--step-separator/"
                        "--answer-prefix/--normalise-question as the training shards")


def load_merged(model_dir: str, device: torch.device | None = None, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(os.path.join(model_dir, LATENT_CONFIG)):
        raise UserError(f"--model {model_dir}: not a merged model (no {LATENT_CONFIG}); make one with "
                        "python -m pipeline.merge --run runs/NAME")
    with open(os.path.join(model_dir, LATENT_CONFIG), encoding="utf-8") as handle:
        latent = json.load(handle)
    device = device or torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    projection = None
    if latent.get("projection"):
        from safetensors.torch import load_file

        from pipeline.latent.reasoner import Projection

        shape = latent.get("projection_shape", {})       # absent: written before the options existed
        projection = Projection(model.config.hidden_size, shape.get("inner") or None,
                                layernorm=shape.get("layernorm", True))
        projection.load_state_dict(load_file(os.path.join(model_dir, latent["projection"])))
        projection.to(device, dtype).eval()
    decoder, decoder_in = load_step_decoder(os.path.join(model_dir, "step_decoder"), device, dtype)
    return model, AutoTokenizer.from_pretrained(model_dir), latent, projection, decoder, decoder_in


def load_step_decoder(decoder_dir: str, device: torch.device, dtype: torch.dtype):
    """-> (the step decoder or None, the map from the base's width into it or None: a decoder of
    another model, ``model.decoder_path``)."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(decoder_dir):
        return None, None
    decoder = AutoModelForCausalLM.from_pretrained(decoder_dir, dtype=dtype).to(device).eval()
    path = os.path.join(decoder_dir, DECODER_INPUT)
    if not os.path.isfile(path):
        return decoder, None
    from safetensors.torch import load_file

    weights = load_file(path)
    decoder_in = torch.nn.Linear(weights["weight"].shape[1], weights["weight"].shape[0])
    decoder_in.load_state_dict(weights)
    return decoder, decoder_in.to(device, dtype).eval()


def merged_layout(latent: dict) -> LayoutConfig:
    """The layout a merged model was trained with, from its latent_config.json."""
    return LayoutConfig(method=latent["method"], c_thought=latent["c_thought"], num_latent=latent["n_latents"],
                        max_latent_stage=latent.get("max_latent_stage", 3),
                        pad_latent_to_max=latent.get("pad_latent_to_max", True),
                        progressive_train=latent.get("progressive_train", False),
                        simcot=latent["simcot"], latent_update=latent.get("latent_update", "sequential"),
                        jacobi_iterations=latent.get("jacobi_iterations", 0),
                        remove_eos=latent.get("remove_eos", True),
                        reference_attention=latent.get("reference_attention", False))


def prompt_for(record: dict, latent: dict, layout: LayoutConfig | None = None) -> list[int]:
    """The question, then the latent block the model was trained with: the training layout's own
    ``prompt`` with :func:`latents_for` latents (``layout``: ``merged_layout(latent)``, built once
    by a caller that asks for many)."""
    layout = layout or merged_layout(latent)
    return layout.spec.prompt(layout, record["question_ids"], latent["special_tokens"],
                              latents_for(record, latent, layout))


def latents_for(record: dict, latent: dict, layout: LayoutConfig) -> int:
    """The model's latent count (latent_config), or the problem's own where the model was trained so
    (Coconut without ``pad_latent_to_max``: capped by its steps, as the reference evaluates). A
    problem without steps (an answer-only set) gets the model's count."""
    if layout.pad_latent_to_max or not record["step_ids"]:
        return latent["n_latents"]
    return layout.spec.prompt_latents(layout, latent["stage"], len(record["step_ids"]))


def filled_latent_id(latent: dict) -> int | None:
    """The placeholder generation fills pass by pass (None: the method runs one pass, e.g. pause)."""
    return latent["special_tokens"]["latent"] if get_method(latent["method"]).fills_latents else None


def generation_masked_classes(latent: dict) -> list[int]:
    """Tokens the model never generates: the added tokens outside its method's vocabulary (none for
    a model merged before latent_config recorded the original vocabulary)."""
    if "original_vocab_size" not in latent:
        return []
    return get_method(latent["method"]).masked_classes(latent["special_tokens"], latent["original_vocab_size"],
                                                       generating=True)


def _rank_slice(n: int) -> tuple[range, int]:
    """Contiguous, non-overlapping records per rank, and the padded count every rank iterates."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    per = -(-n // world)
    return range(rank * per, min(n, (rank + 1) * per)), per


def evaluate_set(model, tok, latent, projection, records, batch_size: int, max_new: int) -> dict:
    sp, layout, masked = latent["special_tokens"], merged_layout(latent), generation_masked_classes(latent)
    mine, per_rank = _rank_slice(len(records))
    centre, embedding_to_centre = vocab_centre(model.get_input_embeddings().weight)
    rows, start = [], time.perf_counter()
    for offset in range(0, per_rank, batch_size):
        chunk = [records[i] for i in mine[offset:offset + batch_size]]
        real = len(chunk)
        chunk = chunk or [records[0]]           # an idle rank still makes the same calls; not counted
        prompts = [prompt_for(r, latent, layout) for r in chunk]
        outputs, latents, latent_mask = generate_with_latents(
            model, prompts, filled_latent_id(latent), sp["eos"], max_new, pad_id=sp["pad"], project=projection,
            sync_ranks=True, jacobi_iterations=layout.jacobi, reference_attention=layout.reference_attention,
            masked_classes=masked)
        geometry = per_problem(latents, centre, latent_mask) if latents is not None else None
        for i, (record, new) in enumerate(list(zip(chunk, outputs))[:real]):
            text = tok.decode(new, skip_special_tokens=True)
            rows.append({"id": record["id"], "gold": record["answer"], "output": text, "tokens": len(new),
                         "latents": latents_for(record, latent, layout),
                         "hash": hash_match(text, record["answer"]), "number": number_match(text, record["answer"])})
            if geometry is not None:
                rows[-1]["inter_latent_l2"], rows[-1]["to_vocab_centre_l2"] = (float(d[i]) for d in geometry)
    elapsed = time.perf_counter() - start
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (rows, elapsed))
        rows = [r for part, _ in gathered for r in part]
        elapsed = max(t for _, t in gathered)
    n = len(rows)
    return {"n": n, "accuracy_hash": sum(r["hash"] for r in rows) / max(1, n),
            "accuracy_number": sum(r["number"] for r in rows) / max(1, n),
            "mean_tokens": sum(r["latents"] + r["tokens"] for r in rows) / max(1, n),
            "seconds": elapsed, "problems_per_s": n / elapsed, "latency_s": elapsed / max(1, n),
            "latent_geometry": summarise(rows, embedding_to_centre), "examples": rows[:5]}


@torch.no_grad()
def decode_latents(model, tok, decoder, latent, projection, records, n_problems: int = 3, max_len: int = 24,
                   decoder_in=None) -> list:
    """Each latent (Coconut: each group of c) decoded greedily by the step decoder (through
    ``decoder_in`` when it is narrower than the base), and the logit-lens top-5 tokens of each
    latent through the base LM head."""
    sp, layout = latent["special_tokens"], merged_layout(latent)
    if latent["n_latents"] == 0 or not layout.spec.fills_latents or n_problems <= 0:
        return []
    prompts = [prompt_for(r, latent, layout) for r in records[:n_problems]]
    ids, mask = left_pad_prompts(prompts, sp["pad"])
    device = model.get_input_embeddings().weight.device
    _, _, latents, latent_mask = prefill(model, ids.to(device), mask.to(device), sp["latent"], projection,
                                         layout.jacobi, layout.reference_attention)
    per_row = list(latents) if latent_mask is None else [v[m] for v, m in zip(latents, latent_mask)]
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    c = layout.slot_width()
    groups = [len(v) // c for v in per_row]
    steps = [None] * sum(groups)
    if decoder is not None and sum(groups):     # every group of every problem at once: [groups, c, d]
        prefixes = torch.cat([v[:g * c].reshape(g, c, v.size(-1)) for v, g in zip(per_row, groups)])
        into = decoder_in or (lambda x: x)
        steps = _greedy_steps(decoder, lambda ids: into(embed(ids)), into(prefixes), sp["eos"], max_len, tok,
                              layout.spec.decoder_first_position)
    out, cursor = [], 0
    for row, record in enumerate(records[:n_problems]):
        lens = [tok.convert_ids_to_tokens(head(v).topk(5).indices.tolist()) for v in per_row[row]]
        out.append({"id": record["id"], "question": record["question"], "gold_steps": record["steps"],
                    "decoded_steps": steps[cursor:cursor + groups[row]], "logit_lens_top5": lens,
                    "latents": per_row[row].float().tolist()})
        cursor += groups[row]
    return out


def _greedy_steps(decoder, embed, prefixes: torch.Tensor, eos: int, max_len: int, tok, first_position: int = 0
                  ) -> list[str]:
    """Greedy decoding from latent embeddings, all prefixes as one batch (equal lengths: no padding)
    on the KV cache, positions counted from ``first_position`` as in training; each row ends before
    its EOS. One problem and group at a time without the cache spent minutes of a 3-problem report
    re-reading prefixes through a 135M decoder."""
    from transformers import DynamicCache

    inputs, cache = prefixes, DynamicCache()
    done = torch.zeros(len(prefixes), dtype=torch.bool, device=prefixes.device)
    tokens = []
    for _ in range(max_len):
        start = first_position + cache.get_seq_length()
        positions = torch.arange(start, start + inputs.size(1), device=inputs.device).expand(len(inputs), -1)
        logits = decoder(inputs_embeds=inputs, cache=cache, use_cache=True, position_ids=positions).logits
        token = logits[:, -1].argmax(-1)
        done |= token == eos
        if done.all():
            break
        tokens.append(torch.where(done, eos, token))
        inputs = embed(token[:, None])
    rows = torch.stack(tokens, 1).tolist() if tokens else [[] for _ in prefixes]
    return [tok.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True) for row in rows]


def _fingerprint(model_dir: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors") or name == LATENT_CONFIG:
            with open(os.path.join(model_dir, name), "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


def eval_sets(specs: list[str]) -> list[tuple[str, str]]:
    """``--set NAME=DIR`` arguments -> (name, shard dir), checked before the model is loaded."""
    sets = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--set {spec!r}: expected NAME=DIR, e.g. --set gsm8k=data/gsm8k-test")
        read_manifest(path)
        sets.append((name, path))
    return sets


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="merged model directory (python -m pipeline.merge)")
    parser.add_argument("--set", action="append", required=True, metavar="NAME=DIR", help="a shard directory")
    parser.add_argument("--split", default="test", help="split to evaluate (default test; select on valid)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, default=0, help="first N problems per set (0: all)")
    parser.add_argument("--decode-latents", type=int, default=3, help="problems whose latents are decoded")
    parser.add_argument("--out", help="report directory (default: MODEL/../eval)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: this rank's GPU where CUDA is, else the CPU")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 on a GPU, fp32 on the CPU (as training runs)")
    args = parser.parse_args(argv)
    if "RANK" in os.environ:
        from pipeline.engine.distributed import init_distributed
        init_distributed()
    sets = eval_sets(args.set)
    model, tok, latent, projection, decoder, decoder_in = load_merged(args.model, *eval_device(args.device, args.dtype))
    report = {"model": os.path.abspath(args.model), "model_fingerprint": _fingerprint(args.model),
              "latent_config": {k: v for k, v in latent.items() if k != "special_tokens"}, "split": args.split,
              "sets": {}, "latents": []}
    for name, path in sets:
        shards = load_shards(path)
        check_set_matches_model(latent, shards, path)
        records = shards.split(args.split).to_list()[:args.limit or None]
        result = evaluate_set(model, tok, latent, projection, records, args.batch_size, args.max_new_tokens)
        result["data_fingerprint"] = shards.manifest["tokenizer"]["fingerprint"]
        result["data"] = {"path": os.path.abspath(path), "shards": [s["sha256"] for s in
                                                                     shards.manifest["splits"][args.split]["shards"]]}
        report["sets"][name] = result
        print(f"{name}: accuracy {100 * result['accuracy_hash']:.1f}% (after '#') / "
              f"{100 * result['accuracy_number']:.1f}% (last number) on {result['n']} problems, "
              f"{result['problems_per_s']:.1f} problems/s", flush=True)
        if not report["latents"]:
            report["latents"] = decode_latents(model, tok, decoder, latent, projection, records, args.decode_latents,
                                               decoder_in=decoder_in)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.model)), "eval")
    if not dist.is_initialized() or dist.get_rank() == 0:
        write_report(report, out)
        print(f"report: {out}/report.md, {out}/report.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

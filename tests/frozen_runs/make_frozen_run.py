"""Write a frozen run: a tiny run's directory, made by today's code, that every later version must
resume, merge, evaluate and start from (tests/distributed/test_frozen_runs.py).

    python -m tests.frozen_runs.make_frozen_run tests/frozen_runs/NAME

``NAME/shards/``: 64 synthetic problems tokenized with a SentencePiece tokenizer trained on them;
``NAME/run/``: CODI + SIM-CoT (the projection, a narrower step decoder) on a 2-layer LLaMA of width
16, trained 4 steps on one rank under ZeRO-3, its last checkpoint (step 4) and ``merged/``. A few
hundred KB. Commit a new one beside the others when a run file's format changes; never edit one.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from tests.conftest import REPO

TRAIN = ["--config", "configs/tiny-cpu.yaml", "name=run", "method.name=codi", "method.simcot=true",
         "method.num_latent=2", "model.tiny.hidden_size=16", "model.tiny.num_heads=2", "model.tiny.num_kv_heads=2",
         "model.tiny.intermediate_size=32", "model.decoder_path=tiny", "model.decoder_tiny.hidden_size=8",
         "model.decoder_tiny.num_layers=1", "model.decoder_tiny.num_heads=2", "model.decoder_tiny.num_kv_heads=2",
         "model.decoder_tiny.intermediate_size=16", "train.micro_batch_size=8", "train.max_steps=4",
         "train.validate=false", "train.warmup_steps=0"]


def torchrun(*args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]
    subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "DS_ACCELERATOR": "cpu"})


def make(out: str) -> None:
    from data_prep.build import BuildOptions, run_build
    from data_prep.synth import SynthConfig, generate_splits, write_splits
    from data_prep.tokenizer import build_tokenizer

    out = os.path.relpath(out, REPO)          # paths saved in the run as a user's would be: relative
    if os.path.exists(REPO / out):
        raise SystemExit(f"{out} exists: a frozen run is never rewritten; choose a new name")
    with tempfile.TemporaryDirectory() as work:
        paths = write_splits(work, generate_splits({"train": 64, "valid": 16, "test": 0}, 0, SynthConfig()))
        build_tokenizer([paths["train"]], 340, None, os.path.join(work, "tokenizer"))
        run_build(BuildOptions([f"gsm8k-aug:{paths['train']}", f"gsm8k-aug:{paths['valid']}"],
                               os.path.join(work, "tokenizer"), str(REPO / out / "shards")), log=print)
    torchrun("-m", "pipeline.train", *TRAIN, f"data={out}/shards", f"runs_dir={out}")
    subprocess.run([sys.executable, "-m", "pipeline.merge", "--run", os.path.join(out, "run")], cwd=REPO, check=True)
    shutil.rmtree(REPO / out / "run" / "tb")       # TensorBoard events: not a run file anything reads back


if __name__ == "__main__":
    make(sys.argv[1])

"""Helper for test_merge_eval: train a few steps under torchrun, then save the engine's logits on
fixed ids (rank 0) so the merged model can be compared with the live training engine."""
import os
import sys

import torch

from pipeline.engine.config import load_config
from pipeline.engine.distributed import teardown
from pipeline.engine.gather_policy import step_gather
from pipeline.engine.trainer import Trainer

if __name__ == "__main__":
    out, args = sys.argv[1], sys.argv[2:]
    trainer = Trainer(load_config(args[1], args[2:]))      # args: --config X overrides...
    trainer.fit()
    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 45], [2, 50, 51, 52, 53, 54, 55]])
    trainer.engine.eval()
    with torch.no_grad(), step_gather(trainer.engine, trainer.gather_policy):
        logits = trainer.engine.module.base(input_ids=ids).logits
    if trainer.rank == 0:
        torch.save({"ids": ids, "logits": logits}, out)
    teardown()
    # As pipeline.train ends: without interpreter finalizers, whose destruction of DeepSpeed's C++
    # objects in no set order aborted a finished rank ("terminate called without an active
    # exception", exit -6: seen once in CI for this helper).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

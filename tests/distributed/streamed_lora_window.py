"""Helper for test_gather_policy: the ``streamed`` window with LoRA (a frozen base, as the 8B and
70B recipes train) and per-layer gradient checkpointing, under ZeRO-3 on the ranks torchrun starts.
Rank 0 saves the most parameter elements gathered at once in a second step (the first records
DeepSpeed's trace), with the sizes the window is judged by.

    torchrun --nproc_per_node 2 -m tests.distributed.streamed_lora_window OUT.pt
"""
import sys

import torch

from benchmarks.fixtures import SPECIAL, bench_model
from benchmarks.overhead import HIDDEN, VOCAB, batches
from benchmarks.zero import LiveParams
from pipeline.engine.distributed import init_distributed, teardown
from pipeline.engine.gather_policy import STREAMED, apply_gather_policy
from pipeline.latent.methods import MethodConfig
from pipeline.latent.reasoner import LatentReasoner

LAYERS = 6
CFG = MethodConfig("codi", num_latent=4, simcot=True)


def engine_with_lora():
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from pipeline.engine.build_model import apply_lora
    from pipeline.engine.config import LoraSettings, load_config
    from pipeline.engine.ds_config import resolve_ds_config, streamed_zero_settings

    layer = sum(p.numel() for p in bench_model(VOCAB, 1, HIDDEN).model.layers[0].parameters())
    ds = resolve_ds_config("ds_configs/zero3.json", load_config(None, ["train.micro_batch_size=4"]),
                           torch.distributed.get_world_size(), HIDDEN, on_cuda=False, bf16=False)
    ds["zero_optimization"].update(streamed_zero_settings(layer, VOCAB * HIDDEN))
    keep_alive = HfDeepSpeedConfig(ds)  # noqa: F841  (zero.Init while the models are built)
    base = apply_lora(bench_model(VOCAB, LAYERS, HIDDEN), LoraSettings(enabled=True, r=8, alpha=16))
    model = LatentReasoner(base, CFG, eos_id=SPECIAL["eos"], step_decoder=bench_model(VOCAB, 2, HIDDEN),
                           gradient_checkpointing=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=ds)
    apply_gather_policy(engine, STREAMED)
    return engine, model


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)
    init_distributed()
    engine, model = engine_with_lora()
    batch = batches(CFG, 0, n=1)[0]
    engine.backward(engine(batch)["total"])
    engine.step()
    base_params = list(model.base.parameters())
    with LiveParams(base_params) as live:
        engine.backward(engine(batch)["total"])
    engine.step()
    layer = model.base.get_decoder().layers[0]
    sizes = {"layer": sum(p.ds_numel for p in layer.parameters()), "embedding": VOCAB * HIDDEN,
             "base": sum(p.ds_numel for p in base_params),
             "frozen": sum(p.ds_numel for p in base_params if not p.requires_grad)}
    if torch.distributed.get_rank() == 0:
        torch.save({"peak": live.peak, "sizes": sizes}, out)
    teardown()

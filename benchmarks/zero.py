"""Benchmarks P3 and P5 under real ZeRO-3 on CPU ranks (``python -m benchmarks zero``).

P3: parameter all-gather bytes per step of the latent step (Coconut, K latents) divided by those
    of a plain forward+backward of the same model on the same tokens (counted by wrapping
    DeepSpeed's comm backend: the full output bytes of every all-gather), steady state
    (steps >= 2) for K = 0, 2, 6, 10, 16, and the mean over the steps after a stage change; under
    each gather policy, with the peak of parameters gathered at once (``streamed`` bounds it, at
    the price of gathering each layer again in every pass).
P5: per-rank model-state bytes (partitioned params, gradient partitions, fp32 master partitions,
    Adam states, read from DeepSpeed's own tensors) with 2 ranks vs 1, and step time.
Each measurement runs as ``torchrun`` workers of this module; the parent prints the table.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

LAYER, LARGEST = 4 * 256 * 256 + 3 * 256 * 1024 + 2 * 256, 1000 * 256   # the P3 model: one layer, the embedding
SPECIAL = {"bos": 1, "eos": 2, "pad": 0, "start_latent": 3, "latent": 4, "end_latent": 5, "bot": 6, "eot": 7}


class GatherCounter:
    """Counts the output bytes of every all-gather DeepSpeed issues."""

    def __init__(self):
        import deepspeed.comm.comm as comm

        self.bytes = 0
        backend = comm.cdb
        for name in ("all_gather_into_tensor", "all_gather_coalesced", "all_gather"):
            original = getattr(backend, name)
            setattr(backend, name, self._wrap(original, name))

    def _wrap(self, original, name):
        def counted(*args, **kwargs):
            out = args[0] if args else next(kwargs[k] for k in ("output_tensor", "output_tensors", "tensor_list")
                                            if k in kwargs)
            tensors = out if isinstance(out, (list, tuple)) else [out]
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            return original(*args, **kwargs)
        return counted


class LiveParams:
    """The most parameter elements gathered at once on this rank, sampled after every fetch of
    DeepSpeed's coordinator while the context is open (``with LiveParams(params) as live: ...``)."""

    def __init__(self, params: list):
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self.peak, self.params, self.released = 0, params, ZeroParamStatus.NOT_AVAILABLE

    def __enter__(self) -> LiveParams:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as cls

        self._fetch = fetch = cls.fetch_sub_module

        def fetch_and_count(coordinator, *args, **kwargs):
            result = fetch(coordinator, *args, **kwargs)
            self.peak = max(self.peak, sum(p.ds_numel for p in self.params if p.ds_status != self.released))
            return result
        cls.fetch_sub_module = fetch_and_count
        return self

    def __exit__(self, *exc) -> None:
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as cls

        cls.fetch_sub_module = self._fetch


def model_state_bytes(engine) -> dict[str, int]:
    opt = engine.optimizer
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    params = size([p.ds_tensor for p in engine.module.parameters()])
    states = size([v for s in opt.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()])
    return {"params": params, "grads": size([opt.grad_partitions_flat_buffer]),
            "master": size(opt.fp32_partitioned_groups_flat), "optimizer": states}


def _engine(method: str, k: int, policy: str = "gathered", checkpointing: bool = False):
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    from benchmarks.fixtures import bench_model
    from pipeline.engine.config import load_config
    from pipeline.engine.ds_config import resolve_ds_config, streamed_zero_settings
    from pipeline.latent.methods import MethodConfig
    from pipeline.latent.reasoner import LatentReasoner

    run = load_config(None, ["train.micro_batch_size=4", "train.lr=1e-4"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = resolve_ds_config("ds_configs/zero3.json", run, world, 256, on_cuda=False, bf16=False)
    if policy == "streamed":              # as the trainer sets it: about two layers live
        cfg["zero_optimization"].update(streamed_zero_settings(LAYER, LARGEST))
    keep = HfDeepSpeedConfig(cfg)  # noqa: F841  (alive while the model is built: zero.Init)
    layout = MethodConfig(method, c_thought=1, max_latent_stage=max(k, 1))
    model = LatentReasoner(bench_model(1000, layers=4, hidden=256), layout, eos_id=SPECIAL["eos"],
                           gradient_checkpointing=checkpointing)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine, layout


def _batch(layout, stage: int, rank: int):
    from benchmarks.fixtures import synthetic_records
    from pipeline.latent.collate import collate_aligned
    from pipeline.latent.methods import layout as lay

    records = synthetic_records(4, 1000, seed=rank)
    return collate_aligned([lay(r, SPECIAL, layout, stage) for r in records], SPECIAL["latent"], 0)


def worker(spec: dict) -> dict:
    import torch.distributed as dist

    from pipeline.engine.distributed import init_distributed
    from pipeline.engine.gather_policy import apply_gather_policy, step_gather

    rank, _, _ = init_distributed()
    counter = GatherCounter()
    policy = spec.get("policy", "gathered")
    engine, layout = _engine(spec["method"], max(spec["stages"]), policy, spec.get("checkpointing", False))
    apply_gather_policy(engine, policy)
    params = list(engine.module.parameters())
    per_step, times = [], []
    for stage in spec["stages"]:
        batch = _batch(layout, stage, rank)
        before, start = counter.bytes, time.perf_counter()
        with step_gather(engine, policy), LiveParams(params) as live:
            engine.backward(engine(batch)["total"])
        engine.step()
        per_step.append(counter.bytes - before)
        times.append(time.perf_counter() - start)
    live_fraction = live.peak / sum(p.ds_numel for p in params) if policy != "gathered" else 1.0   # last step
    result = {"bytes": per_step, "times": times, "state": model_state_bytes(engine), "live": live_fraction}
    dist.barrier()
    dist.destroy_process_group()
    return result


def _spawn(spec: dict, nproc: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "BENCH_SPEC": json.dumps(spec), "BENCH_OUT": out}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                   "-m", "benchmarks.zero"]
        # One retry: gloo rarely aborts at process exit on a busy machine.
        if subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode:
            subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(out, encoding="utf-8") as handle:
            return json.load(handle)


def main() -> None:
    steady = lambda r: statistics.median(r["bytes"][2:])  # noqa: E731
    mib = lambda b: f"{b / 2**20:6.2f} MiB"  # noqa: E731
    print("P3 parameter all-gather bytes per step, 2 ranks, ZeRO-3 (ds_configs/zero3.json), LLaMA 4x256 vocab 1000")
    plain = _spawn({"method": "cot", "stages": [0] * 5}, 2)
    print(f"  plain forward+backward: {mib(steady(plain))} per step")
    for k in (0, 2, 6, 10, 16):
        gathered = _spawn({"method": "coconut", "stages": [k] * 5}, 2)
        streamed = _spawn({"method": "coconut", "stages": [k] * 5, "policy": "streamed"}, 2)
        print(f"  K={k:2d}: gathered {mib(steady(gathered))} = {steady(gathered) / steady(plain):.2f}x "
              f"(step 0: {gathered['bytes'][0] / steady(plain):.2f}x) | streamed {mib(steady(streamed))} = "
              f"{steady(streamed) / steady(plain):.2f}x, peak {streamed['live']:.2f} of the parameters gathered")
    for checkpointing in (False, True):
        streamed = _spawn({"method": "coconut", "stages": [6] * 5, "policy": "streamed",
                           "checkpointing": checkpointing}, 2)
        print(f"  K= 6, streamed, checkpointing {'on' if checkpointing else 'off'}: "
              f"{steady(streamed) / steady(plain):.2f}x plain, peak {streamed['live']:.2f} of the parameters gathered")
    for policy in ("gathered", "streamed"):
        change = _spawn({"method": "coconut", "stages": [2, 2, 2, 4, 4, 4, 6, 6, 6], "policy": policy}, 2)
        mean = statistics.mean(change["bytes"])
        print(f"  curriculum 2->4->6 latents (3 steps each), {policy}: mean "
              f"{mib(mean)} per step = {mean / steady(plain):.2f}x plain; "
              f"step time {statistics.median(change['times'][1:]):.2f}s")
    one, two = _spawn({"method": "coconut", "stages": [6] * 4}, 1), _spawn({"method": "coconut", "stages": [6] * 4}, 2)
    b1, b2 = sum(one["state"].values()), sum(two["state"].values())
    print(f"P5 per-rank model states (params+grads+master+Adam), ZeRO-3: 1 rank {b1 / 2**20:.2f} MiB, "
          f"2 ranks {b2 / 2**20:.2f} MiB = {b2 / b1:.2f}x; step time {statistics.median(one['times'][1:]):.2f}s "
          f"(1 rank, batch 4) vs {statistics.median(two['times'][1:]):.2f}s (2 ranks, batch 4 each)")
    print(f"    1 rank {one['state']}\n    2 ranks {two['state']}")


if __name__ == "__main__":
    if "BENCH_SPEC" in os.environ:
        result = worker(json.loads(os.environ["BENCH_SPEC"]))
        if int(os.environ.get("RANK", "0")) == 0:
            with open(os.environ["BENCH_OUT"], "w", encoding="utf-8") as handle:
                json.dump(result, handle)
    else:
        main()

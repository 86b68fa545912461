"""Per-rank memory of one training step, and the ZeRO-3 gather policy that follows from it.

    plan = make_plan(run, sizes, ds_config, Hardware(nodes=1, gpus_per_node=8, gpu_mem_gib=80))
    print(plan.render()); plan.fits, plan.policy

Model states follow DeepSpeed's own accounting (``estimate_zero3_model_states_mem_needs``, checked
within 10 % in the unit tests): ZeRO-3 partitions 2-byte bf16 parameters over every rank, fp32
gradient partitions (``data_types.grad_accum_dtype: fp32`` in our JSONs) and 12 bytes of fp32 master weights +
Adam moments per trainable parameter; offload moves optimizer states (and fp32 gradients) or
parameters to CPU memory. On top of them a step holds the gathered weights, the activations of the
latent loop, the LM-head logits at labelled positions and the communication buckets.

Gathered weights are the policy's question. ``gathered`` holds the whole model (base, projection,
step decoder) in the compute dtype from the first forward to the end of backward, and gathers it
once per micro-batch. ``streamed`` holds a window of about three layers plus the embedding and LM
head, released after each pass's backward (pipeline/engine/gather_policy.py), and gathers every
layer again in each pass: up to (K+1) x 2 base-sized gathers per micro-batch for K sequential
latents (forward and backward; a checkpointed layer's recompute reuses the backward's gather).
The plan picks ``gathered`` whenever it fits, else ``streamed``, else says the run does not fit
and what to change. Under either policy a latent method also holds the gradients of the trainable
parameters every pass uses (the base or its LoRA, the projection) at full size through backward:
autograd sums a parameter's contributions from all passes before ZeRO's reduce hook sees them
(small under LoRA, the whole base for full fine-tuning). Under ``gathered`` the plan also picks
when gradients are reduce-scattered (pipeline/engine/grad_reduce.py): once after backward, which
holds every trainable parameter's full-size gradient until then and saves DeepSpeed's per-parameter
hooks, when that fits; else bucket by bucket during backward (``overlapped``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.engine.config import RunConfig
from pipeline.engine.gather_policy import GATHERED, REPLICATED, STREAMED
from pipeline.engine.grad_reduce import AFTER_BACKWARD, OVERLAPPED
from pipeline.engine.model_shapes import ModelSizes
from pipeline.latent.loop import pass_count
from pipeline.latent.methods import SequenceShape, get_method

GIB = 2 ** 30
FRAMEWORK_RESERVE_GIB = 2.5     # CUDA context, NCCL buffers, allocator slack (a typical H100 process)
HEADROOM = 0.92                 # plan against 92 % of the device: fragmentation of the caching allocator
CE_BYTES_PER_LOGIT = 10         # bf16 logits + their fp32 upcast + the fp32 gradient of the CE


@dataclass(frozen=True)
class Hardware:
    nodes: int = 1
    gpus_per_node: int = 1
    gpu_mem_gib: float = 80.0
    cpu_mem_gib: float = 1024.0         # per node, for offload

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class MemoryPlan:
    world: int
    stage: int
    dtype_bytes: int
    global_batch: int
    states: dict[str, float]             # GiB per rank on the device: params, grads, optimizer
    cpu_gib_per_node: float
    gathered: dict[str, float]           # GiB of gathered weights per policy
    gather_volume: dict[str, float]      # GiB all-gathered per micro-batch per policy
    pass_grads_gib: float                # full-size gradients summed over a latent step's passes
    full_grads_gib: float                # every trainable parameter's full-size gradient (after_backward)
    activations: dict[str, float]        # GiB with and without checkpointing
    logits_gib: float
    buffers_gib: float
    checkpointing: bool
    budget_gib: float
    policy: str = GATHERED
    grad_reduce: str = OVERLAPPED
    device_gib: float = 0.0
    fits: bool = True
    reason: str = ""
    advice: list[str] = field(default_factory=list)

    @property
    def held_grads_gib(self) -> float:
        """Full-size gradients alive at the end of backward, before ZeRO reduces them."""
        return self.full_grads_gib if self.grad_reduce == AFTER_BACKWARD else self.pass_grads_gib

    def render(self) -> str:
        s, g, a = self.states, self.gathered, self.activations
        act_now = a["checkpointed" if self.checkpointing else "full"]
        v = self.gather_volume
        gathered = (f"whole model {g[GATHERED]:.2f} GiB ({v[GATHERED]:.1f} GiB gathered per micro-batch), streamed "
                    f"window {g[STREAMED]:.2f} GiB ({v[STREAMED]:.1f} GiB per micro-batch)" if self.stage >= 3
                    else "none (ZeRO-2 and below keep every parameter on every rank)")
        lines = [
            f"memory plan: {self.world} rank(s), ZeRO-{self.stage}, {'bf16' if self.dtype_bytes == 2 else 'fp32'}, "
            f"global batch {self.global_batch}",
            f"  {'partitioned ' if self.stage >= 3 else ''}params {s['params']:.2f} GiB | grads {s['grads']:.2f} GiB | "
            f"optimizer states {s['optimizer']:.2f} GiB | CPU per node (offload) {self.cpu_gib_per_node:.1f} GiB",
            f"  gathered weights: {gathered}",
            f"  activations of the latent loop: {a['full']:.2f} GiB without checkpointing, {a['checkpointed']:.2f} "
            f"GiB with (now {'on' if self.checkpointing else 'off'}) | logits {self.logits_gib:.2f} GiB | "
            f"buckets {self.buffers_gib:.2f} GiB | full-size gradients held {self.held_grads_gib:.2f} GiB "
            f"({self.pass_grads_gib:.2f} summed over passes)",
            f"  policy {self.policy}, gradients reduced {self.grad_reduce.replace('_', ' ')}: "
            f"{self.device_gib:.1f} GiB per device of a {self.budget_gib:.1f} GiB budget "
            f"({act_now:.2f} GiB activations) -> {'fits' if self.fits else 'DOES NOT FIT'}",
        ]
        if not self.fits:
            lines.append(f"  why: {self.reason}")
            lines += [f"  change: {item}" for item in self.advice]
        return "\n".join(lines)


def model_states(sizes: ModelSizes, stage: int, world: int, dtype_bytes: int, grad_bytes: int,
                 offload_optimizer: bool, offload_params: bool) -> tuple[dict[str, float], float]:
    """-> (GiB per rank on the device, GiB of CPU memory per rank). The optimizer keeps fp32 master
    weights (bf16 runs only) + two Adam moments (4 + 8 bytes) per trainable parameter."""
    n, t = sizes.total, sizes.trainable
    params = n * dtype_bytes / (world if stage >= 3 else 1)
    grads = t * grad_bytes / (world if stage >= 2 else 1)
    optimizer = t * (8 if dtype_bytes == 4 else 12) / world
    device = {"params": params, "grads": grads, "optimizer": optimizer}
    cpu = 0.0
    if offload_optimizer:
        cpu += device.pop("optimizer") + device.pop("grads")
        device.update(optimizer=0.0, grads=0.0)
    if offload_params:
        cpu += device["params"]
        device["params"] = 0.0
    return {k: v / GIB for k, v in device.items()}, cpu / GIB


def _pass_tokens(run: RunConfig, seq: SequenceShape) -> dict[str, int]:
    """Tokens per problem seen by each LM, for the longest stage of the method."""
    cfg, method = run.method, get_method(run.method.name)
    slots = method.decoder_slots(cfg) if cfg.simcot else 0
    merged = max(1, seq.steps - slots + 1) if slots else 0      # steps per slot, the overflow in the last
    reruns = (cfg.jacobi or 0) * method.max_latents(cfg)     # Jacobi: every latent once per iteration
    return {"base": method.base_tokens(cfg, seq) + reruns, "teacher": method.teacher_tokens(cfg, seq),
            "decoder": slots * (merged * seq.step + cfg.slot_width() + 1),
            "labelled": method.labelled_tokens(cfg, seq) + slots * (merged * seq.step + 1)}


def activation_gib(run: RunConfig, sizes: ModelSizes, seq: SequenceShape, dtype_bytes: int) -> dict[str, float]:
    """Saved tensors of one micro-batch's forward. A LLaMA block saves per token about
    8 h + 2 kv + 4 i values (norm in/out twice, q k v, attention out, o_proj out, gate, up, act,
    product; SDPA/flash keep no s x s matrix); with per-layer checkpointing only each layer's input
    (h) is kept, plus one layer's full set while it is recomputed."""
    tokens = _pass_tokens(run, seq)
    b = run.train.micro_batch_size
    per_layer = (8 * sizes.hidden + 2 * sizes.kv_dim + 4 * sizes.intermediate) * dtype_bytes
    lm_tokens = b * (tokens["base"] + tokens["teacher"] + tokens["decoder"])
    longest_pass = b * max(tokens["base"], tokens["teacher"], tokens["decoder"])
    full = lm_tokens * sizes.layers * per_layer
    checkpointed = lm_tokens * sizes.layers * sizes.hidden * dtype_bytes + longest_pass * per_layer
    return {"full": full / GIB, "checkpointed": checkpointed / GIB}


def _streamed_window(sizes: ModelSizes, dtype_bytes: int) -> float:
    """Live parameters under ``streamed``: the layer in use and what is prefetched (three layers
    cover it; tests/distributed/test_gather_policy.py holds the peak to this), the embedding and
    the LM head."""
    return (3 * sizes.layer + 2 * sizes.largest_module) * dtype_bytes / GIB


def _pass_grads(run: RunConfig, sizes: ModelSizes, dtype_bytes: int) -> float:
    """Full-size gradients a latent step holds: every pass contributes to the gradient of a
    trainable base (or LoRA, or projection) parameter, and autograd keeps their sum at full size
    until the first pass's backward (the last to run), before ZeRO's hook reduces and partitions it."""
    return sizes.loop_trainable * dtype_bytes / GIB if base_passes(run) > 1 else 0.0


def base_passes(run: RunConfig) -> int:
    """Calls of every base layer per micro-batch at the longest stage: the latent loop's passes
    and CODI's teacher pass."""
    cfg, method = run.method, get_method(run.method.name)
    latents = method.max_latents(cfg) if method.fills_latents else 0
    return pass_count(latents, cfg.jacobi) + (1 if method.needs_teacher else 0)


def _gather_volume(run: RunConfig, sizes: ModelSizes, dtype_bytes: int) -> dict[str, float]:
    """GiB all-gathered per micro-batch: ``gathered`` once; ``streamed`` at most twice per pass, in
    forward and in backward (a checkpointed layer's recompute reuses the backward's gather; the
    measured volume is benchmark P3's)."""
    streamed = (sizes.base * base_passes(run) + sizes.total - sizes.base) * 2
    return {GATHERED: sizes.total * dtype_bytes / GIB, STREAMED: streamed * dtype_bytes / GIB}


def make_plan(run: RunConfig, sizes: ModelSizes, ds_config: dict, hardware: Hardware,
              seq: SequenceShape | None = None) -> MemoryPlan:
    seq = seq or SequenceShape()
    zero = ds_config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    dtype_bytes = 2 if ds_config.get("bf16", {}).get("enabled") is True else 4
    world = hardware.world
    grad_bytes = 4 if dtype_bytes == 4 or ds_config.get("data_types", {}).get("grad_accum_dtype") == "fp32" else 2
    states, cpu = model_states(sizes, stage, world, dtype_bytes, grad_bytes, "offload_optimizer" in zero,
                               "offload_param" in zero)
    gathered = {GATHERED: sizes.total * dtype_bytes / GIB, STREAMED: _streamed_window(sizes, dtype_bytes)}
    tokens = _pass_tokens(run, seq)
    logits = run.train.micro_batch_size * tokens["labelled"] * sizes.vocab * CE_BYTES_PER_LOGIT / GIB
    buffers = (zero.get("reduce_bucket_size", 0) or 0) * 4 * 2 / GIB
    plan = MemoryPlan(world=world, stage=stage, dtype_bytes=dtype_bytes,
                      global_batch=run.train.micro_batch_size * run.train.grad_accum * world, states=states,
                      cpu_gib_per_node=cpu * hardware.gpus_per_node, gathered=gathered,
                      gather_volume=_gather_volume(run, sizes, dtype_bytes),
                      pass_grads_gib=_pass_grads(run, sizes, dtype_bytes),
                      full_grads_gib=sizes.trainable * dtype_bytes / GIB,
                      activations=activation_gib(run, sizes, seq, dtype_bytes), logits_gib=logits,
                      buffers_gib=buffers, checkpointing=run.model.gradient_checkpointing,
                      budget_gib=hardware.gpu_mem_gib * HEADROOM)
    decide(plan, run, hardware)
    return plan


def _device_total(plan: MemoryPlan) -> float:
    """GiB per device under the plan's current policy and gradient reduction."""
    weights = 0.0 if plan.policy == REPLICATED else plan.gathered[plan.policy]
    if plan.stage < 3:
        weights = 0.0                           # the parameters themselves are replicated (in "params")
    act = plan.activations["checkpointed" if plan.checkpointing else "full"]
    return (sum(plan.states.values()) + weights + plan.held_grads_gib + act + plan.logits_gib + plan.buffers_gib
            + FRAMEWORK_RESERVE_GIB)


def decide(plan: MemoryPlan, run: RunConfig, hardware: Hardware) -> None:
    """Pick the policy: gathered when it fits (one gather per micro-batch; gradients reduced after
    backward if their full size fits too), else streamed; else say why not."""
    candidates = [(REPLICATED, OVERLAPPED)] if plan.stage < 3 else [
        (GATHERED, AFTER_BACKWARD), (GATHERED, OVERLAPPED), (STREAMED, OVERLAPPED)]
    for policy, grad_reduce in candidates:
        plan.policy, plan.grad_reduce = policy, grad_reduce
        plan.device_gib = _device_total(plan)
        if plan.device_gib <= plan.budget_gib:
            break
    if plan.cpu_gib_per_node > hardware.cpu_mem_gib * HEADROOM:
        plan.fits = False
        plan.reason = (f"offloaded states need {plan.cpu_gib_per_node:.0f} GiB of CPU memory per node, "
                       f"more than {hardware.cpu_mem_gib * HEADROOM:.0f} GiB")
        plan.advice = ["more nodes (--nodes)", "nodes with more CPU memory (--cpu-mem-gib)"]
    elif plan.device_gib > plan.budget_gib:
        plan.fits = False
        plan.reason = f"{plan.device_gib:.1f} GiB per device > {plan.budget_gib:.1f} GiB budget ({plan.policy})"
        plan.advice = advice(plan, run)


def advice(plan: MemoryPlan, run: RunConfig) -> list[str]:
    """What to change, biggest saving first, each with the GiB it frees per device."""
    items = []
    a = plan.activations
    if not plan.checkpointing and a["full"] > a["checkpointed"]:
        items.append((a["full"] - a["checkpointed"], "model.gradient_checkpointing=true"))
    if run.train.micro_batch_size > 1:
        half = (a["checkpointed" if plan.checkpointing else "full"] + plan.logits_gib) / 2
        items.append((half, f"train.micro_batch_size={run.train.micro_batch_size // 2} "
                            f"(train.grad_accum={2 * run.train.grad_accum} keeps the global batch)"))
    if plan.states["optimizer"] + plan.states["grads"] > 0:
        items.append((plan.states["optimizer"] + plan.states["grads"],
                      "deepspeed=ds_configs/zero3_offload.json (optimizer states and gradients in CPU memory)"))
    states = sum(plan.states.values())
    items.append((states / 2, f"twice the GPUs (--nodes {2 * max(1, plan.world // 8)}): halves the "
                              f"{states:.1f} GiB of partitioned states"))
    if plan.pass_grads_gib > plan.budget_gib / 4:
        items.append((plan.pass_grads_gib, f"LoRA (model.lora.enabled=true): a latent step holds the base's "
                                           f"full-size gradients, {plan.pass_grads_gib:.1f} GiB, while its passes "
                                           "add to them; more GPUs do not shrink them"))
    return [f"{text} (frees ~{gib:.1f} GiB)" if gib else text for gib, text in sorted(items, key=lambda x: -x[0])]


def local_hardware(world: int, device) -> Hardware:
    """This job's hardware as the trainer sees it: the device's memory (a CPU rank gets its share
    of the machine's RAM) and the ranks per node from the launcher."""
    import os

    import torch

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory / GIB
    else:
        memory = ram / per_node
    return Hardware(nodes=max(1, world // per_node), gpus_per_node=per_node, gpu_mem_gib=memory, cpu_mem_gib=ram)

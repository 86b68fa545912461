"""The training loop: one DeepSpeed engine around ``LatentReasoner``, curriculum, exact resume.

    python -m pipeline.train --config configs/tiny-cpu.yaml      (see pipeline/train.py)
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.cli import REQUEUE_EXIT, UserError
from data_prep import load_shards
from pipeline.engine import checkpoint
from pipeline.engine.build_model import build_reasoner, count_params, new_rows_like, optimizer_groups
from pipeline.engine.config import RunConfig, for_world, save_config
from pipeline.engine.deepspeed_internals import DeepSpeedInternalError
from pipeline.engine.distributed import StopFlag, init_distributed
from pipeline.engine.ds_config import resolve_ds_config, streamed_zero_settings, zero_stage
from pipeline.engine.gather_policy import GATHERED, REPLICATED, STREAMED, apply_gather_policy, step_gather
from pipeline.engine.grad_reduce import AFTER_BACKWARD, OVERLAPPED, apply_grad_reduce
from pipeline.engine.memory_plan import local_hardware, make_plan
from pipeline.engine.model_shapes import model_sizes
from pipeline.engine.sampler import RankSharding, iter_batches, rank_indices, stage_for_epoch
from pipeline.engine.schedule import lr_factor
from pipeline.engine.telemetry import FlopModel, MetricsLog, StepMeter, body_params, format_eta, peak_flops
from pipeline.latent.attention import kernel_report
from pipeline.latent.methods import get_method, layout
from pipeline.latent.vocab import Vocab

TARGET_SAMPLE = 10_000     # train records the start-up report on decoder targets reads


class PlanError(RuntimeError):
    """The memory plan says this run does not fit its hardware."""


@dataclass
class Progress:
    """Everything besides the engine that a resume needs (saved as DeepSpeed client state)."""
    epoch: int = 0
    micro_in_epoch: int = 0
    global_step: int = 0
    best_valid: float = math.inf
    best_tag: str = ""
    stage: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _chosen_by(run: RunConfig, key: str) -> str:
    return "memory plan" if getattr(run.train, key) == "auto" else f"train.{key}"


class Trainer:
    def __init__(self, run: RunConfig):
        self.rank, self.world, self.device = init_distributed()
        self.run = run = for_world(run, self.world)
        self.on_cuda = self.device.type == "cuda"
        self.run_dir = os.path.join(run.runs_dir, run.name)
        print(f"rank {self.rank}/{self.world} on {socket.gethostname()} ({self.device}, "
              f"{torch.get_num_threads()} threads, {len(os.sched_getaffinity(0))} cpus)", flush=True)
        self.ckpt_dir = os.path.join(self.run_dir, "checkpoints")
        self.shards = load_shards(run.data)
        tok = self.shards.tokenizer
        self.vocab = Vocab.of(self.shards)
        self.special = self.vocab.special
        self.prefix_ids = tok(self.shards.manifest["templates"]["answer_prefix"], add_special_tokens=False)["input_ids"]
        self.train_records = self.shards.split("train").to_list()
        self.valid_records = self.shards.split("valid").to_list() if "valid" in self.shards.splits else []
        self._check_shards_feed_the_method()
        self._build_engine()
        self.log = MetricsLog(self.run_dir, self.rank == 0)
        self.progress = Progress(stage=stage_for_epoch(0, run.curriculum, run.method.name))
        self.stop = StopFlag()
        self.peak, self.peak_name = peak_flops(self.on_cuda)
        self.meter = StepMeter(self.flop_model, self.peak, self.world, self.device)
        self._resume()

    # ---------------------------------------------------------------- setup
    def _check_shards_feed_the_method(self) -> None:
        """Lay out one record now: shards that cannot feed this method stop here with the reason,
        not at the first batch."""
        run = self.run
        stage = stage_for_epoch(0, run.curriculum, run.method.name)
        try:
            for record in self.train_records[:1]:
                layout(record, self.special, self.run.method, stage, self.prefix_ids)
            report = get_method(run.method.name).target_report(run.method, self.special,
                                                              self.train_records[:TARGET_SAMPLE])
        except ValueError as err:           # e.g. shards without CODI's fields or with another answer prefix
            raise UserError(f"{run.data}: {err}") from err
        if report:
            self.say(report)

    def say(self, message: str) -> None:
        if self.rank == 0:
            print(message, flush=True)

    def _plan_memory(self, bf16: bool) -> None:
        """Size the model on the meta device, resolve the DeepSpeed JSON, run the memory plan
        (printed) and take its gather policy and gradient reduction; a plan that does not fit stops
        here (exit 3).
        Rank 0's plan decides for every rank: ranks that chose differently would not meet in
        the same collectives."""
        run = self.run
        sizes = model_sizes(run, self.vocab.size, self.vocab.original)
        self.ds_config = resolve_ds_config(run.deepspeed, run, self.world, sizes.hidden, self.on_cuda, bf16,
                                           sizes.trainable)
        plan = make_plan(run, sizes, self.ds_config, local_hardware(self.world, self.device))
        self.say(plan.render())
        decision = [plan.fits, plan.policy, plan.grad_reduce, f"{plan.reason}; {'; '.join(plan.advice)}"]
        if dist.is_initialized():
            dist.broadcast_object_list(decision, src=0)
        fits, policy, grad_reduce, why = decision
        if not fits and run.train.memory_plan == "enforce":
            raise PlanError(f"{why} (or train.memory_plan=warn to try anyway)")
        stage = zero_stage(self.ds_config)
        self.gather_policy = REPLICATED if stage < 3 else (
            policy if run.train.zero3_gather == "auto" else run.train.zero3_gather)
        if self.gather_policy == STREAMED:
            self.ds_config["zero_optimization"].update(streamed_zero_settings(sizes.layer, sizes.largest_module))
        self.grad_reduce = run.train.grad_reduce
        if self.grad_reduce == "auto":       # the plan's choice holds for the policy it picked
            self.grad_reduce = grad_reduce if self.gather_policy == policy == GATHERED else OVERLAPPED
        if self.grad_reduce == AFTER_BACKWARD and self.gather_policy != GATHERED:
            raise UserError(f"train.grad_reduce=after_backward goes with ZeRO-3's gathered policy, not "
                            f"{self.gather_policy} (ZeRO-{stage}, {run.deepspeed}); set train.grad_reduce=overlapped")
        self.say(f"ZeRO-{stage} parameters: {self.gather_policy} ({_chosen_by(run, 'zero3_gather')}); gradients "
                 f"reduced {self.grad_reduce.replace('_', ' ')} ({_chosen_by(run, 'grad_reduce')})")

    def _build_engine(self) -> None:
        import deepspeed

        run, vocab_size = self.run, self.vocab.size
        bf16 = run.model.dtype == "bf16" or (run.model.dtype == "auto" and self.on_cuda)
        self._plan_memory(bf16)
        self._check_body_forward()
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            save_config(run, os.path.join(self.run_dir, "config.yaml"))
            with open(os.path.join(self.run_dir, "ds_config.json"), "w", encoding="utf-8") as handle:
                json.dump(self.ds_config, handle, indent=2)
        model, _, self._hf_ds_keepalive = build_reasoner(run, self.vocab, self.ds_config, self.on_cuda,
                                                         new_rows_like(self.shards.tokenizer, run.method.name))
        self.say(f"attention kernel per pass: {kernel_report(model.attention_passes())} (model.attn_implementation="
                 f"{run.model.attn_implementation}, model.body_forward={run.model.body_forward} on {self.device.type})")
        total, trainable = count_params(model)
        picked = f" (model.dtype=auto on {self.device.type})" if run.model.dtype == "auto" else ""
        self.say(f"ZeRO-{zero_stage(self.ds_config)} | "
                 f"{'bf16 (fp32 master)' if bf16 else 'fp32'}{picked} | "
                 f"params {total / 1e6:.2f}M ({trainable / 1e6:.2f}M trainable)")
        self.say(f"global batch = {self.ds_config['train_batch_size']} "
                 f"(micro {run.train.micro_batch_size} x accum {run.train.grad_accum} x {self.world} ranks)")
        self.steps_per_epoch = len(self._indices(0)) // run.train.grad_accum
        self.total_steps = run.train.max_steps or self.steps_per_epoch * run.train.epochs
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=optimizer_groups(model, run.train.weight_decay),
            config=self.ds_config, lr_scheduler=self._scheduler)
        try:
            apply_gather_policy(self.engine, self.gather_policy, run.train.deepspeed_check)
            apply_grad_reduce(self.engine, self.grad_reduce, run.train.deepspeed_check)
        except DeepSpeedInternalError as err:       # this DeepSpeed cannot run the setting: say which to change
            raise UserError(str(err)) from None
        base, decoder = model.base, model.step_decoder
        self.flop_model = FlopModel(body_params(base), body_params(decoder) if decoder is not None else 0,
                                    base.config.num_hidden_layers, base.config.hidden_size, vocab_size,
                                    self.run.method.slot_width(), self.run.method.jacobi or 0)

    def _check_body_forward(self) -> None:
        """Before the model is built: a compiled forward reads the weights as plain tensors, which
        ZeRO-3 holds only under the gathered policy (its module hooks removed for the step)."""
        if self.run.model.body_forward == "compiled" and self.gather_policy not in (GATHERED, REPLICATED):
            raise UserError(f"model.body_forward=compiled needs ZeRO-3's gathered policy (this run: "
                            f"{self.gather_policy}); set model.body_forward=lean, or train.zero3_gather=gathered "
                            "where the memory plan allows it")

    def _scheduler(self, optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, self.total_steps,
                                                                                   self.run.train))

    def _resume(self) -> None:
        tag = checkpoint.latest_tag(self.ckpt_dir)
        if tag:
            state = checkpoint.load(self.engine, self.ckpt_dir, tag)
            self.progress = Progress(**{k: state[k] for k in Progress().as_dict() if k in state})
            self.say(f"resumed from {self.ckpt_dir}/{tag}: epoch {self.progress.epoch}, "
                     f"step {self.progress.global_step}, stage {self.progress.stage}")

    # ---------------------------------------------------------------- data
    def _sharding(self) -> RankSharding:
        t = self.run.train
        return RankSharding(t.micro_batch_size, t.grad_accum, self.rank, self.world, t.seed)

    def _indices(self, epoch: int) -> list[list[int]]:
        t = self.run.train
        return rank_indices(len(self.train_records), self._sharding(), epoch, t.shuffle, t.steps_per_epoch)

    # ---------------------------------------------------------------- loop
    def fit(self) -> int:
        """Train to the end (or ``max_steps``); returns the process exit code."""
        run, p = self.run, self.progress
        if self._done():
            self.say(f"nothing to do: already at train.max_steps={run.train.max_steps}")
            return 0
        try:            # the metrics are closed on every way out: pipeline.train exits without finalizers
            for epoch in range(p.epoch, run.train.epochs):
                stage = stage_for_epoch(epoch, run.curriculum, run.method.name)
                if epoch != p.epoch or p.micro_in_epoch == 0:
                    self._maybe_reset_optimizer(epoch, stage)
                p.epoch, p.stage = epoch, stage
                code = self._train_epoch(epoch, stage)
                if code is not None:
                    return code
                p.epoch, p.micro_in_epoch = epoch + 1, 0
                valid = self.validate(stage) if run.train.validate and self.valid_records else None
                self._save(checkpoint.epoch_tag(epoch), valid)
                if self._done():
                    break
        finally:
            self.log.close()
        self.say(f"finished: {p.global_step} steps; checkpoints in {self.ckpt_dir}")
        return 0

    def _done(self) -> bool:
        return bool(self.run.train.max_steps) and self.progress.global_step >= self.run.train.max_steps

    def _maybe_reset_optimizer(self, epoch: int, stage: int) -> None:
        mode = self.run.curriculum.reset_optimizer
        if epoch == 0 or mode == "never" or (mode == "stage" and stage == self.progress.stage):
            return
        optimizer = self.engine.optimizer
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.state.clear()   # Adam moments and step counts start over; parameters are kept
        self.say(f"optimizer state reset (curriculum.reset_optimizer={mode}) at epoch {epoch}")

    def _train_epoch(self, epoch: int, stage: int) -> int | None:
        p, t = self.progress, self.run.train
        indices = self._indices(epoch)
        batches = iter_batches(self.train_records, indices[p.micro_in_epoch:], self.special, self.run.method, stage,
                               self.prefix_ids, draw_seed=f"{self.run.train.seed}/{epoch}")
        self.engine.train()
        bar = self._progress_bar(len(indices) // t.grad_accum, epoch, stage)
        for batch in batches:
            if p.micro_in_epoch % t.grad_accum == 0:        # an optimizer step starts: diagnose if it is logged
                self.engine.module.diagnostics = self._logs(p.global_step + 1)
            with step_gather(self.engine, self.gather_policy):
                losses = self.engine(batch.to(self.device))
                self.engine.backward(losses["total"])
            self.engine.step()
            p.micro_in_epoch += 1
            self.meter.add(losses, batch)
            if p.micro_in_epoch % t.grad_accum:
                continue
            p.global_step += 1
            self._log_step(stage)
            if bar:
                bar.update(1)
            if self.stop.agreed(self.device) or p.global_step == t.stop_at_step:
                return self._stop_for_requeue()
            every = self.run.checkpoint.every_steps
            if every and p.global_step % every == 0 and p.micro_in_epoch < len(indices):
                self._save(f"step{p.global_step}", None)
            if self._done():
                return None
        if bar:
            bar.close()
        return None

    def _stop_for_requeue(self) -> int:
        p = self.progress
        self._save(f"step{p.global_step}", None)
        why = f"signal {self.stop.signal}" if self.stop.signal else "train.stop_at_step"
        if self.rank == 0:   # the sbatch script requeues the job when it finds this file
            open(os.path.join(self.run_dir, "REQUEUE"), "w").close()
        self.say(f"stopped by {why} at step {p.global_step}; checkpoint saved, "
                 f"exit {REQUEUE_EXIT} so the job is requeued")
        if dist.is_initialized():
            dist.barrier()   # no rank exits (and gets the others killed by the launcher) before this point
        return REQUEUE_EXIT

    def _progress_bar(self, total: int, epoch: int, stage: int):
        if self.rank != 0 or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=self.progress.micro_in_epoch // self.run.train.grad_accum,
                    desc=f"epoch {epoch} stage {stage}", dynamic_ncols=True)

    def _logs(self, step: int) -> bool:
        """Whether optimizer step ``step`` is printed (and its latents' collapse diagnostics computed)."""
        return step % self.run.train.log_every == 0 or step == 1

    def _log_step(self, stage: int) -> None:
        p, t = self.progress, self.run.train
        metrics = self.meter.finish(t.grad_accum, max(0, self.total_steps - p.global_step))
        grad_norm = self.engine.get_global_grad_norm()
        metrics.update({"lr": self.engine.get_lr()[0], "stage": stage})
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        self.log.log(p.global_step, metrics)
        if self._logs(p.global_step):
            self.say(f"step {p.global_step}/{self.total_steps} epoch {p.epoch} stage {stage} "
                     f"loss {metrics['loss/total']:.4f} answer {metrics['loss/answer_ce']:.4f} "
                     f"step_ce {metrics['loss/step_ce']:.4f} lr {metrics['lr']:.2e} "
                     f"tok/s {metrics['throughput/tokens_per_s']:.0f} mfu {metrics['mfu(%)']:.1f}% "
                     f"{1000 * metrics['time/step_s']:.0f} ms/step eta {format_eta(metrics['time/eta_s'])}")

    @torch.no_grad()
    def validate(self, stage: int) -> float:
        """Mean valid loss over an equal number of batches on every rank; never the test split."""
        self.engine.eval()
        self.engine.module.diagnostics = False
        sharding = dataclasses.replace(self._sharding(), grad_accum=1)
        indices = rank_indices(len(self.valid_records), sharding, 0, shuffle=False)
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in iter_batches(self.valid_records, indices, self.special, self.run.method, stage, self.prefix_ids):
            with step_gather(self.engine, self.gather_policy):
                losses = self.engine(batch.to(self.device))
            total += torch.tensor([float(losses["total"]), 1.0], dtype=torch.float64, device=self.device)
        if dist.is_initialized():
            dist.all_reduce(total)
        self.engine.train()
        value = float(total[0] / total[1].clamp(min=1))
        self.log.log(self.progress.global_step, {"valid/total": value})
        self.say(f"valid loss {value:.4f} (epoch {self.progress.epoch - 1}, stage {stage})")
        return value

    def _save(self, tag: str, valid: float | None) -> None:
        p = self.progress
        if valid is not None and valid < p.best_valid:
            p.best_valid, p.best_tag = valid, tag
        checkpoint.save(self.engine, self.ckpt_dir, tag, p.as_dict(), self.run.checkpoint.checksums)
        if self.rank == 0:
            removed = checkpoint.rotate(self.ckpt_dir, self.run.checkpoint.keep_last, {p.best_tag, tag})
            if removed:
                print(f"removed old checkpoints {removed}", flush=True)

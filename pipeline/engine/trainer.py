"""The training loop: one DeepSpeed engine around ``LatentReasoner``, curriculum, exact resume.

    python -m pipeline.train --config configs/tiny-cpu.yaml      (see pipeline/train.py)
"""
from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys

import torch
import torch.distributed as dist

from common.cli import NUMERIC_EXIT, REQUEUE_EXIT, UserError
from data_prep import load_shards
from pipeline.engine import checkpoint
from pipeline.engine.build_model import build_reasoner, count_params, new_rows_like, optimizer_groups
from pipeline.engine.config import RunConfig, for_world
from pipeline.engine.deepspeed_internals import DeepSpeedInternalError
from pipeline.engine.distributed import StopFlag, init_distributed
from pipeline.engine.ds_config import zero_stage
from pipeline.engine.engine_plan import plan_engine
from pipeline.engine.gather_policy import apply_gather_policy, step_gather
from pipeline.engine.grad_reduce import apply_grad_reduce
from pipeline.engine.guard import ROLLBACK, STOP, Finding, NumericGuard, StepFacts, weights_finite
from pipeline.engine.progress import Progress, Rollback
from pipeline.engine.sampler import RankSharding, iter_batches, rank_indices, stage_for_epoch, step_records
from pipeline.engine.schedule import lr_factor
from pipeline.engine.telemetry import FlopModel, MetricsLog, StepMeter, body_params, format_eta, peak_flops
from pipeline.latent.attention import kernel_report
from pipeline.latent.methods import get_method, layout
from pipeline.latent.vocab import Vocab
from pipeline.run_files import keep_run_files

TARGET_SAMPLE = 10_000     # train records the start-up report on decoder targets reads


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
        self.train_records = self.shards.records("train")      # read by index from the memory-mapped shards
        self.valid_records = self.shards.records("valid") if "valid" in self.shards.splits else []
        self._check_shards_feed_the_method()
        self._build_engine()
        self.log = MetricsLog(self.run_dir, self.rank == 0)
        self.progress = Progress(stage=stage_for_epoch(0, run.curriculum, run.method.name))
        self.stop = StopFlag()
        self.peak, self.peak_name = peak_flops(self.on_cuda)
        self.meter = StepMeter(self.flop_model, self.peak, self.world, self.device)
        self.rolled_back_to = ""
        self._resume()
        self.guard = NumericGuard(run.train, self.progress.guard)

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

    def _build_engine(self) -> None:
        import deepspeed

        run, vocab_size = self.run, self.vocab.size
        bf16 = run.model.dtype == "bf16" or (run.model.dtype == "auto" and self.on_cuda)
        self.ds_config, self.gather_policy, self.grad_reduce = plan_engine(run, self.vocab, self.world, self.device,
                                                                           bf16, self.say)
        keep_run_files(self.run_dir, run, self.ds_config, self.shards, self.rank)
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

    def _scheduler(self, optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, self.total_steps,
                                                                                   self.run.train))

    def _resume(self) -> None:
        tag = checkpoint.latest_tag(self.ckpt_dir)
        if tag:
            self.progress = Progress.of(checkpoint.load(self.engine, self.ckpt_dir, tag))
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
        if self._done():
            self.say(f"nothing to do: already at train.max_steps={self.run.train.max_steps}")
            return 0
        try:            # the metrics are closed on every way out: pipeline.train exits without finalizers
            while True:
                try:
                    code = self._fit_epochs()
                    break
                except Rollback as back:
                    code = self._roll_back(back.finding)
                    if code is not None:
                        break
        finally:
            self.log.close()
        if code == 0:
            self.say(f"finished: {self.progress.global_step} steps; checkpoints in {self.ckpt_dir}")
        return code

    def _fit_epochs(self) -> int:
        run, p = self.run, self.progress
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
            code = self._checkpoint(checkpoint.epoch_tag(epoch), valid)
            if code is not None:
                return code
            if self._done():
                break
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
        before = p.global_step - p.micro_in_epoch // t.grad_accum          # the step before the epoch's first
        skip = set(t.skip_steps) | set(p.skipped)
        todo = [i for i in range(p.micro_in_epoch, len(indices)) if before + i // t.grad_accum + 1 not in skip]
        batches = iter_batches(self.train_records, [indices[i] for i in todo], self.special, self.run.method, stage,
                               self.prefix_ids, draw_seed=f"{self.run.train.seed}/{epoch}")
        self.engine.train()
        bar = self._progress_bar(len(indices) // t.grad_accum, epoch, stage)
        for position, batch in zip(todo, batches):
            if self._pass_skipped(position):
                return None
            if position % t.grad_accum == 0:        # an optimizer step starts: diagnose if it is logged
                self.engine.module.diagnostics = self._logs(p.global_step + 1)
            self._micro_step(batch, last=(position + 1) % t.grad_accum == 0)
            if p.micro_in_epoch % t.grad_accum:
                continue
            p.global_step += 1
            code = self._act(self._judge_step(stage), epoch)
            if code is not None:
                return code
            if bar:
                bar.update(1)
            if self.stop.agreed(self.device) or p.global_step == t.stop_at_step:
                return self._stop_for_requeue()
            every = self.run.checkpoint.every_steps
            if every and p.global_step % every == 0 and p.micro_in_epoch < len(indices):
                code = self._checkpoint(f"step{p.global_step}", None)
                if code is not None:
                    return code
            if self._done():
                return None
        self._pass_skipped(len(indices))
        if bar:
            bar.close()
        return None

    def _micro_step(self, batch, last: bool) -> None:
        """Forward, backward and DeepSpeed's step of one micro-batch; on a step's ``last`` one the
        loss is multiplied by the guard's factor (1.0, or NaN when the step's loss is not finite on
        some rank: its update is then skipped on every rank)."""
        with step_gather(self.engine, self.gather_policy):
            losses = self.engine(batch.to(self.device))
            self.meter.add(losses, batch)
            total = losses["total"]
            if last:
                total = total * self.meter.reduce().to(total.dtype)
            self.engine.backward(total)
        self.engine.step()
        self.progress.micro_in_epoch += 1

    def _pass_skipped(self, position: int) -> bool:
        """Count the skipped steps before micro-batch ``position``; whether the run is done."""
        p, t = self.progress, self.run.train
        while p.micro_in_epoch < position and not self._done():
            p.micro_in_epoch += t.grad_accum
            p.global_step += 1
            self.say(f"step {p.global_step}: not trained on (train.skip_steps or a rollback)")
        return self._done()

    def _judge_step(self, stage: int) -> list[Finding]:
        metrics = self._log_step(stage)
        facts = StepFacts(self.progress.global_step, stage, metrics["loss/total"], metrics.get("grad_norm"),
                          self.engine.was_step_applied(), metrics)
        if facts.applied and not math.isfinite(facts.loss):
            raise RuntimeError(f"step {facts.step}: DeepSpeed applied an update whose loss is {facts.loss} "
                               f"({self.run.deepspeed}); this configuration does not skip non-finite steps")
        return self.guard.after_step(facts)

    def _act(self, findings: list[Finding], epoch: int) -> int | None:
        """Report each finding; stop (the exit code), roll back (raised), or go on (None)."""
        for finding in findings:
            self._report(finding, epoch)
        for finding in findings:
            if finding.action == ROLLBACK:
                raise Rollback(finding)
            if finding.action == STOP:
                return self._stop_on(finding)
        return None

    def _report(self, finding: Finding, epoch: int) -> None:
        p, t = self.progress, self.run.train
        fields = {"action": finding.action, "epoch": epoch, "stage": p.stage, **finding.figures}
        batch = ""
        if finding.kind in ("bad_step", "spike") and self.rank == 0:
            in_epoch = p.micro_in_epoch // t.grad_accum
            by_rank = step_records(len(self.train_records), self._sharding(), epoch, t.shuffle, t.steps_per_epoch,
                                   in_epoch)
            ids = [self.train_records[i]["id"] for rank in sorted(by_rank) for i in by_rank[rank]]
            fields.update({"step_in_epoch": in_epoch, "records": by_rank, "problem_ids": ids})
            shown = ", ".join(map(str, ids[:8])) + (f" and {len(ids) - 8} more" if len(ids) > 8 else "")
            batch = f" [epoch {epoch}, step {in_epoch} of the epoch, problems {shown}]"
        self.log.event(finding.step, finding.kind, finding.count, finding.message, fields)
        level = "error" if finding.action in (STOP, ROLLBACK) else "warning"
        self.say(f"{level}: {finding.message}{batch}")

    def _stop_on(self, finding: Finding, why: str = "") -> int:
        tag = checkpoint.latest_tag(self.ckpt_dir)
        last = (f"the last good checkpoint: {self.ckpt_dir}/{tag}. The same command resumes from it" if tag
                else "no checkpoint was written yet. The same command starts over")
        steps = ",".join(map(str, finding.steps))
        skip = f"; train.skip_steps=[{steps}] leaves these batches out" if steps else ""
        self.say(f"stopped at step {self.progress.global_step} ({why or finding.kind}); {last}{skip}. "
                 f"Exit {NUMERIC_EXIT}")
        if dist.is_initialized():
            dist.barrier()
        return NUMERIC_EXIT

    def _roll_back(self, finding: Finding) -> int | None:
        """Reload the last good checkpoint; the finding's steps are never trained on from then on."""
        tag = checkpoint.latest_tag(self.ckpt_dir)
        if tag is None or tag == self.rolled_back_to:
            why = "no checkpoint to roll back to" if tag is None else f"rolled back to {tag} before; bad again"
            return self._stop_on(finding, why)
        self.progress = self.progress.rolled_back(checkpoint.load(self.engine, self.ckpt_dir, tag), finding)
        self.guard = NumericGuard(self.run.train, self.progress.guard)
        self.rolled_back_to = tag
        self.say(f"rolled back to {self.ckpt_dir}/{tag} (step {self.progress.global_step}); steps "
                 f"{list(finding.steps)} will not be trained on")
        return None

    def _stop_for_requeue(self) -> int:
        p = self.progress
        code = self._checkpoint(f"step{p.global_step}", None)
        if code is not None:
            return code
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

    def _log_step(self, stage: int) -> dict[str, float]:
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
        return metrics

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

    def _checkpoint(self, tag: str, valid: float | None) -> int | None:
        """Save ``tag`` unless its validation loss or weights are not finite (then the guard acts)."""
        p = self.progress
        finding = None
        if valid is not None and not math.isfinite(valid):
            finding = self.guard.not_finite("bad_validation", p.global_step, f"the validation loss ({valid})")
        elif not weights_finite(self.engine.module, self.device):
            finding = self.guard.not_finite("bad_weights", p.global_step, "a weight")
        if finding is not None:
            return self._act([finding], p.epoch)
        if valid is not None and valid < p.best_valid:
            p.best_valid, p.best_tag = valid, tag
        checkpoint.save(self.engine, self.ckpt_dir, tag, p.as_dict(), self.run.checkpoint.checksums)
        if self.rank == 0:
            removed = checkpoint.rotate(self.ckpt_dir, self.run.checkpoint.keep_last, {p.best_tag, tag})
            if removed:
                print(f"removed old checkpoints {removed}", flush=True)
        return None

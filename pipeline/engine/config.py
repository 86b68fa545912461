"""Run configuration: typed dataclasses, a YAML recipe, dotted ``key=value`` overrides, strict.

    python -m pipeline.train --config configs/tiny-cpu.yaml train.lr=3e-3 method.name=coconut method.simcot=true

An unknown key is an error that names the closest valid key; a value of the wrong type is an
error that names the key and the expected type. The resolved config is saved in the run dir
with its schema version; an older version is upgraded when read (pipeline/run_files.py).
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Literal

import yaml

from common.cli import UserError
from pipeline.latent.lean_forward import BODY_FORWARDS
from pipeline.latent.methods import MethodConfig
from pipeline.latent.methods.config import check_choices
from pipeline.run_files import CONFIG, stamped, upgrade


@dataclass
class TinyModel:
    """A randomly initialised LLaMA built in code (used when ``model.name_or_path`` is empty)."""
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 512
    tie_word_embeddings: bool = True


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 128
    alpha: int = 32
    dropout: float = 0.0     # the reference hard-codes 0.1 (its largest CPU cost); set it here if wanted
    target_modules: list = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"])


@dataclass
class ModelSettings:
    name_or_path: str = ""   # HF id or directory; empty: build `tiny`
    tiny: TinyModel = field(default_factory=TinyModel)
    attn_implementation: str = "auto"   # auto = sdpa (fastest measured); flash_attention_4|flash_attention_2
    dtype: str = "auto"                 # auto: bf16 on CUDA (fp32 master weights), fp32 on CPU
    gradient_checkpointing: bool = False
    # how training runs the decoder stacks (every pass of the base, the step decoder): auto = lean where the
    # family allows (the same arithmetic, fewer host operations); compiled = lean under torch.compile
    # (its first step compiles; needs ZeRO-3's gathered policy); transformers = the model's own forward
    body_forward: Literal[BODY_FORWARDS] = "auto"     # the choices, once: pipeline/latent/lean_forward.py
    lora: LoraSettings = field(default_factory=LoraSettings)
    trust_remote_code: bool = False
    init_seed: int = 0
    decoder_path: str = ""              # SIM-CoT step decoder: "" a copy of the base (the reference's default);
                                        # an HF id/dir (the reference's decoder_path), or "tiny": `decoder_tiny`
    decoder_tiny: TinyModel = field(default_factory=TinyModel)

    def __post_init__(self):
        check_choices(self)

    def step_decoder(self) -> ModelSettings:
        """How the SIM-CoT step decoder is built: the base's own settings unless ``decoder_path``."""
        if not self.decoder_path:
            return self
        if self.decoder_path == "tiny":
            return dataclasses.replace(self, name_or_path="", tiny=self.decoder_tiny)
        return dataclasses.replace(self, name_or_path=self.decoder_path)


@dataclass
class CurriculumSettings:
    epochs_per_stage: int = 1
    start_stage: int = 0                # Coconut continuing from a CoT run starts at 1
    reset_optimizer: Literal["never", "stage", "epoch"] = "never"   # the reference resets every epoch

    def __post_init__(self):
        check_choices(self)


@dataclass
class TrainSettings:
    epochs: int = 1
    max_steps: int = 0                  # 0: no cap; else stop after this many optimizer steps
    steps_per_epoch: int = 0            # 0: every record once; else at most this many steps of a fresh
                                        # shuffle per epoch (Coconut stage lengths in steps, not data size)
    micro_batch_size: int = 8
    grad_accum: int = 1
    global_batch_size: int = 0          # > 0: samples per optimizer step whatever the world size; the
                                        # accumulation is derived (global / (micro x ranks), must divide)
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    schedule: Literal["constant", "cosine"] = "constant"   # pipeline/engine/schedule.py
    warmup_steps: int = 0
    warmup_ratio: float = 0.0           # > 0: warm-up = this fraction of the optimizer steps (HF's warmup_ratio)
    min_lr_ratio: float = 0.1           # cosine ends at this fraction of the peak (0: HF's cosine)
    max_grad_norm: float = 0.0          # 0: no clipping
    seed: int = 0
    shuffle: bool = True
    log_every: int = 10
    validate: bool = True
    # auto: the memory plan picks (engine/gather_policy.py, engine/grad_reduce.py)
    zero3_gather: Literal["auto", "gathered", "streamed"] = "auto"
    grad_reduce: Literal["auto", "overlapped", "after_backward"] = "auto"
    memory_plan: Literal["enforce", "warn"] = "enforce"   # enforce: a plan that does not fit stops the run (exit 3)
    deepspeed_check: Literal["enforce", "warn"] = "enforce"   # enforce: the ZeRO-3 patches refuse a DeepSpeed
                                        # version they are not tested on (engine/deepspeed_internals.py)
    stop_at_step: int = 0               # checkpoint and exit 75 here, as on a preemption signal (time-sliced jobs)
    # numerical faults and latent collapse (pipeline/engine/guard.py, docs/training.md)
    max_bad_steps: int = 3              # steps in a row whose loss or gradient norm is not finite (each one
                                        # updates nothing) before on_bad acts
    on_bad: Literal["stop", "rollback"] = "stop"   # stop: exit 4; rollback: reload the last good checkpoint
                                        # and skip the offending batches
    spike_factor: float = 4.0           # a loss above this many times its running mean is a spike (0: off)
    spike_window: int = 50              # steps in that running mean (and steps watched before the first check)
    on_spike: Literal["warn", "stop", "rollback"] = "warn"
    collapse_cosine: float = 0.99       # the latents' mean pairwise cosine above this is collapse (0: off)
    collapse_norm_ratio: list = field(default_factory=list)   # [low, high]: a latent/token norm ratio outside
                                        # it is collapse too (empty: not watched; its scale is the model's)
    collapse_patience: int = 5          # logged steps in a row (train.log_every) before on_collapse acts
    on_collapse: Literal["warn", "stop"] = "warn"
    skip_steps: list = field(default_factory=list)   # optimizer steps whose batches are never trained on

    def __post_init__(self):
        check_choices(self)


@dataclass
class CheckpointSettings:
    every_steps: int = 0                # 0: once per epoch
    keep_last: int = 2
    checksums: bool = True
    init_from: str = ""                 # an earlier run's checkpoint dir (its latest) or one tag dir in it


@dataclass
class RunConfig:
    name: str = "run"
    runs_dir: str = "runs"
    data: str = ""                      # shard directory from `python -m data_prep build`
    deepspeed: str = "ds_configs/zero3.json"
    model: ModelSettings = field(default_factory=ModelSettings)
    method: MethodConfig = field(default_factory=MethodConfig)
    curriculum: CurriculumSettings = field(default_factory=CurriculumSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)


class ConfigError(UserError):
    """A config key or value that does not fit the schema (a user's mistake: exit 2)."""


def _field_types(cls) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _suggest(key: str, valid: list[str], path: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"; did you mean '{path}{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return f"unknown key '{path}{key}'{hint}"


def _coerce(value, kind, where: str):
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping")
        return _build(kind, value, f"{where}.")
    origin = typing.get_origin(kind)
    if origin is Literal:                # its choices are checked by the section (check_choices)
        return value
    if origin in (list, tuple) or kind is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return value
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)         # YAML reads "3e-3" (no dot) as a string
        except ValueError:
            raise ConfigError(f"{where}: expected float, got {value!r}") from None
    wrong_type = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
    if kind in (int, float, str, bool) and wrong_type:
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def _build(cls, values: dict, path: str = ""):
    types_ = _field_types(cls)
    for key in values:
        if key not in types_:
            raise ConfigError(_suggest(key, list(types_), path))
    kwargs = {k: _coerce(v, types_[k], f"{path}{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ValueError as err:           # a section's own checks (MethodConfig's), named by its path
        raise ConfigError(f"{path}{err}") from None


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {key!r} is not a section")
    node[keys[-1]] = value


def load_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    """YAML recipe (optional) + ``key=value`` overrides -> a validated RunConfig."""
    tree: dict = {}
    if path:
        with open(path, encoding="utf-8") as handle:
            try:
                tree = yaml.safe_load(handle) or {}
            except yaml.YAMLError as err:
                mark = getattr(err, "problem_mark", None)
                where = f"line {mark.line + 1}" if mark else "?"
                raise ConfigError(f"{path}: not valid YAML at {where} ({getattr(err, 'problem', err)})") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        tree = upgrade(CONFIG, tree, path)      # a run's saved config.yaml of an older version
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not valid YAML (quote it)") from None
        _set_dotted(tree, key.strip(), value)
    try:
        config = _build(RunConfig, tree)
    except ConfigError as err:
        raise ConfigError(f"{path or 'config'}: {err}") from None
    validate(config)
    return config


def validate(config: RunConfig) -> None:
    """The rules between sections (each section's own, and its choices, are checked when it is built)."""
    m, c, t = config.method, config.curriculum, config.train
    checks = [
        (not config.model.decoder_path or m.simcot,
         "model.decoder_path is the SIM-CoT step decoder: set method.simcot"),
        (not (config.model.decoder_path and m.decoder_init == "base"),
         "method.decoder_init=base copies the base into the decoder, which model.decoder_path makes another model"),
        (not m.reference_attention or not config.model.attn_implementation.startswith("flash"),
         "method.reference_attention (and reference_quirks) attends the question's left pads as the reference does "
         "under CUDA SDPA, through a 4-D mask that flash-attention kernels do not take: "
         "set model.attn_implementation to auto, sdpa or eager"),
        (t.micro_batch_size > 0 and t.grad_accum > 0, "train.micro_batch_size and train.grad_accum must be > 0"),
        (c.epochs_per_stage > 0, "curriculum.epochs_per_stage must be > 0"),
        (t.steps_per_epoch >= 0, "train.steps_per_epoch must be >= 0 (0: every record once per epoch)"),
        (0 <= t.warmup_ratio < 1 and 0 <= t.min_lr_ratio <= 1,
         "train.warmup_ratio must be in [0, 1) and train.min_lr_ratio in [0, 1]"),
        (t.global_batch_size >= 0, "train.global_batch_size must be >= 0 (0: micro x grad_accum x ranks)"),
        (t.max_bad_steps >= 1 and t.spike_window >= 1 and t.collapse_patience >= 1,
         "train.max_bad_steps, train.spike_window and train.collapse_patience must be >= 1"),
        (t.spike_factor == 0 or t.spike_factor > 1, "train.spike_factor must be > 1 (0: spikes not watched)"),
        (0 <= t.collapse_cosine <= 1, "train.collapse_cosine must be in [0, 1] (0: not watched)"),
        (not t.collapse_norm_ratio or (len(t.collapse_norm_ratio) == 2
                                       and 0 <= t.collapse_norm_ratio[0] < t.collapse_norm_ratio[1]),
         "train.collapse_norm_ratio must be [low, high] with 0 <= low < high, or [] (not watched)"),
        (all(isinstance(s, int) and s >= 1 for s in t.skip_steps),
         "train.skip_steps must list optimizer steps (integers >= 1), e.g. train.skip_steps=[41,42]"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def for_world(config: RunConfig, world: int) -> RunConfig:
    """The run as it executes on ``world`` ranks: with ``train.global_batch_size`` set, the
    gradient accumulation that keeps that many samples per optimizer step on this many ranks."""
    t = config.train
    if not t.global_batch_size:
        return config
    per_pass = t.micro_batch_size * world
    if t.global_batch_size % per_pass:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size} x {world} ranks; pick a micro batch that "
                          f"divides {t.global_batch_size // world if t.global_batch_size >= world else 1}")
    accum = t.global_batch_size // per_pass
    return dataclasses.replace(config, train=dataclasses.replace(t, grad_accum=accum))


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: RunConfig, path: str) -> None:
    """The run's resolved config, with its schema version (pipeline/run_files.py)."""
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(stamped(CONFIG, to_dict(config)), handle, sort_keys=False)

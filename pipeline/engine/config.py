"""Run configuration: typed dataclasses, a YAML recipe, dotted ``key=value`` overrides, strict.

    python -m pipeline.train --config configs/tiny-cpu.yaml train.lr=3e-3 method.simcot=true

An unknown key is an error that names the closest valid key; a value of the wrong type is an
error that names the key and the expected type. The resolved config is saved in the run dir.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field

import yaml

from data_prep.cli_errors import UserError
from pipeline.latent.methods import LayoutConfig, get_method, method_names


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
    lora: LoraSettings = field(default_factory=LoraSettings)
    trust_remote_code: bool = False
    init_seed: int = 0
    decoder_path: str = ""              # SIM-CoT step decoder: "" a copy of the base (the reference's default);
                                        # an HF id/dir (the reference's decoder_path), or "tiny": `decoder_tiny`
    decoder_tiny: TinyModel = field(default_factory=TinyModel)

    def step_decoder(self) -> ModelSettings:
        """How the SIM-CoT step decoder is built: the base's own settings unless ``decoder_path``."""
        if not self.decoder_path:
            return self
        if self.decoder_path == "tiny":
            return dataclasses.replace(self, name_or_path="", tiny=self.decoder_tiny)
        return dataclasses.replace(self, name_or_path=self.decoder_path)


@dataclass
class MethodSettings:
    """The method and its losses (see pipeline.latent.methods.LayoutConfig and
    pipeline.latent.reasoner.ReasonerConfig)."""
    name: str = "cot"                   # cot | nocot | coconut | codi | pause | nothought (pipeline/latent/methods/)
    simcot: bool = False
    c_thought: int = 2
    max_latent_stage: int = 3
    pad_latent_to_max: bool = True      # coconut: false = after the last stage min(steps, max_latent_stage) x c latents
    uniform_prob: float = 0.0           # coconut: an example's stage is drawn from 0..its steps with this chance
    num_latent: int = 6
    include_last_step: bool = False
    latent_update: str = "sequential"   # sequential | jacobi (all latents at once, PCCoT; pipeline/latent/loop.py)
    jacobi_iterations: int = 3          # jacobi: parallel passes (= the latent count: the sequential result)
    progressive_train: bool = False     # coconut: c x max_latent_stage latents at every stage, stages only remove
                                        # steps, the decoder reproduces every step (the SIM-CoT authors' LLaMA variant)
    remove_eos: bool = True             # codi: false = the reference's EOS after the question, CoT and <eot>
    teacher_cot: str = "joined"         # codi: the teacher's CoT tokenised as one string (reference) | pieces
    step_targets: str = "spans"         # codi + simcot: the <<..>> spans of the teacher's CoT ids, as the reference
                                        # finds them | pieces (each step's own ids, its separator included)
    reference_attention: bool = False   # codi: emulate the released code's attention: after the question pass no
                                        # mask (left pads attended), positions = columns (for matching its numbers)
    reference_step_truncation: bool = False  # codi + simcot: emulate the released code's dedup_trailing_pads bug
                                        # (each slot's step targets cut to row 0's width; batch order decides)
    reference_quirks: bool = False      # codi: every emulated reference bug at once (the two switches above, and
                                        # its step scan over the whole teacher sequence: remove_eos=false -> no step)
    decoder_init: str = "pretrained"    # SIM-CoT decoder with checkpoint.init_from: pretrained (the reference: the raw
                                        # model; a tiny model's initial weights) | base (the checkpoint's base weights)
    step_loss_weight: float = 1.0
    step_loss_norm: str = "token_mean"
    distill_factor: float = 1.0
    distill_div_std: bool = True
    distill_loss: str = "smooth_l1"     # smooth_l1 | l2 (the reference's distill_loss_type)
    projection: bool = True             # codi: false = the reference's use_prj off (latents are the raw hidden states)
    prj_dim: int = 0                    # CODI projection inner width (0: the hidden size)
    prj_dropout: float = 0.0
    prj_layernorm: bool = True          # false: the reference's prj_no_ln
    teacher_loss_weight: float = 1.0

    def __post_init__(self):
        if self.reference_quirks:       # one switch to compare with the released numbers
            self.reference_attention, self.reference_step_truncation = True, self.simcot

    def layout(self) -> LayoutConfig:
        """The options that shape the examples, for ``pipeline.latent.methods``."""
        return LayoutConfig(method=self.name, c_thought=self.c_thought, max_latent_stage=self.max_latent_stage,
                            pad_latent_to_max=self.pad_latent_to_max, num_latent=self.num_latent,
                            include_last_step=self.include_last_step, simcot=self.simcot,
                            latent_update=self.latent_update, jacobi_iterations=self.jacobi_iterations,
                            progressive_train=self.progressive_train, remove_eos=self.remove_eos,
                            teacher_cot=self.teacher_cot, step_targets=self.step_targets,
                            reference_attention=self.reference_attention, reference_quirks=self.reference_quirks,
                            uniform_prob=self.uniform_prob)


@dataclass
class CurriculumSettings:
    epochs_per_stage: int = 1
    start_stage: int = 0                # Coconut continuing from a CoT run starts at 1
    reset_optimizer: str = "never"      # never | stage | epoch (the reference resets every epoch)


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
    schedule: str = "constant"          # constant | cosine (pipeline/engine/schedule.py)
    warmup_steps: int = 0
    warmup_ratio: float = 0.0           # > 0: warm-up = this fraction of the optimizer steps (HF's warmup_ratio)
    min_lr_ratio: float = 0.1           # cosine ends at this fraction of the peak (0: HF's cosine)
    max_grad_norm: float = 0.0          # 0: no clipping
    seed: int = 0
    shuffle: bool = True
    log_every: int = 10
    validate: bool = True
    zero3_gather: str = "auto"          # auto (the memory plan picks) | gathered | streamed (engine/gather_policy.py)
    grad_reduce: str = "auto"           # auto (the plan picks) | overlapped | after_backward (engine/grad_reduce.py)
    memory_plan: str = "enforce"        # enforce: a plan that does not fit stops the run (exit 3) | warn
    stop_at_step: int = 0               # checkpoint and exit 75 here, as on a preemption signal (time-sliced jobs)


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
    method: MethodSettings = field(default_factory=MethodSettings)
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
    return cls(**kwargs)


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
    m, c, t = config.method, config.curriculum, config.train
    if m.name not in method_names():
        raise ConfigError(f"method.name {m.name!r}: expected one of {', '.join(method_names())}")
    with_slots = [name for name in method_names() if get_method(name).supports_simcot]
    checks = [
        (not (m.simcot and not get_method(m.name).supports_simcot),
         f"method.simcot needs a method with latent slots ({' or '.join(with_slots)}), not {m.name}"),
        (m.step_loss_norm in ("token_mean", "sample_sum"), "method.step_loss_norm: token_mean or sample_sum"),
        (m.decoder_init in ("pretrained", "base"), "method.decoder_init: pretrained or base"),
        (not config.model.decoder_path or m.simcot,
         "model.decoder_path is the SIM-CoT step decoder: set method.simcot"),
        (not (config.model.decoder_path and m.decoder_init == "base"),
         "method.decoder_init=base copies the base into the decoder, which model.decoder_path makes another model"),
        (0 <= m.uniform_prob <= 1, "method.uniform_prob must be in [0, 1]"),
        (m.uniform_prob == 0 or get_method(m.name).has_curriculum,
         f"method.uniform_prob draws curriculum stages: a method with a curriculum (coconut), not {m.name}"),
        (m.distill_loss in ("smooth_l1", "l2"), "method.distill_loss: smooth_l1 or l2"),
        (m.teacher_cot in ("joined", "pieces"), "method.teacher_cot: joined or pieces"),
        (m.step_targets in ("spans", "pieces"), "method.step_targets: spans or pieces"),
        (m.step_targets == "spans" or (get_method(m.name).needs_teacher and m.simcot),
         "method.step_targets=pieces chooses CODI + SIM-CoT's decoder targets: method.name=codi, method.simcot=true"),
        (not m.reference_quirks or (m.step_targets == "spans" and m.teacher_cot == "joined"),
         "method.reference_quirks reproduces the reference, whose teacher CoT is joined and whose step targets are "
         "its spans: drop method.step_targets=pieces / method.teacher_cot=pieces"),
        (not m.reference_attention or not config.model.attn_implementation.startswith("flash"),
         "method.reference_attention (and reference_quirks) attends the question's left pads as the reference does "
         "under CUDA SDPA, through a 4-D mask that flash-attention kernels do not take: "
         "set model.attn_implementation to auto, sdpa or eager"),
        (not m.progressive_train or (get_method(m.name).has_curriculum and get_method(m.name).fills_latents),
         f"method.progressive_train needs a method with a curriculum (coconut), not {m.name}"),
        (not m.reference_quirks or get_method(m.name).needs_teacher,
         f"method.reference_quirks emulates bugs of CODI's released code; {m.name} has none left to emulate"),
        (not m.reference_attention or (get_method(m.name).needs_teacher and m.latent_update == "sequential"),
         "method.reference_attention emulates CODI's released code: method.name=codi, latent_update=sequential"),
        (not m.reference_step_truncation or (get_method(m.name).needs_teacher and m.simcot),
         "method.reference_step_truncation emulates CODI's released SIM-CoT code: method.name=codi, method.simcot"),
        (m.remove_eos or get_method(m.name).needs_teacher,
         f"method.remove_eos=false is CODI's option (EOS between question, CoT and answer), not {m.name}'s"),
        (m.projection or get_method(m.name).needs_projection,
         f"method.projection=false turns off CODI's prj; {m.name} has none"),
        (m.prj_dim >= 0 and 0 <= m.prj_dropout < 1, "method.prj_dim must be >= 0 and method.prj_dropout in [0, 1)"),
        (m.latent_update in ("sequential", "jacobi"), "method.latent_update: sequential or jacobi"),
        (m.latent_update == "sequential" or get_method(m.name).fills_latents,
         f"method.latent_update=jacobi needs a method that fills latents, not {m.name}"),
        (m.jacobi_iterations >= 0, "method.jacobi_iterations must be >= 0 (0: the latents stay token embeddings)"),
        (c.reset_optimizer in ("never", "stage", "epoch"), "curriculum.reset_optimizer: never, stage or epoch"),
        (t.schedule in ("constant", "cosine"), "train.schedule: constant or cosine"),
        (t.micro_batch_size > 0 and t.grad_accum > 0, "train.micro_batch_size and train.grad_accum must be > 0"),
        (c.epochs_per_stage > 0, "curriculum.epochs_per_stage must be > 0"),
        (t.steps_per_epoch >= 0, "train.steps_per_epoch must be >= 0 (0: every record once per epoch)"),
        (t.zero3_gather in ("auto", "gathered", "streamed"), "train.zero3_gather: auto, gathered or streamed"),
        (t.grad_reduce in ("auto", "overlapped", "after_backward"),
         "train.grad_reduce: auto, overlapped or after_backward"),
        (0 <= t.warmup_ratio < 1 and 0 <= t.min_lr_ratio <= 1,
         "train.warmup_ratio must be in [0, 1) and train.min_lr_ratio in [0, 1]"),
        (t.global_batch_size >= 0, "train.global_batch_size must be >= 0 (0: micro x grad_accum x ranks)"),
        (t.memory_plan in ("enforce", "warn"), "train.memory_plan: enforce or warn"),
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
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(to_dict(config), handle, sort_keys=False)

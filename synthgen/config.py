"""Typed, validated configuration. YAML is only the file format.

Configs are frozen dataclasses. :func:`from_dict` builds one from plain data and reports every
problem with the dotted path of the field and what is allowed::

    optim.lr: expected a number, got 'fast'
    objective.kind: 'eps' is not one of epsilon, v_prediction, flow
    model.presett: unknown field (allowed: preset, overrides, pretrained)
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from synthgen.errors import SynthgenError


class ConfigError(SynthgenError, ValueError):
    """A configuration value is missing, unknown or invalid (the message names the field)."""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            dict: "a mapping", list: "a list", tuple: "a list"}.get(origin or tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp, path: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no / yes / off / on as a boolean
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((w for w in words if w in typing.get_args(tp)), value)
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        real = [a for a in args if a is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own message is the precise one
            return _convert(value, real[0], path)
        for a in real:
            try:
                return _convert(value, a, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads 1e-4 as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    if origin in (dict,):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return tuple(_convert(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value))
    return value


def from_dict(cls, data: dict, path: str = ""):
    """Build dataclass ``cls`` from ``data``, checking names, types and choices recursively."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}.{unknown[0]}" if path else unknown[0]
        raise ConfigError(f"{where}: unknown field (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], sub)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{sub}: required field is missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or cls.__name__}: {e}") from e


def to_dict(cfg) -> dict:
    """Plain data (lists, dicts) of a config, for YAML/JSON."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def _positive(path: str, value, what="positive") -> None:
    if value is not None and value <= 0:
        raise ConfigError(f"{path}: must be {what}, got {value}")


# -- training ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingConfig:
    """The sampling defaults: the one place they are written (``SAMPLING``). The pipeline call,
    the CLI options, the recipe steps, large images, virtual staining and the training preview
    take their defaults from it."""

    steps: int = 20  # multi-step solver steps (DPM-Solver++ 2M by default)
    guidance: float = 2.0  # classifier-free guidance scale
    fast_steps: int = 4  # the few-step variant's default (and most) steps


SAMPLING = SamplingConfig()

# What conditions a generated image, one vocabulary for every entry point (synthgen generate,
# SynthAugment, eval utility, recipes). "variation" is an accepted older spelling of "variations".
GENERATION_MODES = ("variations", "class", "prior", "interpolation", "mask")
_MODE_ALIASES = {"variation": "variations"}


def resolve_mode(mode: str, allowed=GENERATION_MODES, where: str = "mode") -> str:
    """The canonical name of generation mode ``mode`` (an alias resolved), checked against ``allowed``.

    Raises:
        ConfigError: names ``where`` and the modes allowed there.
    """
    name = _MODE_ALIASES.get(mode, mode)
    if name not in allowed:
        raise ConfigError(f"{where}: unknown mode {mode!r}; choose one of: {', '.join(allowed)}")
    return name


@dataclass(frozen=True)
class ModelConfig:
    """Which model to train: a preset plus overrides, optionally starting from a folder."""

    preset: str = "small"
    overrides: dict = field(default_factory=dict)
    pretrained: str | None = None  # a saved model folder to fine-tune or continue from
    sample_size: int | None = None  # denoiser: continue at another latent size (progressive resolution)
    freeze_encoder: bool = False  # vae: fine-tune the decoder only, keeping the latent space denoisers know
    branch: str | None = None  # controlnet: continue this trained mask branch (a pipeline or model folder)


@dataclass(frozen=True)
class DataConfig:
    """Where batches come from.

    Denoiser: ``cache`` (a feature cache with ``latents`` and ``embedding_key``), or ``tiles`` /
    ``images`` encoded on the fly with ``vae`` and ``encoder``. VAE and SSL: ``tiles`` or ``images``.
    """

    cache: str | None = None
    tiles: str | None = None
    images: str | None = None
    size: int | None = None  # resize folder images to this square size
    crop: int | None = None  # VAE/SSL: train on every crop of this side (grid step crop_stride) of each tile
    crop_stride: int | None = None
    dihedral: bool = False  # with crop: each crop in its 8 rotations/mirrors
    embedding_key: str = "emb"
    use_labels: bool = False  # class-conditional denoiser: read "label" from the cache/dataset (-1: unlabelled)
    use_source: bool = False  # source-conditional denoiser: read "source" (tissue-source id) from the cache
    mask_key: str = "mask"  # controlnet: the cache entry holding label maps
    target_cache: str | None = None  # translator, stain_denoiser: the target-stain cache paired item by item with ``cache``
    vae: str | None = None  # VAE folder: on-the-fly latents and decoded sample grids
    encoder: str | None = None  # encoder spec for on-the-fly embeddings (see synthgen cache --help)
    num_workers: int = 2

    def __post_init__(self):
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {self.num_workers}")
        _positive("data.size", self.size)
        _positive("data.crop", self.crop)
        _positive("data.crop_stride", self.crop_stride)
        if self.crop is None and (self.crop_stride is not None or self.dihedral):
            raise ConfigError("data.crop_stride, data.dihedral: need data.crop")


def _probability(path: str, value: float, closed: bool = False) -> None:
    if not (0 <= value <= 1 if closed else 0 <= value < 1):
        raise ConfigError(f"{path}: must be in [0, 1{']' if closed else ')'}, got {value}")


# The objective section of a training config: one class per kind of task (``OBJECTIVE_OF``), so a
# field set for a task that never reads it is an unknown field, named with what the task allows.
@dataclass(frozen=True)
class GuidedObjectiveConfig:
    """Any conditional model sampled with classifier-free guidance (the embedding prior, the
    stain translator, and the base of every diffusion objective)."""

    cfg_dropout: float = 0.1  # probability of replacing all conditions together by their learned nulls

    def __post_init__(self):
        _probability("objective.cfg_dropout", self.cfg_dropout)


@dataclass(frozen=True)
class DiffusionObjectiveConfig(GuidedObjectiveConfig):
    """A denoiser (tasks denoiser and controlnet). ``epsilon`` and ``v_prediction`` use a DDPM
    noise schedule of ``num_train_timesteps`` steps; ``flow`` is rectified flow
    (x_t = (1 - t) x_0 + t noise, target noise - x_0). Timestep sampling: ``uniform``, or
    ``logit_normal`` (SD3; concentrates on middle noise levels)."""

    kind: Literal["epsilon", "v_prediction", "flow"] = "epsilon"
    timesteps: Literal["uniform", "logit_normal"] = "uniform"
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    # with several conditions, each is also replaced by its own null alone, independently, with
    # these probabilities (on top of cfg_dropout), so guidance can drop each one at sampling
    cfg_dropout_embeddings: float = 0.0
    cfg_dropout_labels: float = 0.0
    cfg_dropout_sources: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        _positive("objective.num_train_timesteps", self.num_train_timesteps)
        for name in ("cfg_dropout_embeddings", "cfg_dropout_labels", "cfg_dropout_sources"):
            _probability(f"objective.{name}", getattr(self, name))


@dataclass(frozen=True)
class StainObjectiveConfig(DiffusionObjectiveConfig):
    """Task stain_denoiser: also drops the source image's latents alone (zeros, InstructPix2Pix)."""

    cfg_dropout_image: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        _probability("objective.cfg_dropout_image", self.cfg_dropout_image)


@dataclass(frozen=True)
class ConsistencyObjectiveConfig(DiffusionObjectiveConfig):
    """Task consistency (synthgen.training.distill): the guidance scale folded into the student,
    the teacher's DDIM skip in timesteps (T / skip points), the pseudo-Huber constant, and the
    decay of the target network, an EMA of the student (LCM's 0.95; 0: the student itself under
    a stop-gradient, as in improved consistency training)."""

    distill_guidance: float = 2.0
    distill_skip: int = 20
    huber_c: float = 0.001
    distill_target_decay: float = 0.95

    def __post_init__(self):
        super().__post_init__()
        if self.kind not in ("epsilon", "v_prediction"):
            raise ConfigError(f"objective.kind: task consistency distils an epsilon or v_prediction teacher, got {self.kind}")
        _probability("objective.distill_target_decay", self.distill_target_decay)
        if self.distill_skip < 1 or self.num_train_timesteps % self.distill_skip:
            raise ConfigError(f"objective.distill_skip: must divide num_train_timesteps ({self.num_train_timesteps}), "
                              f"got {self.distill_skip}")
        _positive("objective.huber_c", self.huber_c)


@dataclass(frozen=True)
class VAEObjectiveConfig:
    """Task vae: the KL weight and the sharpness terms (synthgen.models.discriminator): L1 on
    image gradients, L1 on log Fourier amplitudes, and a PatchGAN hinge loss whose generator term
    starts at adversarial_start (the discriminator trains from step 0)."""

    kl_weight: float = 1e-6
    gradient_weight: float = 0.0
    frequency_weight: float = 0.0
    adversarial_weight: float = 0.0
    adversarial_start: int = 0
    disc_width: int = 32
    disc_layers: int = 3

    def __post_init__(self):
        for name in ("kl_weight", "gradient_weight", "frequency_weight", "adversarial_weight", "adversarial_start"):
            if getattr(self, name) < 0:
                raise ConfigError(f"objective.{name}: must be >= 0, got {getattr(self, name)}")
        _positive("objective.disc_width", self.disc_width)
        _positive("objective.disc_layers", self.disc_layers)


@dataclass(frozen=True)
class SSLObjectiveConfig:
    """Task ssl (synthgen.encoders.ssl): SimCLR (NT-Xent at ``temperature``) or DINO (EMA teacher
    from teacher_momentum, cosine to 1; student at ``temperature``, 0.1 in the paper; teacher
    sharpened at teacher_temperature over dino_prototypes; local_crops small student views).
    View augmentation: HED stain jitter bounds (0 = off) and the probability of a Gaussian blur."""

    temperature: float = 0.2
    ssl_method: Literal["simclr", "dino"] = "simclr"
    teacher_temperature: float = 0.04
    teacher_momentum: float = 0.996
    dino_prototypes: int = 1024
    local_crops: int = 4
    hed_scale: float = 0.0
    hed_shift: float = 0.0
    blur: float = 0.0

    def __post_init__(self):
        _positive("objective.temperature", self.temperature)
        _positive("objective.teacher_temperature", self.teacher_temperature)
        _positive("objective.dino_prototypes", self.dino_prototypes)
        _probability("objective.teacher_momentum", self.teacher_momentum)
        if self.local_crops < 0 or self.hed_shift < 0:
            raise ConfigError("objective.local_crops, objective.hed_shift: must be >= 0, got "
                              f"{self.local_crops}, {self.hed_shift}")
        _probability("objective.hed_scale", self.hed_scale)
        _probability("objective.blur", self.blur, closed=True)


TASKS = ("denoiser", "controlnet", "vae", "ssl", "prior", "translator", "stain_denoiser", "consistency")
# task -> the class of its objective section
OBJECTIVE_OF: dict[str, type] = {
    "denoiser": DiffusionObjectiveConfig, "controlnet": DiffusionObjectiveConfig, "stain_denoiser": StainObjectiveConfig,
    "consistency": ConsistencyObjectiveConfig, "vae": VAEObjectiveConfig, "ssl": SSLObjectiveConfig,
    "prior": GuidedObjectiveConfig, "translator": GuidedObjectiveConfig,
}


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float | None = 1.0
    batch_size: int = 32  # per process
    grad_accum: int = 1

    def __post_init__(self):
        _positive("optim.lr", self.lr)
        _positive("optim.batch_size", self.batch_size)
        _positive("optim.grad_accum", self.grad_accum)
        _positive("optim.grad_clip", self.grad_clip)
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas: expected two numbers, got {list(self.betas)}")


@dataclass(frozen=True)
class LoraConfig:
    """LoRA fine-tuning (peft) of a pretrained denoiser; rank 0 trains all weights."""

    rank: int = 0
    alpha: float | None = None  # default: rank
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Load from YAML with :func:`load_train_config`."""

    task: Literal[TASKS]
    output_dir: str
    steps: int
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # the task's objective class (OBJECTIVE_OF[task]); a mapping or None is built into it
    objective: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    ema_decay: float = 0.999  # 0 disables EMA
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    sample_every: int = 0  # steps between PNG sample grids (0: only at the end)
    num_samples: int = 8

    def __post_init__(self):
        _positive("steps", self.steps)
        _positive("checkpoint_every", self.checkpoint_every)
        _positive("keep_checkpoints", self.keep_checkpoints)
        _positive("log_every", self.log_every)
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.sample_every < 0:
            raise ConfigError(f"sample_every: must be >= 0, got {self.sample_every}")
        cls = OBJECTIVE_OF[self.task]
        if self.objective is None or isinstance(self.objective, dict):
            data, allowed = self.objective or {}, [f.name for f in dataclasses.fields(cls)]
            for name in data:  # from_dict would refuse it too, without saying that it is another task's
                if name not in allowed:
                    raise ConfigError(f"objective.{name}: task {self.task} does not read it (its objective fields: "
                                      f"{', '.join(allowed)})")
            object.__setattr__(self, "objective", from_dict(cls, data, "objective"))
        elif type(self.objective) is not cls:
            raise ConfigError(f"objective: task {self.task} takes a {cls.__name__}, got {type(self.objective).__name__}")


def parse_overrides(pairs: list[str]) -> dict:
    """``["optim.lr=1e-3", "steps=10"]`` -> nested dict (values parsed as YAML scalars)."""
    import yaml

    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {pair!r}: expected key=value (e.g. optim.lr=1e-4)")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return out


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(cls, path: str | Path | None, overrides: list[str] | dict | None = None, what: str = "config"):
    """Read a YAML mapping, apply ``key=value`` overrides, build and validate dataclass ``cls``.

    Raises:
        ConfigError: missing or invalid file, or an invalid field (the message names it).
    """
    import yaml

    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError as e:
            raise ConfigError(f"{path}: no such {what}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    if overrides:
        data = merge(data, overrides if isinstance(overrides, dict) else parse_overrides(list(overrides)))
    return from_dict(cls, data)


def load_train_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> TrainConfig:
    """Read a YAML training config, apply ``key=value`` overrides, validate.

    Raises:
        ConfigError: unreadable file or invalid field (the message names the field).
    """
    return load_yaml(TrainConfig, path, overrides, "config file")

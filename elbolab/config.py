"""Settings: the config dataclasses' shared machinery (``option``, one type converter), ``TrainConfig`` and the
device check.

A setting has one converter, ``coerce_fields``: the Python API, ``--set KEY=VALUE`` and the CLI flags all build a
frozen dataclass, whose ``__post_init__`` converts each field losslessly by its type hint (a list for a tuple, an
int for a float, an integral float for an int) and refuses the rest with one message.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field

import torch

from elbolab.errors import ElbolabError
from elbolab.precision import check_precision
from elbolab.schedules import parse_schedules


def option(default, help: str):
    """A config field with a help text (shown by ``elbolab models NAME``)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def parse_option(config_class, name: str, text: str, flag: str | None = None):
    """A setting given as text (``--set NAME=TEXT``, ``--hidden 400,400``) as the value its field's type hint
    declares; the config's ``coerce_fields`` then checks it like any value from the Python API."""
    hint = typing.get_type_hints(config_class)[name]
    if type(None) in typing.get_args(hint):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    kind = typing.get_origin(hint) or hint
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is tuple:
            values = tuple(int(v) for v in text.split(",") if v.strip())
            if not values:
                raise ValueError
            return values
        return text
    except ValueError:
        example = {int: "int (a whole number)", float: "float (a number)", bool: "bool (true or false)",
                   tuple: "positive integers separated by commas, e.g. 400,400"}.get(kind, getattr(kind, "__name__",
                                                                                        kind))
        raise ElbolabError(f"{flag or name}: expected {example}, got {text!r}") from None


def option_defaults(config_class) -> dict:
    """The default of every field of a config dataclass that has one (what a run saved before the field existed
    trained with)."""
    defaults = {}
    for f in dataclasses.fields(config_class):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def check_options(cls, options: dict, exclude=()) -> None:
    names = [f.name for f in dataclasses.fields(cls) if f.name not in exclude]
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ElbolabError(f"{cls.__name__}: unknown option(s) {unknown}; expected some of {names}")


def coerce_fields(config) -> None:
    """Check each field's type (int, float, str, bool, tuple of ints); accept lossless conversions (a list for a
    tuple, an int for a float, an integral float for an int), refuse the rest with one clear message."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value, hint = getattr(config, f.name), hints[f.name]
        optional = type(None) in typing.get_args(hint)
        if value is None and optional:
            continue
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
        origin = typing.get_origin(base) or base
        try:
            converted = convert(value, origin)
        except (TypeError, ValueError):
            raise ElbolabError(
                f"{type(config).__name__}: expected {f.name} as {getattr(origin, '__name__', origin)}, got "
                f"{value!r} ({type(value).__name__})"
            ) from None
        object.__setattr__(config, f.name, converted)


def convert(value, origin):
    if origin is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if origin is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise TypeError
        return int(value)
    if origin is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError
        return float(value)
    if origin is str:
        if not isinstance(value, str):
            raise TypeError
        return value
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise TypeError
        return tuple(convert(v, int) for v in value)
    return value


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    adam_eps: float = 1e-8
    adam_beta1: float = 0.9  # the IWAE paper's released code uses 0.99
    adam_beta2: float = 0.999
    mc_samples: int = 1
    seed: int = 0
    progress: bool = True  # a progress bar (on a terminal) and one line per epoch
    tensorboard: bool = True
    # name -> spec, e.g. {"beta": "linear:0:1:10", "free_bits": "constant:0.5"}: beta's one home (--beta and
    # --kl-warmup are written here as a beta schedule, see beta_schedule)
    schedules: dict[str, str] = field(default_factory=dict)
    checkpoint_every: int = 0  # also checkpoint every N optimiser steps within an epoch (0: at epoch ends only)
    keep_best: bool = False  # also keep the weights with the best validation ELBO in model.best.safetensors
    device: str = "cpu"
    precision: str = "fp32"  # fp32 | bf16 (matrix products in bfloat16, sensitive sums in float32) | fp16 (GPU)
    compile: bool = False  # the model's forward and loss through torch.compile (eager if compiling fails)

    def __post_init__(self):
        coerce_fields(self)
        checks = [
            (self.epochs >= 1, "epochs >= 1", self.epochs),
            (self.batch_size >= 1, "batch_size >= 1", self.batch_size),
            (self.lr > 0 and math.isfinite(self.lr), "a positive finite learning rate, e.g. 1e-3", self.lr),
            (self.adam_eps > 0, "adam_eps > 0", self.adam_eps),
            (0 <= self.adam_beta1 < 1, "0 <= adam_beta1 < 1", self.adam_beta1),
            (0 <= self.adam_beta2 < 1, "0 <= adam_beta2 < 1", self.adam_beta2),
            (self.mc_samples >= 1, "mc_samples >= 1", self.mc_samples),
            (self.checkpoint_every >= 0, "checkpoint_every >= 0 steps (0: at epoch ends only)",
             self.checkpoint_every),
        ]
        for ok, expected, got in checks:
            if not ok:
                raise ElbolabError(f"train config: expected {expected}, got {got!r}")
        parse_schedules(self.schedules)  # validates the specs
        check_precision(self.precision, check_device(self.device))

    def schedule_specs(self, defaults: dict[str, float] | None = None) -> dict[str, str]:
        """Every schedule: the user's, and a model's own defaults (``scheduled_defaults``, e.g. beta-vae's beta 4;
        beta 1 otherwise) for the names the user did not schedule."""
        defaults = {"beta": 1.0, **(defaults or {})}
        return {**{name: f"constant:{value!r}" for name, value in defaults.items()}, **self.schedules}


# --beta and --kl-warmup: sugar for one beta schedule, in the Python API and the CLI alike
BETA_SUGAR = ("beta", "kl_warmup_epochs")


def beta_schedule(beta: float | None = None, kl_warmup_epochs: float = 0.0, default: float = 1.0) -> str:
    """The schedule spec of ``--beta B --kl-warmup E``: constant B, or linear from 0 to B over E epochs (KL warm-up;
    Bowman et al. 2016, Sonderby et al. 2016). Without B the model's own default is the target (beta-vae's 4)."""
    target = default if beta is None else beta
    for value, expected in ((target, "beta >= 0, e.g. --beta 4"),
                            (kl_warmup_epochs, "kl_warmup_epochs >= 0 epochs")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
            raise ElbolabError(f"train config: expected {expected}, got {value!r}")
    return f"linear:0:{float(target)!r}:{float(kl_warmup_epochs)!r}" if kl_warmup_epochs else \
        f"constant:{float(target)!r}"


def upgrade_run_config(config: dict) -> dict:
    """A config.json written by an earlier version, in today's form: ``train_config.beta`` / ``kl_warmup_epochs``
    and beta-vae's ``model_config.beta`` become the run's beta schedule (the same trajectory)."""
    if not isinstance(config, dict) or not all(isinstance(config.get(k, {}), dict)
                                               for k in ("train_config", "model_config")):
        return config  # a damaged file: the loader says what is wrong with it
    train = dict(config.get("train_config") or {})
    model = dict(config.get("model_config") or {})
    if not ({"beta", "kl_warmup_epochs"} & set(train) or (config.get("model") == "beta-vae" and "beta" in model)):
        return config
    schedules = dict(train.get("schedules") or {})
    beta, warmup = train.pop("beta", None), train.pop("kl_warmup_epochs", 0.0) or 0.0
    model_beta = model.pop("beta", None) if config.get("model") == "beta-vae" else None
    if "beta" not in schedules and (beta is not None or warmup or model_beta is not None):
        schedules["beta"] = beta_schedule(beta, warmup, default=1.0 if model_beta is None else model_beta)
    train["schedules"] = schedules
    return {**config, "train_config": train, "model_config": model}


def check_device(device: str) -> torch.device:
    """The torch device for 'cpu', 'cuda', 'cuda:N' or 'mps', refusing one this machine lacks."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ElbolabError(f"expected a device cpu, cuda, cuda:N or mps, got {device!r}") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if dev.type not in available:
        raise ElbolabError(f"expected a device cpu, cuda, cuda:N or mps, got {device!r}")
    if not available[dev.type]:
        raise ElbolabError(f"device {device!r} is not available on this machine (torch {torch.__version__}); "
                           "use --device cpu")
    return dev


def check_settings_for(model, config: TrainConfig, trainer_values=()) -> None:
    """Refuse settings the model would ignore: a schedule of a value it does not read (the trainer itself reads
    ``trainer_values``), or --mc-samples for a model that draws its own samples."""
    unread = sorted(set(config.schedules) - set(model.scheduled_values) - set(trainer_values))
    if unread:
        raise ElbolabError(
            f"{type(model).__name__} does not read the scheduled value(s) {unread}; it reads "
            f"{list(model.scheduled_values) or 'none'}. Drop them (they would have no effect)"
        )
    if config.mc_samples != 1 and not model.reads_mc_samples:
        raise ElbolabError(
            f"{type(model).__name__} does not use --mc-samples (got {config.mc_samples}); drop it"
            + (" (the IWAE's samples are --set k=...)" if "k" in {f.name for f in dataclasses.fields(model.config)}
               else "")
        )


"""Model registry: one decorator per model file feeds the CLI, checkpoint loading and the tests."""

from __future__ import annotations

from elbolab.errors import ElbolabError

_MODELS: dict[str, type] = {}


def register_model(name: str):
    """Class decorator: ``@register_model("vae")`` makes the model buildable by name."""

    def decorate(cls):
        if name in _MODELS and _MODELS[name] is not cls:
            raise ValueError(f"model name {name!r} is already registered by {_MODELS[name].__name__}")
        cls.registry_name = name
        _MODELS[name] = cls
        return cls

    return decorate


def available_models() -> dict[str, type]:
    """Every registered model, ``{name: class}``, sorted by name (what 'elbolab models' lists)."""
    return dict(sorted(_MODELS.items()))


def get_model_class(name: str) -> type:
    """The model class registered as ``name``; an unknown name raises ElbolabError listing the known ones."""
    if name not in _MODELS:
        raise ElbolabError(
            f"expected a model in {', '.join(sorted(_MODELS))}, got {name!r}; run 'elbolab models' to list them"
        )
    return _MODELS[name]


def build_model(name: str, config):
    """The model ``name`` built from its config (an instance of its ``config_class``)."""
    return get_model_class(name)(config)

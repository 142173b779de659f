"""Command-line flags built from the sampler's stage configs: one spelling for every field, ``--no-X`` for every optional stage.

Each field ``f`` of a stage's config becomes ``--STAGE-F`` (``--chain-num-levels``,
``--relax-cell``, ``--hop-rounds``); a field that may be None also takes the
word ``none``; a tuple or a :class:`~symat_jax.configs.CoordinationRule`
takes its values in order (``--retry-rule 3 4 1.8``). Setting a field of a
stage the preset lacks adds that stage with its defaults; ``--retry``,
``--relax`` and ``--hop`` add one as it is, ``--no-retry``, ``--no-relax``
and ``--no-hop`` drop it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from symat_jax import configs

STAGES: dict[str, type] = {"chain": configs.ChainConfig, "retry": configs.RetryConfig, "relax": configs.RelaxConfig,
                           "hop": configs.HopConfig}
OPTIONAL_STAGES = ("retry", "relax", "hop")
# Fields whose values are words: the parser offers (and checks) them.
CHOICES = {("chain", "step_schedule"): configs.STEP_SCHEDULES, ("chain", "noise_schedule"): configs.NOISE_SCHEDULES,
           ("relax", "cell"): ("fixed", "free")}
STAGE_ORDER = tuple(STAGES.values())


def _flag(prefix: str, field: str) -> str:
    return f"--{prefix}-{field.replace('_', '-')}"


def _dest(prefix: str, field: str) -> str:
    return f"{prefix}__{field}"


def _parts(hint: Any) -> tuple[Any, bool]:
    """Return ``(the type without None, whether None is allowed)``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _scalar(kind: type, text: str) -> Any:
    """Return ``text`` as a ``kind`` (argparse's message on failure)."""
    if kind is bool:
        if text.lower() in ("yes", "true", "1"):
            return True
        if text.lower() in ("no", "false", "0"):
            return False
        raise argparse.ArgumentTypeError(f"{text!r} is not yes or no")
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a {kind.__name__}") from None


def _add_field(group: argparse._ArgumentGroup, prefix: str, field: dataclasses.Field, hint: Any) -> None:
    """Add the flag of one config field."""
    kind, optional = _parts(hint)
    flag, dest = _flag(prefix, field.name), _dest(prefix, field.name)
    default = field.default if field.default is not dataclasses.MISSING else None
    none = " or 'none'" if optional else ""
    if dataclasses.is_dataclass(kind) or typing.get_origin(kind) is tuple:
        names = ([f.name.upper() for f in dataclasses.fields(kind)] if dataclasses.is_dataclass(kind)
                 else [f"V{i}" for i in range(len(typing.get_args(kind)))])
        # A field that may be None takes one word ('none') or all its values, so its count is checked later.
        group.add_argument(flag, dest=dest, nargs="+" if optional else len(names), default=None,
                           metavar="V" if optional else tuple(names),
                           help=f"{' '.join(names)}{none} (default: the preset's; built-in default {default})")
    elif (prefix, field.name) in CHOICES:
        group.add_argument(flag, dest=dest, default=None, choices=CHOICES[prefix, field.name],
                           help=f"default: the preset's; built-in default {default!r}")
    else:
        group.add_argument(flag, dest=dest, default=None, metavar=kind.__name__.upper(),
                           help=f"{kind.__name__}{none} (default: the preset's; built-in default {default!r})")


def add_stage_args(parser: argparse.ArgumentParser, stages: tuple[str, ...] = tuple(STAGES),
                   prior: bool = True, optional: tuple[str, ...] = OPTIONAL_STAGES) -> None:
    """Add the flags of ``stages`` (and of the prior and decoding) to ``parser``; ``optional`` stages get ``--X``/``--no-X``."""
    if prior:
        g = parser.add_argument_group("prior and decoding")
        g.add_argument("--prior", choices=tuple(configs.PRIOR_CONFIGS), default=None,
                       help="latents from N(0, T^2 I) ('standard', SPEC 4) or the run's fitted density ('fitted')")
        for name, cls in configs.PRIOR_CONFIGS.items():
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                _add_field(g, "prior", f, hints[f.name])
        hints = typing.get_type_hints(configs.DecodeConfig)
        for f in dataclasses.fields(configs.DecodeConfig):
            _add_field(g, "decode", f, hints[f.name])
    for name in stages:
        cls = STAGES[name]
        g = parser.add_argument_group(f"{name} stage ({cls.__name__})")
        if name in optional:
            g.add_argument(f"--{name}", dest=f"{name}__on", action="store_const", const=True, default=None,
                           help=f"add the {name} stage (with its defaults) where the preset has none")
            g.add_argument(f"--no-{name}", dest=f"{name}__on", action="store_const", const=False,
                           help=f"drop the preset's {name} stage")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add_field(g, name, f, hints[f.name])


def _value(hint: Any, raw: Any, flag: str) -> Any:
    """Return the config value of a flag's raw argparse value (ValueError naming the flag)."""
    kind, optional = _parts(hint)
    items = raw if isinstance(raw, list) else [raw]
    if optional and len(items) == 1 and str(items[0]).lower() == "none":
        return None
    try:
        if dataclasses.is_dataclass(kind):
            fields = dataclasses.fields(kind)
            hints = typing.get_type_hints(kind)
            if len(items) != len(fields):
                raise ValueError(f"takes {len(fields)} values ({' '.join(f.name for f in fields)})")
            return kind(*(_scalar(hints[f.name], t) for f, t in zip(fields, items)))
        if typing.get_origin(kind) is tuple:
            kinds = typing.get_args(kind)
            if len(items) != len(kinds):
                raise ValueError(f"takes {len(kinds)} values")
            return tuple(_scalar(k, t) for k, t in zip(kinds, items))
        return _scalar(kind, items[0])
    except (ValueError, TypeError, argparse.ArgumentTypeError) as err:
        raise ValueError(f"{flag}: {err}") from None


def _overrides(args: argparse.Namespace, prefix: str, cls: type) -> dict[str, Any]:
    """Return the fields of ``cls`` that ``args`` set."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        raw = getattr(args, _dest(prefix, f.name), None)
        if raw is not None:
            out[f.name] = _value(hints[f.name], raw, _flag(prefix, f.name))
    return out


def apply_stage_args(preset: configs.SamplerPreset, args: argparse.Namespace) -> configs.SamplerPreset:
    """Return ``preset`` with the stage, prior and decoding flags of ``args`` applied (ValueError naming a bad flag)."""
    try:
        prior = preset.prior
        if getattr(args, "prior", None) is not None and not isinstance(prior, configs.PRIOR_CONFIGS[args.prior]):
            prior = configs.PRIOR_CONFIGS[args.prior]()
        for name, cls in configs.PRIOR_CONFIGS.items():
            fields = _overrides(args, "prior", cls)
            if fields and not isinstance(prior, cls):
                raise ValueError(f"{', '.join(_flag('prior', k) for k in fields)}: a setting of the {name} prior "
                                 f"(the preset samples the {configs.PRIOR_NAMES[type(prior)]} one; add --prior {name})")
            if fields:
                prior = dataclasses.replace(prior, **fields)
        decode = dataclasses.replace(preset.decode, **_overrides(args, "decode", configs.DecodeConfig))
        out = dataclasses.replace(preset, prior=prior, decode=decode)
        for name, cls in STAGES.items():
            on = getattr(args, f"{name}__on", None)
            fields = _overrides(args, name, cls)
            current = out.stage(cls)
            if on is False:
                if fields:
                    raise ValueError(f"--no-{name} with {', '.join(_flag(name, k) for k in fields)}: choose one")
                out = out.without(cls)
                continue
            if current is None and not on and not fields:
                continue
            out = out.replace_stage(dataclasses.replace(current if current is not None else cls(), **fields))
        stages = sorted(out.stages, key=lambda s: STAGE_ORDER.index(type(s)))
        return dataclasses.replace(out, stages=tuple(stages))
    except TypeError as err:
        raise ValueError(str(err)) from None


def stage_configs(args: argparse.Namespace, stages: tuple[str, ...],
                  optional: tuple[str, ...] = OPTIONAL_STAGES) -> dict[str, Any]:
    """Return, per stage name in ``stages``, its config from ``args`` on the built-in defaults (None where an ``optional`` one is off)."""
    out: dict[str, Any] = {}
    try:
        for name in stages:
            cls = STAGES[name]
            on = getattr(args, f"{name}__on", None)
            fields = _overrides(args, name, cls)
            if on is False and fields:
                raise ValueError(f"--no-{name} with {', '.join(_flag(name, k) for k in fields)}: choose one")
            wanted = name not in optional or on or fields
            out[name] = cls(**fields) if wanted and on is not False else None
    except TypeError as err:
        raise ValueError(str(err)) from None
    return out

"""Typed merge configuration (pydantic v2), loadable from YAML.

Example ``merge.yaml``::

    method: ties
    base: ../zoo/tiny/base          # relative paths resolve against the YAML's folder
    experts: [../zoo/tiny/experts/vision/llm, ../zoo/tiny/experts/audio/llm]
    output: runs/ties
    params: {density: 0.2, lam: 1.0}
    exclude: ['layers\\.0\\.']       # keep these from the base as well
    device: auto
    seed: 0
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable, Optional, Union, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError

#: dtype names accepted by ``MergeConfig.dtype``.
DTYPES = ("float32", "float16", "bfloat16", "float64")
_PATH_FIELDS = ("base", "output")


class MergeConfig(BaseModel):
    """Everything :func:`workbench.engine.merge` needs.

    Attributes:
        method: a name of :data:`workbench.merging.METHODS`.
        base: the shared base model folder (θ0).
        experts: expert model folders or peft LoRA adapter folders (θi).
        output: the merged model folder to create.
        params: method parameters (unknown names are a :class:`ConfigError`).
        include: regexes of tensors to merge even where the defaults keep them from the base.
        exclude: regexes of tensors kept from the base (wins over ``include``).
        keep_defaults: apply the benchmark's default keep list (vision tower, projector,
            ``embed_tokens``, ``lm_head``, norms, biases), the model family's (see ``family``).
        family: the model family whose keep list applies (a name of
            :data:`workbench.families.FAMILIES`); ``None``: detected from the base's ``config.json``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
        seed: seed of the per-tensor generators (DARE etc.).
        dtype: output dtype of merged floating tensors; ``None`` keeps the inputs' dtype.
        max_shard_size: ``"2GB"``-style or bytes.
        copy_tokenizer: copy tokenizer files from the base.
        overwrite: replace an existing output folder (only once the new one is complete; only a
            folder a merge wrote - it holds ``workbench_merge.json`` - or an empty one).
        strict: refuse (instead of warning about) experts that look fine-tuned from another base
            (:data:`workbench.io.validate.FOREIGN_RATIO`) and LoRA adapters naming another base model.
        batch_size: most tensors per batched call of optimisation methods on CUDA (``None``: by memory).
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    method: str
    base: Path
    experts: list[Path] = Field(min_length=1)
    output: Path
    params: dict[str, Any] = Field(default_factory=dict)
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    keep_defaults: bool = True
    family: Optional[str] = None
    device: str = "auto"
    seed: int = 0
    dtype: Optional[str] = None
    max_shard_size: Union[int, str] = "2GB"
    copy_tokenizer: bool = True
    overwrite: bool = False
    strict: bool = False
    batch_size: Optional[int] = Field(default=None, ge=1)

    @field_validator("include", "exclude")
    @classmethod
    def _regexes(cls, v: list[str]) -> list[str]:
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"invalid regex {p!r}: {e}") from e
        return v

    @field_validator("family")
    @classmethod
    def _family(cls, v: Optional[str]) -> Optional[str]:
        from .families import FAMILIES

        if v is not None and v not in FAMILIES:
            raise ValueError(f"unknown model family {v!r}; known: {', '.join(FAMILIES)}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and v not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES} or null, got {v!r}")
        return v

    @field_validator("max_shard_size")
    @classmethod
    def _shard(cls, v: Union[int, str]) -> Union[int, str]:
        from .io.writer import parse_size

        parse_size(v)
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", v):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {v!r}")
        return v

    def keep_patterns(self) -> tuple[str, ...] | None:
        """The keep list of the base's model family (``family``, else detected from the base's
        ``config.json``: :func:`workbench.families.family_of`); ``None`` with ``keep_defaults=False``."""
        if not self.keep_defaults:
            return None
        from .families import family_of

        return family_of(self.base, self.family).keep_patterns

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dict(cls, data: dict[str, Any], *, root: str | Path | None = None) -> "MergeConfig":
        """Validate ``data``; relative paths resolve against ``root`` when given.

        Raises:
            ConfigError: listing every invalid or unknown field.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"a merge config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        if root is not None:
            root = Path(root)
            for key in _PATH_FIELDS:
                if isinstance(data.get(key), (str, Path)):
                    data[key] = _resolve(root, data[key])
            if isinstance(data.get("experts"), list):
                data["experts"] = [_resolve(root, e) if isinstance(e, (str, Path)) else e for e in data["experts"]]
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'config'}: {err['msg']}"
                                 for err in e.errors())
            raise ConfigError(f"invalid merge config: {problems}") from e

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MergeConfig":
        """Load a YAML file; relative paths resolve against the YAML file's folder."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid YAML in {path}: {e}") from e
        try:
            return cls.from_dict(data, root=path.resolve().parent)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    @classmethod
    def coerce(cls, config: "MergeConfig | dict | str | Path") -> "MergeConfig":
        """A :class:`MergeConfig` from itself, a dict, or a YAML path."""
        if isinstance(config, MergeConfig):
            return config
        if isinstance(config, dict):
            return cls.from_dict(config)
        if isinstance(config, (str, Path)):
            return cls.from_yaml(config)
        raise ConfigError(f"cannot build a MergeConfig from {type(config).__name__}")

    def to_yaml(self, path: str | Path) -> Path:
        """Write the config (absolute paths) as YAML."""
        import yaml

        path = Path(path)
        path.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))
        return path

    @property
    def max_shard_bytes(self) -> int:
        """``max_shard_size`` in bytes."""
        from .io.writer import parse_size

        return parse_size(self.max_shard_size)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "").replace("collections.abc.", "")


def typed_params(fn: Callable[..., Any], params: dict[str, Any], method: str) -> dict[str, Any]:
    """``params`` checked against (and converted to) the annotations of ``fn``'s keyword
    parameters - the method's signature is the source of truth - before any tensor is read.

    Values are validated by pydantic, strictly first, then in its lax mode, which converts what
    is exactly representable (``"1e-5"``, which PyYAML reads as a string; ``3.0`` or a numpy
    integer for an int) but never a bool for a number nor ``3.5`` for an int. Parameters
    without an annotation pass unchanged.

    Raises:
        ConfigError: naming the parameter, the expected type and the value given.
    """
    from pydantic import TypeAdapter

    try:
        hints = get_type_hints(fn)
    except Exception:  # unresolvable annotations: nothing to check against
        hints = {}
    out = dict(params)
    for key, value in params.items():
        hint = hints.get(key)
        if hint is None:
            continue
        adapter = TypeAdapter(hint)
        try:
            out[key] = adapter.validate_python(value, strict=True)
        except ValidationError:
            try:
                if isinstance(value, bool):  # True is no number
                    raise
                out[key] = adapter.validate_python(value)
            except ValidationError:
                raise ConfigError(f"parameter {key!r} of method {method!r} must be {_type_name(hint)}, got "
                                  f"{value!r} ({type(value).__name__})") from None
    return out


def _resolve(root: Path, p: str | Path) -> Path:
    p = Path(p).expanduser()
    return p if p.is_absolute() else (root / p)

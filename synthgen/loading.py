"""Strict loading for diffusers-layout models: a checkpoint that does not fit is an error."""

from __future__ import annotations

from synthgen.errors import CheckpointError


def _short(keys: list[str], n: int = 8) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


class StrictLoadMixin:
    """``from_pretrained`` that raises when keys are missing or unexpected (diffusers only warns).

    Shape mismatches already raise in diffusers. Pass ``strict=False`` to get diffusers'
    behaviour back (missing weights stay randomly initialised).
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, strict: bool = True, **kwargs):
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        missing, unexpected = list(info.get("missing_keys", [])), list(info.get("unexpected_keys", []))
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys: {_short(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {_short(unexpected)}")
            raise CheckpointError(
                f"{pretrained_model_name_or_path}: checkpoint does not match {cls.__name__} "
                f"({'; '.join(parts)}); check the config, or pass strict=False"
            )
        return (model, info) if want_info else model


def component_subfolder(source, name: str) -> str | None:
    """Where a pipeline component lives in ``source``: ``name`` (e.g. ``"vae"``, ``"transformer"``)
    for a pipeline-layout folder or a hub id (released pipelines keep each model in its
    subfolder), None for a bare model folder."""
    from pathlib import Path

    path = Path(source)
    if path.is_dir():
        return name if (path / name / "config.json").exists() else None
    if path.exists():
        raise CheckpointError(f"{source}: a file, not a model folder or hub id")
    return name


def check_pipeline_folder(folder) -> None:
    """Check a local pipeline folder before diffusers loads it: ``model_index.json`` is readable
    and every component it lists has its folder, a readable config and (for models) weights.

    Raises:
        CheckpointError: names the missing or broken file or component folder (``transformer/``,
            ``vae/``, ``scheduler/``, ...).
    """
    import json
    from pathlib import Path

    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise CheckpointError(f"{index}: missing; {folder} is not a pipeline folder (model_index.json, "
                              "transformer/, vae/, scheduler/ ...); build one with `synthgen assemble`")
    try:
        components = json.loads(index.read_text())
    except ValueError as e:
        raise CheckpointError(f"{index}: not valid JSON ({e})") from e
    if not isinstance(components, dict):
        raise CheckpointError(f"{index}: expected a JSON object of components")
    for name, entry in sorted(components.items()):
        if name.startswith("_") or not isinstance(entry, list) or not entry or entry[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            raise CheckpointError(f"{sub}/: component {name!r} is missing (model_index.json lists it)")
        configs = [sub / c for c in ("config.json", "scheduler_config.json", "tokenizer_config.json")
                   if (sub / c).is_file()]
        if not configs:
            raise CheckpointError(f"{sub}/: component {name!r} has no config.json")
        for c in configs:
            try:
                json.loads(c.read_text())
            except ValueError as e:
                raise CheckpointError(f"{c}: component {name!r} has a broken config ({e})") from e
        if not name.endswith(("scheduler", "tokenizer")) and not any(sub.glob("*.safetensors")) \
                and not any(sub.glob("*.bin")):
            raise CheckpointError(f"{sub}/: component {name!r} has no weights (*.safetensors)")

"""Save a compressed model and load it back onto a fresh model of the same architecture.

A checkpoint is a folder with

* ``model.safetensors``: the whole ``state_dict`` (shared tensors such as tied embeddings stored once);
* ``neuronmm_recipe.json``: what ``optimize()`` did: method, ratio, block, allocation, the library
  version, the model class, and for every replaced module its path, its pattern and its parameter
  shapes (so every rank is there).

Loading rebuilds the replaced modules from the recipe's shapes alone (no capture, no SVD, no
calibration), installs them into the fresh model, and loads the tensors strictly: the loaded model
computes exactly what the saved one did.  A recipe for another model class, a path the model lacks,
or tensors whose names or shapes disagree are refused with a message that names the mismatch.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from neuronmm_fx.api import REPORT_ATTRIBUTE, report_of
from neuronmm_fx.errors import CheckpointError
from neuronmm_fx.modules import Factors
from neuronmm_fx.passes.match import GATED, LOWRANK, PLAIN
from neuronmm_fx.patterns import pattern_of, pattern_of_module

RECIPE_FILE = "neuronmm_recipe.json"
WEIGHTS_FILE = "model.safetensors"
RECIPE_FORMAT = 2  # 2: replaced modules described by pattern; format 1 (by class name) still loads
READABLE_FORMATS = (1, 2)




def _describe(module: nn.Module) -> dict:
    """What the recipe stores to rebuild one replaced module: its pattern, activation and shapes."""
    if isinstance(module, nn.Identity):
        return {"kind": "Identity"}
    pattern = pattern_of_module(module)
    if pattern is None:
        raise CheckpointError(f"cannot describe a replaced module of type {type(module).__name__}")
    shapes = {name: list(p.shape) for name, p in module.named_parameters(recurse=False)}
    return {"pattern": pattern.name, "activation": getattr(module, "activation", None), "shapes": shapes}


def recipe(model: nn.Module) -> dict:
    """The JSON-able recipe of an optimized model."""
    import neuronmm_fx

    report = report_of(model)
    replaced = {}
    for site in report.sites:
        for path in site.replaced:
            replaced[path] = _describe(model.get_submodule(path))
    return {
        "format": RECIPE_FORMAT,
        "library": "neuronmm_fx",
        "version": neuronmm_fx.__version__,
        "model_class": type(model).__name__,
        "method": report.method,
        "allocation": report.allocation,
        "ratio": report.ratio,
        "block": report.block,
        "calibration": report.calibration,
        "replaced": replaced,
        "ranks": {m.name: m.rank for site in report.sites for m in site.matrices},
        "report": report.to_dict(),
    }


def save_compressed(model: nn.Module, folder: str | Path) -> Path:
    """Write ``model.safetensors`` and ``neuronmm_recipe.json`` into ``folder``; return the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RECIPE_FILE).write_text(json.dumps(recipe(model), indent=2))
    save_model(model, str(folder / WEIGHTS_FILE))
    return folder


def _empty(shape, dtype) -> torch.Tensor | None:
    return None if shape is None else torch.empty(shape, dtype=dtype)


_FORMAT_1_KINDS = {"LowRankLinear": LOWRANK, "CompressedMLP": (GATED, PLAIN)}  # recipes before "pattern"


def _build(description: dict, dtype: torch.dtype) -> nn.Module:
    """An empty module of the described pattern and shapes, for the saved tensors to load into."""
    kind = description.get("kind")
    if kind == "Identity":
        return nn.Identity()
    name = description.get("pattern")
    if name is None and kind in _FORMAT_1_KINDS:
        name = _FORMAT_1_KINDS[kind]
        if isinstance(name, tuple):
            name = name[0] if description.get("gated") else name[1]
    try:
        pattern = pattern_of(name)
    except KeyError as error:
        raise CheckpointError(f"unknown module {name or kind!r} in the recipe") from error
    shapes = description.get("shapes", {})
    prefix = "" if pattern.name == LOWRANK else "{role}_"
    factors = {
        role: Factors(
            *(_empty(shapes.get(prefix.format(role=role) + part), dtype) for part in ("u", "v", "bias"))
        )
        for role in pattern.roles
    }
    return pattern.build(description.get("activation"), factors)


def load_compressed(model: nn.Module, folder: str | Path) -> nn.Module:
    """Install the recipe's modules into a fresh ``model`` and load the saved tensors (in place)."""
    folder = Path(folder)
    recipe_path, weights_path = folder / RECIPE_FILE, folder / WEIGHTS_FILE
    if not recipe_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"{folder} is not a neuronmm_fx checkpoint (needs {RECIPE_FILE} and {WEIGHTS_FILE})"
        )
    saved = json.loads(recipe_path.read_text())
    if saved.get("library") != "neuronmm_fx" or saved.get("format") not in READABLE_FORMATS:
        raise CheckpointError(
            f"{recipe_path} is not a neuronmm_fx recipe of format {' or '.join(map(str, READABLE_FORMATS))}"
        )
    if saved["model_class"] != type(model).__name__:
        raise CheckpointError(f"the checkpoint is for a {saved['model_class']}, not a {type(model).__name__}")
    _check_architecture(model, saved["report"])
    dtype = next(model.parameters()).dtype
    plan = {path: _build(description, dtype) for path, description in saved["replaced"].items()}
    originals = []
    try:
        for path, module in plan.items():
            parent_path, _, name = path.rpartition(".")
            try:
                parent = model.get_submodule(parent_path)
                original = getattr(parent, name)
            except AttributeError:
                raise CheckpointError(
                    f"the checkpoint replaces {path!r}, which this model does not have"
                ) from None
            originals.append((parent, name, original))
            setattr(parent, name, module)
        try:
            missing, unexpected = load_model(model, str(weights_path), strict=False)
        except RuntimeError as error:
            raise CheckpointError(f"the checkpoint's tensors do not fit this model: {error}") from None
        if missing or unexpected:
            raise CheckpointError(
                f"the checkpoint's tensors do not fit this model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
    except BaseException:
        for parent, name, original in reversed(originals):
            setattr(parent, name, original)
        raise
    setattr(model, REPORT_ATTRIBUTE, _report_from(saved))
    return model


def _check_architecture(model: nn.Module, report: dict) -> None:
    """Every weight the checkpoint compressed must exist in ``model`` with the same shape."""
    for site in report["sites"]:
        for matrix in site["matrices"]:
            for path in matrix["name"].split("+"):  # low-rank pairs are named first+second
                path, _, sliced = path.partition("[")
                try:
                    module = model.get_submodule(path)
                except AttributeError:
                    raise CheckpointError(
                        f"the checkpoint compressed {path!r}, which this model does not have"
                    ) from None
                weight = getattr(module, "weight", None)
                if weight is None or "+" in matrix["name"]:
                    continue
                expected = {matrix["in_features"], matrix["out_features"] * (2 if sliced else 1)}
                if set(weight.shape) != expected:
                    raise CheckpointError(
                        f"{path}.weight is {tuple(weight.shape)} in this model but the checkpoint compressed "
                        f"a {matrix['in_features']}×{matrix['out_features']} matrix there"
                    )


def _report_from(saved: dict):
    from neuronmm_fx.report import MatrixReport, OptimizeReport, SiteReport, SkippedSite

    data = saved["report"]
    sites = [
        SiteReport(**{**s, "matrices": [MatrixReport(**m) for m in s["matrices"]]}) for s in data["sites"]
    ]
    skipped = [SkippedSite(**s) for s in data["skipped"]]
    fields = {k: v for k, v in data.items() if k not in ("sites", "skipped", "params_removed")}
    return OptimizeReport(**fields, sites=sites, skipped=skipped)

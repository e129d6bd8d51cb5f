"""Save a compressed model; load it back onto a fresh model of the same architecture, or rebuild it
from the folder alone.

A checkpoint is a folder with

* ``model.safetensors``: the whole ``state_dict`` (shared tensors such as tied embeddings stored once);
* ``config.json`` (a Hugging Face model's config, describing the model as it is) and, when a
  tokenizer is given, its files: what :func:`from_pretrained` builds the model from, on the meta
  device, so that no dense weight is ever allocated;
* ``neuronmm_recipe.json``: what ``optimize()`` did: method, ratio, block, allocation, the library
  version, the model class, and for every replaced module its path, its pattern and its parameter
  shapes (so every rank is there).  Format 4 stores the gate and up first factors of a gated MLP
  whose two branches are low-rank as one ``gate_up_u`` (their column blocks); format 3 checkpoints,
  which keep ``gate_u`` and ``up_u`` apart, still load, into modules that keep them apart.

Loading rebuilds the replaced modules from the recipe's shapes alone (no capture, no SVD, no
calibration), installs them into the fresh model, and loads the tensors strictly: the loaded model
computes exactly what the saved one did.

Integrity: the recipe (format 3 on) records every saved tensor's dtype, shape and SHA-256.  Loading
checks, before anything in the model changes, that the recipe is complete and consistent (known
patterns and activations, factor shapes that chain), that the weights file parses and every tensor
matches its digest, dtype and shape, and that the model with the replacements installed expects
exactly those tensors.  Anything else is refused with a :class:`CheckpointError` naming the
mismatch, and the model is left exactly as it was.  Saving never overwrites an existing file or a
non-empty folder unless ``overwrite=True``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from neuronmm_fx.api import REPORT_ATTRIBUTE, report_of
from neuronmm_fx.errors import CheckpointError
from neuronmm_fx.install import set_submodule
from neuronmm_fx.modules import CompressedMLP, Factors
from neuronmm_fx.passes.match import GATED, LOWRANK, PLAIN
from neuronmm_fx.patterns import pattern_of, pattern_of_module

RECIPE_FILE = "neuronmm_recipe.json"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# 4: gate/up first factors joint; 3: tensor digests; 2: replaced modules by pattern; 1: by class name
RECIPE_FORMAT = 4
READABLE_FORMATS = (3, 4)  # earlier recipes carry no digests: load them with the version that wrote them
_RECIPE_KEYS = ("format", "library", "model_class", "replaced", "tensors", "report", "integrity")


def _describe(module: nn.Module) -> dict:
    """What the recipe stores to rebuild one replaced module: its pattern, activation and shapes."""
    if isinstance(module, nn.Identity):
        return {"kind": "Identity"}
    pattern = pattern_of_module(module)
    if pattern is None:
        raise CheckpointError(f"cannot describe a replaced module of type {type(module).__name__}")
    shapes = {name: list(p.shape) for name, p in module.named_parameters(recurse=False)}
    return {"pattern": pattern.name, "activation": getattr(module, "activation", None), "shapes": shapes}


def _digest(tensor: torch.Tensor) -> str:
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def _tensor_table(tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    return {
        name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "sha256": _digest(t)}
        for name, t in sorted(tensors.items())
    }


def recipe(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict:
    """The JSON-able recipe of an optimized model, with the table of ``tensors`` (the ones saved)."""
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
        "tensors": _tensor_table(tensors),
        "ranks": {m.name: m.rank for site in report.sites for m in site.matrices},
        "report": report.to_dict(),
    }


def _tie_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names grouped by the tensor they share (tied embeddings are one group of two)."""
    groups: dict[tuple, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_meta:  # no storage to compare: tied tensors are one object
            key: tuple = ("meta", id(tensor))
        else:
            key = (
                tensor.untyped_storage().data_ptr(),
                tensor.storage_offset(),
                tuple(tensor.shape),
                tensor.dtype,
            )
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def save_compressed(model: nn.Module, folder: str | Path, *, tokenizer=None, overwrite: bool = False) -> Path:
    """Write ``model.safetensors`` and ``neuronmm_recipe.json`` into ``folder``; return the folder.

    A Hugging Face model's config goes beside them as ``config.json`` (describing the model as it is:
    a GGUF-loaded model's ``quantization_config`` is left out, its weights being dequantized), and
    ``tokenizer``'s files when one is given, so that :func:`from_pretrained` can rebuild the model
    from the folder alone.

    Refuses (``CheckpointError``) an existing file, or a non-empty folder unless ``overwrite=True``,
    before writing anything; a failure while writing removes what was written."""
    folder = Path(folder)
    report_of(model)  # a model optimize() did not produce is refused here, before any file exists
    if tokenizer is not None and not _has_hf_config(model):
        raise CheckpointError(
            "a tokenizer is saved beside a Hugging Face model's config; this model has none"
        )
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"cannot save into {folder}: it is a file")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise CheckpointError(f"{folder} is not empty; pass overwrite=True to replace its checkpoint")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / WEIGHTS_FILE, folder / RECIPE_FILE]
    try:
        save_model(model, str(written[0]), force_contiguous=True)  # dense weights may be transposed views
        # the table describes what save_model wrote (it keeps one name of each group of tied tensors)
        described = recipe(model, load_file(str(written[0])))
        described["standalone"] = _write_standalone(model, folder, tokenizer, written)
        described["integrity"] = _integrity(described)
        written[1].write_text(json.dumps(described, indent=2))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _write_standalone(model: nn.Module, folder: Path, tokenizer, written: list[Path]) -> dict | None:
    """Write the model's config (and the tokenizer's files) for :func:`from_pretrained`; return the
    recipe's note of them (None for a model without a Hugging Face config).  Every file written is
    appended to ``written``."""
    if not _has_hf_config(model):
        return None
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # GGUF: the weights saved here are dequantized
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.dtype = next(model.parameters()).dtype
    path = folder / CONFIG_FILE
    written.append(path)
    config.to_json_file(str(path), use_diff=False)
    tokenizer_files: list[str] = []
    if tokenizer is not None:
        before = set(folder.iterdir())
        try:
            tokenizer.save_pretrained(str(folder))
        finally:
            written.extend(set(folder.iterdir()) - before)
        tokenizer_files = sorted(p.name for p in set(folder.iterdir()) - before)
    return {"config": CONFIG_FILE, "config_sha256": _file_digest(path), "tokenizer_files": tokenizer_files}


def _has_hf_config(model: nn.Module) -> bool:
    return callable(getattr(getattr(model, "config", None), "to_json_file", None))


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
    if not isinstance(shapes, dict):
        raise CheckpointError("the recipe's shapes are not a table")
    joint = shapes.get(CompressedMLP.JOINT_FIRST)
    if joint is not None:  # format 4: the gate and up first factors are the column blocks of one matrix
        shapes = dict(shapes)
        for role in ("gate", "up"):
            second = shapes.get(f"{role}_v")
            if not (isinstance(joint, list) and isinstance(second, list) and joint and second):
                raise CheckpointError(f"the recipe gives {CompressedMLP.JOINT_FIRST} without {role}_v")
            shapes[f"{role}_u"] = [joint[0], second[0]]
    prefix = "" if pattern.name == LOWRANK else "{role}_"
    factors = {
        role: Factors(
            *(_empty(shapes.get(prefix.format(role=role) + part), dtype) for part in ("u", "v", "bias"))
        )
        for role in pattern.roles
    }
    if pattern.name == GATED:  # the layout the tensors were saved in: joint first factors or apart
        activation = description.get("activation")
        return CompressedMLP(
            activation, factors["gate"], factors["down"], up=factors["up"], share_first=joint is not None
        )
    return pattern.build(description.get("activation"), factors)


def _integrity(saved: dict) -> str:
    """SHA-256 of what loading relies on: the model class, the replaced modules' descriptions
    (patterns, activations, shapes), the tensor table (itself holding each tensor's digest), the
    report (its matrices are checked against the model and it is attached to the loaded model) and,
    where there is one, the note of the config file (with its digest)."""
    relied = {key: saved.get(key) for key in ("model_class", "replaced", "tensors", "report")}
    if saved.get("standalone") is not None:  # format 4 on: the config a standalone load builds from
        relied["standalone"] = saved["standalone"]
    return hashlib.sha256(json.dumps(relied, sort_keys=True).encode()).hexdigest()


def read_report(folder: str | Path):
    """The :class:`~neuronmm_fx.report.OptimizeReport` a checkpoint was saved with, and its recipe,
    read without loading the weights (the recipe's own integrity is checked, the tensors' is not:
    :func:`from_pretrained` and :func:`load_compressed` check those)."""
    saved = _read_recipe(Path(folder))
    try:
        return _report_from(saved), saved
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"the recipe's report is malformed ({type(error).__name__}: {error})") from None


def _read_recipe(folder: Path) -> dict:
    """The recipe of a checkpoint folder: valid JSON of a readable format, complete and unedited."""
    recipe_path, weights_path = folder / RECIPE_FILE, folder / WEIGHTS_FILE
    if not recipe_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"{folder} is not a neuronmm_fx checkpoint (needs {RECIPE_FILE} and {WEIGHTS_FILE})"
        )
    try:
        saved = json.loads(recipe_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{recipe_path} is not valid JSON ({error})") from None
    if not isinstance(saved, dict) or saved.get("library") != "neuronmm_fx":
        raise CheckpointError(f"{recipe_path} is not a neuronmm_fx recipe")
    if saved.get("format") not in READABLE_FORMATS:
        raise CheckpointError(
            f"{recipe_path} has recipe format {saved.get('format')!r}; this version reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))} (older checkpoints carry no tensor digests: re-save "
            "them)"
        )
    missing = [key for key in _RECIPE_KEYS if key not in saved]
    if missing:
        raise CheckpointError(f"{recipe_path} lacks {', '.join(missing)}")
    if saved["integrity"] != _integrity(saved):
        raise CheckpointError(
            f"{recipe_path} was edited after saving: its model class, replaced modules or tensor table "
            "no longer match its integrity digest"
        )
    return saved


def _read(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The recipe and the tensors of a checkpoint folder, each verified against the other."""
    saved = _read_recipe(folder)
    weights_path = folder / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights_path))
    except Exception as error:  # truncated, not safetensors, unreadable
        raise CheckpointError(f"{weights_path} is not a readable safetensors file ({error})") from None
    table = saved["tensors"]
    if not isinstance(table, dict) or set(table) != set(tensors):
        extra, absent = sorted(set(tensors) - set(table or {})), sorted(set(table or {}) - set(tensors))
        raise CheckpointError(
            f"{weights_path} and the recipe disagree on the tensors: not in the recipe {extra[:5]}, "
            f"not in the file {absent[:5]}"
        )
    for name, tensor in tensors.items():
        entry = table[name]
        if not isinstance(entry, dict):
            raise CheckpointError(f"the recipe's entry for {name} is malformed")
        dtype = str(tensor.dtype).removeprefix("torch.")
        if entry.get("dtype") != dtype or entry.get("shape") != list(tensor.shape):
            raise CheckpointError(
                f"{name} is {dtype} {list(tensor.shape)} in {WEIGHTS_FILE} but the recipe says "
                f"{entry.get('dtype')} {entry.get('shape')}"
            )
        if entry.get("sha256") != _digest(tensor):
            raise CheckpointError(
                f"{name} does not match its SHA-256 digest in the recipe: the file was changed"
            )
    return saved, tensors


def _check_module(path: str, module: nn.Module) -> None:
    """The recipe's description must be self-consistent: factor shapes chain ``(in, r)·(r, out)``."""
    if isinstance(module, nn.Identity):
        return
    for role in getattr(module, "roles", ("",)):
        if isinstance(module, CompressedMLP):
            factors = module.factors(role)
            u, v, bias = factors.u, factors.v, factors.bias
        else:
            u, v, bias = module.u, module.v, module.bias
        if u is None:
            raise CheckpointError(f"the recipe gives no factors for {path} ({role or 'lowrank'})")
        out = u.shape[1] if v is None else v.shape[1]
        if u.dim() != 2 or (v is not None and (v.dim() != 2 or v.shape[0] != u.shape[1])):
            raise CheckpointError(f"the recipe's factors for {path} ({role or 'lowrank'}) do not chain")
        if bias is not None and list(bias.shape) != [out]:
            raise CheckpointError(f"the recipe's bias for {path} ({role or 'lowrank'}) has the wrong size")


def load_compressed(model: nn.Module, folder: str | Path) -> nn.Module:
    """Install the recipe's modules into a fresh ``model`` and load the saved tensors (in place).

    Everything is checked before the model changes (see the module docstring); a refusal leaves
    every tensor, module and attribute of ``model`` as it was."""
    saved, tensors = _read(Path(folder))
    return _load_into(model, saved, tensors, assign=False)


def _load_into(model: nn.Module, saved: dict, tensors: dict[str, torch.Tensor], *, assign: bool) -> nn.Module:
    """Check, then install the recipe's modules into ``model`` and load ``tensors``: copied into the
    model's tensors, or with ``assign`` adopted as they are (a model built on the meta device)."""
    if saved["model_class"] != type(model).__name__:
        raise CheckpointError(f"the checkpoint is for a {saved['model_class']}, not a {type(model).__name__}")
    try:  # built before anything changes: a malformed report must not fail after the install
        report = _report_from(saved)
        _check_architecture(model, saved["report"])
    except CheckpointError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"the recipe's report is malformed ({type(error).__name__}: {error})") from None
    dtype = next(model.parameters()).dtype
    plan: dict[str, nn.Module] = {}
    for path, description in saved["replaced"].items():
        if not isinstance(description, dict):
            raise CheckpointError(f"the recipe's description of {path!r} is malformed")
        try:
            plan[path] = _build(description, dtype)
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"the recipe's description of {path!r} is invalid ({error})") from None
        _check_module(path, plan[path])
    _check_fit(model, plan, tensors)
    # nothing has changed so far; from here on only checked values are installed
    originals: list[tuple[str, nn.Module]] = []
    try:
        for path, module in plan.items():
            originals.append((path, set_submodule(model, path, module)))
        # the tensors read and verified above: the file is not read a second time.  Names absent
        # from them are the tied duplicates save_model dropped (_check_fit checked this).
        model.load_state_dict(tensors, strict=False, assign=assign)
    except BaseException:
        for path, original in reversed(originals):
            set_submodule(model, path, original)
        raise
    setattr(model, REPORT_ATTRIBUTE, report)
    return model


def _check_fit(model: nn.Module, plan: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """The model with ``plan``'s modules installed must take exactly ``tensors`` (each group of tied
    names at least once, as ``save_model`` writes them), each with the right shape and dtype; checked
    without installing anything."""
    for path in plan:
        parent_path, _, name = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path)
        except AttributeError:
            parent = None
        if parent is None or not hasattr(parent, name):
            raise CheckpointError(f"the checkpoint replaces {path!r}, which this model does not have")
    replaced = tuple(f"{path}." for path in plan)
    current = model.state_dict()
    groups = [[n for n in group if not n.startswith(replaced)] for group in _tie_groups(model)]
    groups = [group for group in groups if group]
    targets = {name: current[name] for group in groups for name in group}
    for path, module in plan.items():
        for key, value in module.state_dict().items():
            targets[f"{path}.{key}"] = value
            groups.append([f"{path}.{key}"])
    surplus = sorted(set(tensors) - set(targets))
    absent = [group[0] for group in groups if not any(name in tensors for name in group)]
    if absent or surplus:
        raise CheckpointError(
            f"the checkpoint's tensors do not fit this model: missing {absent[:5]}, unexpected {surplus[:5]}"
        )
    for name, value in tensors.items():
        target = targets[name]
        if tuple(value.shape) != tuple(target.shape) or value.dtype != target.dtype:
            raise CheckpointError(
                f"{name} is {value.dtype} {tuple(value.shape)} in the checkpoint but this model expects "
                f"{target.dtype} {tuple(target.shape)}"
            )


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


def from_pretrained(folder: str | Path) -> nn.Module:
    """The compressed model saved in ``folder``, rebuilt from the folder alone (no original model).

    The model is constructed from ``config.json`` on the meta device, so no dense weight is ever
    allocated and no SVD runs; the recipe's modules go in and the verified tensors of
    ``model.safetensors`` are adopted as its parameters, tied ones tied again; tables computed from
    the config (rotary frequencies) are computed again.  The model is returned in eval mode with its
    report attached, computing exactly what the saved one did.

    Refused with a :class:`CheckpointError`: a folder that is not a neuronmm_fx checkpoint, one
    saved without a config (a model that is not a Hugging Face model: build it and use
    :func:`load_compressed`), a config file changed after saving, a model class transformers does not
    have, and any check :func:`load_compressed` makes.
    """
    folder = Path(folder)
    saved, tensors = _read(folder)
    standalone = saved.get("standalone")
    if not isinstance(standalone, dict):
        raise CheckpointError(
            f"{folder} was saved without the model's config, so it cannot be loaded on its own: build the "
            "model and call load_compressed(model, folder)"
        )
    config_path = folder / CONFIG_FILE
    if not config_path.is_file() or _file_digest(config_path) != standalone.get("config_sha256"):
        raise CheckpointError(f"{config_path} is missing or was changed after saving")
    try:
        import transformers
    except ImportError as error:
        raise CheckpointError(
            f"from_pretrained needs transformers (pip install 'neuronmm_fx[models]'): {error}"
        ) from None
    model_class = getattr(transformers, saved["model_class"], None)
    if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
        raise CheckpointError(f"transformers has no model class {saved['model_class']!r}")
    config = transformers.AutoConfig.from_pretrained(str(folder))
    dtype = _saved_dtype(tensors)
    default_dtype = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)  # the parameters' dtype, which the load checks against
        with torch.device("meta"):  # shapes only: not one weight is allocated
            model = model_class(config)
    finally:
        torch.set_default_dtype(default_dtype)
    replaced = tuple(f"{path}." for path in saved["replaced"])
    groups = ([name for name in group if not name.startswith(replaced)] for group in _tie_groups(model))
    tied = [group for group in groups if len(group) > 1]  # e.g. the LM head and the embedding
    _load_into(model, saved, tensors, assign=True)
    for group in tied:  # the checkpoint holds one name of each group: the others take that tensor
        loaded = next(name for name in group if name in tensors)
        for name in group:
            module_path, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(module_path), attribute, model.get_parameter(loaded))
    _compute_buffers(model, config)
    left = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"the checkpoint leaves {len(left)} tensor(s) without values: {left[:5]}")
    return model.eval()


def _compute_buffers(model: nn.Module, config) -> None:
    """Give real values to the buffers the meta construction left empty: the tables a module computes
    from the config (rotary frequencies), never saved.  Each module holding such a buffer, which must
    have no parameters, is built again on the CPU from the config and its buffers taken."""
    for path, module in model.named_modules():
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if any(True for _ in module.parameters()):
            raise CheckpointError(f"{path} holds parameters and buffers that were never saved")
        try:
            with torch.device("cpu"):
                fresh = type(module)(config=config)
        except Exception as error:  # the constructor wants more than the config
            raise CheckpointError(
                f"cannot compute the buffers of {path} ({type(module).__name__}) from the config: {error}"
            ) from None
        for name, buffer in module.named_buffers(recurse=False):
            value = fresh.get_buffer(name) if buffer.is_meta else buffer
            if value.shape != buffer.shape:
                raise CheckpointError(f"{path}.{name} computed from the config has another shape")
            setattr(module, name, value)  # stays the buffer it was, persistent or not


def _saved_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The floating dtype of the saved parameters (they share one: ``optimize`` keeps the model's)."""
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) != 1:
        raise CheckpointError(
            f"the checkpoint's floating tensors do not share one dtype: {sorted(map(str, dtypes))}"
        )
    return dtypes.pop()

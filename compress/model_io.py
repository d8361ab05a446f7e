"""Loading the user's model and saving / reloading stage states.

Accepted model files:

* a ``state_dict`` plus the recipe's ``model.factory``, loaded with ``weights_only=True``;
* a TorchScript archive;
* a fully pickled ``nn.Module``, only with ``trust_model=True``: unpickling runs arbitrary code.

A stage state is saved as a ``state_dict`` (``model.pt``), the quantization and masks
(``extras.pt``, tensors only) and ``state.json``. It reloads by building the base
architecture again and resizing parameters whose shape a stage changed (structured
pruning), so a reload never needs to unpickle code.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from compress.artifacts import atomic_write, atomic_write_json
from compress.batchnorm import EXTRAS_KEY as BATCHNORM_FOLDED
from compress.batchnorm import replay_folds
from compress.errors import ModelLoadError
from compress.imports import import_callable
from compress.qtensor import quantized_from_dict
from compress.smoothing import restore_smoothing
from compress.state import ModelState

log = logging.getLogger(__name__)

TRUST_HINT = (
    "Unpickling a whole nn.Module runs arbitrary code from the file. Safer: save "
    "model.state_dict() and name the architecture in the recipe (model: {factory: 'pkg.module:fn'}), "
    "or save a TorchScript archive with torch.jit.save(torch.jit.script(model), path). "
    "If you trust this file, pass --trust-model."
)


@dataclass
class LoadedModel:
    module: nn.Module
    kind: str  # "state_dict" | "torchscript" | "pickle"
    rebuild: Callable[[], nn.Module]  # a fresh copy of the base architecture


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def _pickled_global(err: BaseException) -> str | None:
    """The Python global a ``weights_only`` load refused, or None if it refused nothing.

    torch words this "Unsupported global: GLOBAL x.Y was not an allowed global" or, for
    modules it blocks outright (``os``, ``subprocess``...), "unsupported GLOBAL x.Y whose
    module x is blocked".
    """
    m = re.search(r"unsupported global:?\s*(?:GLOBAL\s+)?([\w.]+)", str(err), re.IGNORECASE)
    return m.group(1) if m else None


def load_model(
    path: Path,
    factory: str | None,
    kwargs: dict,
    trust_model: bool = False,
    trusted_callables: frozenset[str] | set[str] = frozenset(),
) -> LoadedModel:
    """Load the user's model (see the module docstring for the accepted files).

    A TorchScript archive loads into the eager architecture of ``factory`` when the recipe
    names one (its weights are taken from the archive), so every stage gets a plain module.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    if _is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:
            raise ModelLoadError(f"{path}: cannot load TorchScript archive ({_first_line(err)})") from err
        if factory:
            sd = {k: v.detach().clone() for k, v in module.state_dict().items()}
            return _from_state_dict(path, sd, factory, kwargs, trusted_callables, kind="torchscript")
        _check_finite(path, module.state_dict())
        return LoadedModel(module.eval(), "torchscript", lambda: torch.jit.load(str(path), map_location="cpu"))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # Only a pickle that names Python classes is "a pickled object"; anything else
        # (random bytes, a truncated file) is simply not a model file.
        name = _pickled_global(err)
        if name is None:
            raise ModelLoadError(f"{path}: not a PyTorch model file ({_first_line(err)})") from err
        if not trust_model:
            raise ModelLoadError(
                f"{path} holds a pickled Python object ({name}), not just weights. {TRUST_HINT}"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err2:
            raise ModelLoadError(f"{path}: cannot unpickle model ({_first_line(err2)})") from err2
        if not isinstance(obj, nn.Module):
            raise ModelLoadError(f"{path}: the pickle holds a {type(obj).__name__}, not an nn.Module") from None
        _check_finite(path, obj.state_dict())
        return LoadedModel(obj.eval(), "pickle", lambda: torch.load(path, map_location="cpu", weights_only=False))
    except Exception as err:  # random bytes, truncated zip, ...
        raise ModelLoadError(f"{path}: not a PyTorch model file ({_first_line(err)})") from err

    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # common checkpoint layout
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path}: expected a state_dict (name -> tensor), got {type(obj).__name__}")
    if not factory:
        raise ModelLoadError(
            f"{path} holds a state_dict; name the architecture that loads it with model.factory "
            "in the recipe, e.g. model: {factory: 'compress.zoo:mnist1d_cnn', input_shape: [1, 40]}"
        )
    return _from_state_dict(path, obj, factory, kwargs, trusted_callables, kind="state_dict")


def _from_state_dict(
    path: Path, sd: dict, factory: str, kwargs: dict, trusted: frozenset[str] | set[str], kind: str
) -> LoadedModel:
    build = import_callable(factory, what="model factory", error=ModelLoadError, trusted=trusted)

    def rebuild() -> nn.Module:
        try:
            return build(**kwargs)
        except Exception as err:
            raise ModelLoadError(f"model factory {factory} failed: {type(err).__name__}: {err}") from err

    module = rebuild()
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"model factory {factory} returned a {type(module).__name__}, not an nn.Module")
    _check_finite(path, sd)
    try:
        module.load_state_dict(sd, strict=True)
    except RuntimeError as err:
        raise ModelLoadError(
            f"{path} does not fit the architecture from {factory}: {_mismatch(module, sd, err)}"
        ) from None
    return LoadedModel(module.eval(), kind, rebuild)


def _mismatch(module: nn.Module, sd: dict, err: RuntimeError, limit: int = 8) -> str:
    """Which keys are missing, unexpected or of another shape (torch's own message is long
    and its first line names none of them)."""
    want = module.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    shapes = [
        f"{k} {list(sd[k].shape)} vs {list(want[k].shape)}" for k in sd if k in want and sd[k].shape != want[k].shape
    ]

    def show(keys: list[str]) -> str:
        more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
        return ", ".join(keys[:limit]) + more

    parts = []
    if missing:
        parts.append(f"missing keys: {show(missing)}")
    if extra:
        parts.append(f"unexpected keys: {show(extra)}")
    if shapes:
        parts.append(f"shape mismatch (file vs architecture): {show(shapes)}")
    return "; ".join(parts) or _first_line(err, 400)


def _check_finite(path: Path, sd: dict) -> None:
    """NaN or infinite weights make every later number meaningless: refuse them up front."""
    bad = [
        k
        for k, v in sd.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if bad:
        raise ModelLoadError(f"{path}: weights hold NaN or infinite values in {', '.join(bad[:8])}")


def check_forward(module: nn.Module, input_shape: tuple[int, ...], example: torch.Tensor | None = None) -> None:
    """Fail early, with the shape in the message, if the model does not run on its input.

    ``example`` (a real sample, when the recipe has data) is used instead of zeros.
    """
    x = example if example is not None else torch.zeros(input_shape)
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as err:
        raise ModelLoadError(
            f"the model's forward fails on the declared input_shape {list(input_shape)}: {_first_line(err)}"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise ModelLoadError(f"the model must return one tensor; it returned {type(out).__name__}")


def _first_line(err: BaseException, limit: int = 200) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:limit]


# ----------------------------------------------------------------------------- stage states

MODEL_FILE, EXTRAS_FILE, STATE_FILE = "model.pt", "extras.pt", "state.json"


def save_state(state: ModelState, folder: Path) -> list[Path]:
    """Write the state into ``folder`` atomically; return the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in state.module.state_dict().items()}
    extras = {
        "quant": {name: qt.to_dict() for name, qt in state.quant.items()},
        "masks": {name: m.bool() for name, m in state.masks.items()},
    }
    meta = {
        "input_shape": list(state.input_shape),
        "lineage": state.lineage,
        "extras": state.extras,
        "shapes": {k: list(v.shape) for k, v in sd.items()},
    }
    files = [
        atomic_write(folder / MODEL_FILE, lambda p: torch.save(sd, p)),
        atomic_write(folder / EXTRAS_FILE, lambda p: torch.save(extras, p)),
        atomic_write_json(folder / STATE_FILE, meta),
    ]
    return files


def load_state(folder: Path, rebuild: Callable[[], nn.Module]) -> ModelState:
    """Reload a state saved by ``save_state`` onto a fresh base architecture."""
    sd = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    extras = torch.load(folder / EXTRAS_FILE, map_location="cpu", weights_only=True)
    meta = json.loads((folder / STATE_FILE).read_text())
    module = rebuild()
    if meta["extras"].get(BATCHNORM_FOLDED):  # the quantize stage folded BatchNorm layers away
        replay_folds(module, meta["extras"][BATCHNORM_FOLDED])
    resize_to_state_dict(module, sd)
    restore_smoothing(module, sd)  # the quantize stage's SmoothQuant scaling (compress.smoothing)
    module.load_state_dict(sd, strict=True)
    module.eval()
    return ModelState(
        module=module,
        input_shape=tuple(meta["input_shape"]),
        quant={k: quantized_from_dict(v) for k, v in extras["quant"].items()},
        masks=dict(extras["masks"]),
        lineage=meta["lineage"],
        extras=meta["extras"],
    )


# Size attributes a layer's weight shape determines: attribute -> weight dimension.
_WEIGHT_SIZE_ATTRS = {"out_features": 0, "in_features": 1, "out_channels": 0, "num_embeddings": 0, "embedding_dim": 1}


def resize_to_state_dict(module: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Give ``module`` the parameter/buffer shapes of ``sd`` (structured pruning shrinks layers).

    The functional forward of Linear/Conv/Norm layers reads the tensors, not the size
    attributes, so replacing the tensors is enough; the size attributes are updated so the
    module prints and re-exports truthfully.
    """
    if isinstance(module, torch.jit.ScriptModule):
        return
    current = module.state_dict()
    for key, tensor in sd.items():
        if key not in current or current[key].shape == tensor.shape:
            continue
        owner_name, _, attr = key.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        old = getattr(owner, attr)
        new = torch.empty(tensor.shape, dtype=tensor.dtype)
        if isinstance(old, nn.Parameter):
            setattr(owner, attr, nn.Parameter(new, requires_grad=old.requires_grad))
        else:
            owner.register_buffer(attr, new)
        if attr == "weight":
            for size_attr, dim in _WEIGHT_SIZE_ATTRS.items():
                if hasattr(owner, size_attr) and tensor.dim() > dim:
                    setattr(owner, size_attr, tensor.shape[dim])
            if hasattr(owner, "in_channels") and tensor.dim() > 1:  # conv weight: (out, in / groups, ...)
                # torch's stubs type Module.__setattr__'s value as Tensor | Module; it stores any value
                owner.in_channels = tensor.shape[1] * getattr(owner, "groups", 1)  # type: ignore[assignment]
        if hasattr(owner, "num_features") and attr in ("weight", "bias", "running_mean", "running_var"):
            owner.num_features = tensor.shape[0]  # type: ignore[assignment]  # stub: see in_channels above
        if hasattr(owner, "normalized_shape") and attr in ("weight", "bias"):
            owner.normalized_shape = tuple(tensor.shape)  # type: ignore[assignment]  # stub: see in_channels above

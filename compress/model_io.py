"""Loading the user's model and saving / reloading stage states.

Accepted model files:

* a ``state_dict`` plus the recipe's ``model.factory``: a ``torch.save`` file (loaded with
  ``weights_only=True``) or a ``.safetensors`` file;
* a TorchScript archive;
* a fully pickled ``nn.Module``, only with ``trust_model=True``: unpickling runs arbitrary code.

Weights are loaded without a second copy: the file is memory-mapped (``torch.load(...,
mmap=True)``, safetensors' own mapping), the factory builds the architecture with its
parameters on the ``meta`` device (no memory, no random initialisation) and the file's
tensors become the parameters (``load_state_dict(assign=True)``), in the file's dtype: a
bfloat16 checkpoint stays bfloat16 (2 bytes per parameter). The mapping is private: a
stage that changes a weight changes its own copy of those pages, never the file.

A stage state is saved as a ``state_dict`` (``model.pt``), the quantization and masks
(``extras.pt``, tensors only) and ``state.json``. It reloads by building the base
architecture again and resizing parameters whose shape a stage changed (structured
pruning), so a reload never needs to unpickle code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator
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
    """The user's model as loaded.

    Attributes:
        module: the model, weights from the file.
        kind: ``state_dict``, ``safetensors``, ``torchscript`` or ``pickle``.
        rebuild: a fresh copy of the base architecture (its own initial weights).
        reload: the model as loaded again from the file (the pipeline's reference model,
            built when a stage asks for it instead of held for the whole run).
    """

    module: nn.Module
    kind: str
    rebuild: Callable[[], nn.Module]
    reload: Callable[[], nn.Module]

    def take(self) -> nn.Module:
        """Hand the module over: this object stops referring to it, so the new owner's
        changes (or its replacing the module) never leave a second model alive here."""
        module = self.module
        if module is None:
            raise RuntimeError("the loaded module was already handed over")
        self.module = None  # type: ignore[assignment]  # only take() and its caller see this
        return module


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
    stamp = _file_stamp(path)
    if _is_torchscript(path):
        module = _load_torchscript(path)
        if factory:
            sd = {k: v.detach() for k, v in module.state_dict().items()}
            del module  # the state_dict's tensors keep the weights; the archive's code goes

            def archive_weights() -> dict[str, torch.Tensor]:
                _check_unchanged(path, stamp)
                return {k: v.detach() for k, v in _load_torchscript(path).state_dict().items()}

            return _from_state_dict(path, sd, factory, kwargs, trusted_callables, "torchscript", archive_weights)
        _check_finite(path, module.state_dict())

        def reload_archive() -> nn.Module:
            _check_unchanged(path, stamp)
            return _load_torchscript(path).eval()

        return LoadedModel(module.eval(), "torchscript", reload_archive, reload_archive)
    if _is_safetensors(path):
        if not factory:
            raise ModelLoadError(
                f"{path} is a safetensors file (weights only); name the architecture that loads it with "
                "model.factory in the recipe, e.g. model: {factory: 'compress.zoo:mnist1d_cnn', input_shape: [1, 40]}"
            )

        def safetensors_weights() -> dict[str, torch.Tensor]:
            _check_unchanged(path, stamp)
            return read_safetensors(path)

        sd = read_safetensors(path)
        return _from_state_dict(path, sd, factory, kwargs, trusted_callables, "safetensors", safetensors_weights)
    try:
        obj = _torch_load_weights(path)
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
        fold_parametrizations(obj)

        def unpickle() -> nn.Module:
            _check_unchanged(path, stamp)
            return torch.load(path, map_location="cpu", weights_only=False).eval()

        return LoadedModel(obj.eval(), "pickle", unpickle, unpickle)
    except Exception as err:  # random bytes, truncated zip, ...
        raise ModelLoadError(f"{path}: not a PyTorch model file ({_first_line(err)})") from err

    obj = _state_dict_of(path, obj)
    if not factory:
        raise ModelLoadError(
            f"{path} holds a state_dict; name the architecture that loads it with model.factory "
            "in the recipe, e.g. model: {factory: 'compress.zoo:mnist1d_cnn', input_shape: [1, 40]}"
        )

    def state_dict_weights() -> dict[str, torch.Tensor]:
        _check_unchanged(path, stamp)
        return _state_dict_of(path, _torch_load_weights(path))

    return _from_state_dict(path, obj, factory, kwargs, trusted_callables, "state_dict", state_dict_weights)


def _state_dict_of(path: Path, obj: object) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # common checkpoint layout
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"{path}: expected a state_dict (name -> tensor), got {type(obj).__name__}")
    return obj


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as err:
        raise ModelLoadError(f"{path}: cannot load TorchScript archive ({_first_line(err)})") from err


def _torch_load_weights(path: Path) -> object:
    """``torch.load(weights_only=True)``, memory-mapped: tensors are read from the file's
    pages as they are used instead of copied into memory up front. Files in torch's old
    (pre-1.6, non-zip) format cannot be mapped and are read whole."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_safetensors(path: Path) -> bool:
    """A ``.safetensors`` name, or a safetensors header: an 8-byte little-endian length
    that fits the file, then a JSON object."""
    if path.suffix == ".safetensors":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= size - 8


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, memory-mapped (each one a view of the file's pages).

    Raises:
        ModelLoadError: the file is not a valid safetensors file (the message names it).
    """
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ModelLoadError(f"{path}: reading a .safetensors file needs the safetensors package") from None
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise ModelLoadError(f"{path}: not a valid safetensors file ({_first_line(err)})") from None


def _file_stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _check_unchanged(path: Path, stamp: tuple[int, int]) -> None:
    """The reference model is read from the file again when a stage needs it: refuse a
    file that changed since the run started (it is no longer the run's input)."""
    try:
        now = _file_stamp(path)
    except OSError as err:
        raise ModelLoadError(f"{path}: the model file is gone since the run started ({err.strerror})") from None
    if now != stamp:
        raise ModelLoadError(
            f"{path}: the model file changed since the run started; the reference model must be the run's input. "
            "Run again (finished stages are reused if their input is unchanged)"
        )


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the ``meta`` device: no memory and no
    random initialisation (init functions are no-ops on meta tensors); the weights are
    assigned afterwards (``assign_state_dict``). Buffers stay real: non-persistent ones
    (position ids, rotary tables) are not in a state_dict and must keep their values.

    Swaps ``nn.Module.register_parameter`` for the duration (the approach of accelerate's
    ``init_empty_weights``), so build nothing else in another thread meanwhile.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        p = module._parameters.get(name)
        if p is not None and type(p) is nn.Parameter and not p.is_meta:
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register_on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _aliases(module: nn.Module) -> list[list[str]]:
    """Names that share one parameter or buffer object (tied weights), one list per object
    reached under several names."""
    names: dict[int, list[str]] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    for n, b in module.named_buffers(remove_duplicate=False):
        names.setdefault(id(b), []).append(n)
    return [group for group in names.values() if len(group) > 1]


def _meta_tensors(module: nn.Module) -> list[str]:
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


def assign_state_dict(module: nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Make ``sd``'s tensors ``module``'s parameters and buffers, without copying them.

    Tied weights stay tied: names that shared one parameter in ``module`` share it again,
    and a file that stores a tied tensor once (safetensors drops duplicates) fills the
    other names.

    Raises:
        RuntimeError: ``sd`` does not fit ``module`` (torch's message).
    """
    groups = _aliases(module)
    sd = dict(sd)
    for group in groups:
        present = next((n for n in group if n in sd), None)
        if present is not None:
            for n in group:
                sd.setdefault(n, sd[present])
    module.load_state_dict(sd, strict=True, assign=True)
    for group in groups:
        owner, _, attr = group[0].rpartition(".")
        shared = getattr(module.get_submodule(owner) if owner else module, attr)
        for n in group[1:]:
            owner, _, attr = n.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            if isinstance(shared, nn.Parameter):
                setattr(sub, attr, shared)
            else:
                sub.register_buffer(attr, shared)


def _from_state_dict(
    path: Path,
    sd: dict,
    factory: str,
    kwargs: dict,
    trusted: frozenset[str] | set[str],
    kind: str,
    read_weights: Callable[[], dict[str, torch.Tensor]],
) -> LoadedModel:
    build = import_callable(factory, what="model factory", error=ModelLoadError, trusted=trusted)

    def rebuild() -> nn.Module:
        try:
            return build(**kwargs)
        except ModelLoadError:
            raise
        except Exception as err:
            raise ModelLoadError(f"model factory {factory} failed: {type(err).__name__}: {err}") from err

    _check_finite(path, sd)
    module = _build_with_weights(path, sd, factory, rebuild)

    def reload() -> nn.Module:
        return _build_with_weights(path, read_weights(), factory, rebuild).eval()

    return LoadedModel(module.eval(), kind, rebuild, reload)


def _build_with_weights(
    path: Path, sd: dict[str, torch.Tensor], factory: str, rebuild: Callable[[], nn.Module]
) -> nn.Module:
    """The factory's architecture holding ``sd``'s tensors (no second copy of the weights)."""
    with parameters_on_meta():
        module = rebuild()
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"model factory {factory} returned a {type(module).__name__}, not an nn.Module")
    try:
        assign_state_dict(module, sd)
    except RuntimeError as err:
        raise ModelLoadError(
            f"{path} does not fit the architecture from {factory}: {_mismatch(module, sd, err)}"
        ) from None
    if left := _meta_tensors(module):
        # A factory that derives a tensor from its parameters while building (not a
        # state_dict entry) cannot be built empty: build it for real and copy the weights in.
        log.info("%s: %s not in the state_dict; building the model with its own weights first", factory, left[0])
        module = rebuild()
        module.load_state_dict(sd, strict=True)
    if folded := fold_parametrizations(module):
        log.info("weights computed by a parametrization, folded into plain weights: %s", ", ".join(folded))
    return module


def fold_parametrizations(module: nn.Module) -> list[str]:
    """Replace every weight computed from others (``torch.nn.utils.parametrize``: weight
    norm, spectral norm, orthogonal...; the older ``weight_norm``/``spectral_norm`` hooks) by
    the plain tensor it computes, in place, and return their names with the kind.

    The forward pass is unchanged (the same function, evaluated once instead of every
    call), and every stage then sees an ordinary ``Linear``/``Conv`` weight it can prune,
    quantize and export. Training stages train that weight, not its parts (``g`` and ``v``).
    Done at load and again on every rebuilt architecture (on the meta device), so a saved
    stage state, which holds the plain weights, loads back.
    """
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    folded = []
    for mname, m in list(module.named_modules()):
        prefix = f"{mname}." if mname else ""
        if parametrize.is_parametrized(m):
            for tname in list(m.parametrizations.keys()):
                plist = m.parametrizations[tname]
                kinds = "+".join(type(p).__name__ for p in plist)
                plist.eval()  # as the model runs: spectral norm's power iteration only trains
                # (not under no_grad: torch keeps a weight of several originals a Parameter
                # only when the computed tensor requires grad)
                parametrize.remove_parametrizations(m, tname, leave_parametrized=True)
                plain = getattr(m, tname)
                if not isinstance(plain, nn.Parameter):  # frozen originals give a bare tensor
                    delattr(m, tname)
                    m.register_parameter(tname, nn.Parameter(plain.detach(), requires_grad=False))
                folded.append(f"{prefix}{tname} ({kinds})")
        for hook in list(m._forward_pre_hooks.values()):
            if isinstance(hook, WeightNorm):
                torch.nn.utils.remove_weight_norm(m, hook.name)
            elif isinstance(hook, SpectralNorm):
                torch.nn.utils.remove_spectral_norm(m, hook.name)
            else:
                continue
            folded.append(f"{prefix}{hook.name} ({type(hook).__name__})")
    return folded


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


def _all_finite(t: torch.Tensor, chunk: int = 1 << 20) -> bool:
    """``torch.isfinite(t).all()`` in chunks: its temporaries (``isfinite`` computes ``abs``
    in the tensor's dtype) stay a few MB for a tensor of any size."""
    flat = t.detach().reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + chunk]).all()) for i in range(0, flat.numel(), chunk))


def _check_finite(path: Path, sd: dict) -> None:
    """NaN or infinite weights make every later number meaningless: refuse them up front."""
    bad = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not _all_finite(v)]
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
        dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
        hint = ""
        if x.is_floating_point() and dtypes and x.dtype not in dtypes:
            # The file's dtype is kept (a bfloat16 checkpoint stays bfloat16): say so.
            hint = (
                f" (the weights are {', '.join(sorted(str(d) for d in dtypes))} as stored in the model file and the "
                f"input is {x.dtype}: save the weights as {x.dtype} or make the model cast its input)"
            )
        raise ModelLoadError(
            f"the model's forward fails on the declared input_shape {list(input_shape)}: {_first_line(err)}{hint}"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise ModelLoadError(
            f"the model must return one tensor; it returned {type(out).__name__}. Name a factory "
            "(model.factory) that wraps it and returns the output to keep, e.g. the logits"
        )


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
    """Reload a state saved by ``save_state`` onto a fresh base architecture.

    The weights are memory-mapped from ``model.pt`` and become the module's tensors (the
    architecture is built with its parameters on the meta device): no second copy.
    """
    sd = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True, mmap=True)
    extras = torch.load(folder / EXTRAS_FILE, map_location="cpu", weights_only=True)
    meta = json.loads((folder / STATE_FILE).read_text())
    with parameters_on_meta():
        module = rebuild()
        fold_parametrizations(module)  # as at load: the saved state holds the plain weights
        if meta["extras"].get(BATCHNORM_FOLDED):  # the quantize stage folded BatchNorm layers away
            replay_folds(module, meta["extras"][BATCHNORM_FOLDED])
    resize_to_state_dict(module, sd)
    restore_smoothing(module, sd)  # the quantize stage's SmoothQuant scaling (compress.smoothing)
    if isinstance(module, torch.jit.ScriptModule):
        module.load_state_dict(sd, strict=True)
    else:
        assign_state_dict(module, sd)
        if left := _meta_tensors(module):
            raise ModelLoadError(f"{folder}: {left[0]} of the rebuilt model is not in {MODEL_FILE}")
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
        new = torch.empty(tensor.shape, dtype=tensor.dtype, device=old.device)  # meta when built empty
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

"""The one way this package reads ``.pth`` files: weights-only, never running code stored in a file.

``torch.load(..., weights_only=False)`` unpickles arbitrary Python objects: a crafted checkpoint or step memory
runs whatever its author wrote the moment it is loaded. Models are meant to be shared, so every file this
package reads (teacher checkpoints, the checkpoints of ``--c``, step memories, the models it evaluates) goes
through :func:`load_weights_only`: ``torch.load(..., weights_only=True)``, which accepts tensors, plain
containers (dict, list, tuple, str, numbers, ``torch.device``, ...) and exactly the numpy types that
nnU-Net's checkpoints and our step memories hold (:data:`ALLOWED_NUMPY_GLOBALS`).

A legacy file that needs full unpickling is refused with a message naming the file and the opt-in: setting
``nnUNet_cimis_trust_checkpoints=1`` loads such files with ``weights_only=False`` after the weights-only
attempt failed, with a warning. Set it only for files you made yourself or got from someone you trust.

What remains nnU-Net's responsibility: nnU-Net's own commands (``nnUNetv2_predict``, ``nnUNetv2_train
-pretrained_weights``, ``nnUNetv2_export_model_to_zip`` and the predictor itself) load checkpoints with
``weights_only=False``. The package's trainers load ``--c`` checkpoints weights-only before nnU-Net sees
them, and ``nnUNetv2_cimis_evaluate`` checks every checkpoint with :func:`check_checkpoint` before handing it
to nnU-Net's predictor; a model used with nnU-Net's own commands directly must come from a trusted source.
"""
from __future__ import annotations

import os
import pickle
import sys
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch

from nnunetv2_cimis.errors import CIMISError

ENV_TRUST = "nnUNet_cimis_trust_checkpoints"
_torch_load = torch.load  # the real one, also while torch_load_weights_only() routes torch.load through us


def _numpy_globals() -> List[Any]:
    """numpy scalars (nnU-Net's logging and ``_best_ema`` hold np.float64), dtypes and arrays (the label banks
    of step memories), under the module names numpy 2 (``numpy._core``) and numpy 1 (``numpy.core``) pickle."""
    core = getattr(np, "_core", None) or np.core
    multiarray = core.multiarray
    out: List[Any] = [multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype]
    for alias in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out.append((multiarray.scalar, f"{alias}.scalar"))
        out.append((multiarray._reconstruct, f"{alias}._reconstruct"))
    # numpy >= 1.25 may pickle a dtype by its class (numpy.dtypes.Float64DType, ...)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        for name in dir(dtypes):
            obj = getattr(dtypes, name)
            if isinstance(obj, type) and issubclass(obj, np.dtype):
                out.append(obj)
    return out


#: the only non-torch globals a weights-only load of this package accepts
ALLOWED_NUMPY_GLOBALS = _numpy_globals()


def trust_enabled() -> bool:
    """Whether the user opted in to full unpickling of files that fail the weights-only load."""
    return os.environ.get(ENV_TRUST, "").strip().lower() in ("1", "true", "yes", "on")


def _unsafe_globals(path: str) -> List[str]:
    try:
        with torch.serialization.safe_globals(ALLOWED_NUMPY_GLOBALS):
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a torch file at all: no globals to name
        return []


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__


def load_weights_only(path: str, what: str = "checkpoint", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with the package's numpy allow-list.

    Args:
        path: the ``.pth`` file.
        what: what the file is, for messages ("teacher checkpoint", "step memory", ...).
        map_location: as for ``torch.load``.

    Raises:
        CIMISError: the file is missing or unreadable, or it holds Python objects beyond tensors and plain
            containers (the message names the file, the objects and the opt-in ``nnUNet_cimis_trust_checkpoints=1``).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CIMISError(f"The {what} {path} does not exist.")
    try:
        with torch.serialization.safe_globals(ALLOWED_NUMPY_GLOBALS):
            return _torch_load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        unsafe = _unsafe_globals(path)
        if trust_enabled():
            print(f"warning: {ENV_TRUST} is set: loading the {what} {path} with full unpickling"
                  f"{' (it holds ' + ', '.join(unsafe[:5]) + ')' if unsafe else ''}; this runs code stored in the "
                  f"file.", file=sys.stderr)
            try:
                return _torch_load(path, map_location=map_location, weights_only=False)
            except Exception as e2:
                raise CIMISError(f"The {what} {path} cannot be read ({_first_line(e2)}). Is it a complete file "
                                 f"written by nnU-Net or this package?") from None
        if not unsafe:  # no forbidden object named: a corrupt or foreign file, or a pickle of another kind
            raise CIMISError(f"The {what} {path} cannot be read as a weights-only PyTorch file (corrupt, or not "
                             f"written by nnU-Net or this package). If it is a legacy file you trust, "
                             f"{ENV_TRUST}=1 loads it with full unpickling (see 'Security' in docs/usage.md).") from None
        raise CIMISError(
            f"The {what} {path} holds Python objects that only full unpickling can load "
            f"({', '.join(unsafe[:5])}{', ...' if len(unsafe) > 5 else ''}); loading it would run code stored in "
            f"the file, so it is refused. If you made this file yourself or trust its source, set "
            f"{ENV_TRUST}=1 to load it anyway (see 'Security' in docs/usage.md).") from None
    except CIMISError:
        raise
    except Exception as e:  # truncated zip, not a torch file, ...
        raise CIMISError(f"The {what} {path} cannot be read ({_first_line(e)}). Is it a complete file written by "
                         f"nnU-Net or this package?") from None


@contextmanager
def torch_load_weights_only(what: str = "checkpoint", preloaded: Optional[Dict[str, Any]] = None) -> Iterator[None]:
    """Inside the block, every ``torch.load`` of a file (nnU-Net's own ``load_checkpoint`` and predictor call it
    with ``weights_only=False``) goes through :func:`load_weights_only` instead; ``preloaded`` maps paths to
    what was already loaded (weights-only), returned as is. nnU-Net's code is unchanged, it just cannot unpickle
    code from a file while this package drives it."""
    preloaded = {os.path.abspath(k): v for k, v in (preloaded or {}).items()}

    def load(f, map_location=None, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)):
            key = os.path.abspath(os.fspath(f))
            if key in preloaded:
                return preloaded[key]
            return load_weights_only(os.fspath(f), what, map_location=map_location)
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(ALLOWED_NUMPY_GLOBALS):
            return _torch_load(f, map_location, *args, **kwargs)

    previous = torch.load
    torch.load = load
    try:
        yield
    finally:
        torch.load = previous


def load_json_object(path: str, what: str) -> dict:
    """Read a JSON file that must hold an object (dataset.json, plans.json, ...); a missing, malformed or
    non-object file raises :class:`CIMISError` naming it, instead of a traceback."""
    import json
    if not os.path.isfile(path):
        raise CIMISError(f"The {what} {path} does not exist.")
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CIMISError(f"The {what} {path} is not valid JSON ({e}); fix or recreate it.") from None
    if not isinstance(content, dict):
        raise CIMISError(f"The {what} {path} must hold a JSON object, got {type(content).__name__}; fix or "
                         f"recreate it.")
    return content


def check_checkpoint(path: str, what: str = "checkpoint") -> None:
    """Load ``path`` weights-only and drop it: refuse a file that would run code before handing it to nnU-Net
    (whose predictor and trainer load with ``weights_only=False``)."""
    obj = load_weights_only(path, what)
    if not isinstance(obj, dict) or "network_weights" not in obj:
        raise CIMISError(f"The {what} {path} is not an nnU-Net checkpoint (no 'network_weights').")


__all__: Tuple[str, ...] = ("ENV_TRUST", "ALLOWED_NUMPY_GLOBALS", "trust_enabled", "load_weights_only",
                            "check_checkpoint", "torch_load_weights_only", "load_json_object")

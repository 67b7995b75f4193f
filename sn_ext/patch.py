"""sn_ext.patch_torch: while it is active, torch's spectral-norm functions create sn_ext's. That is this module's one
job (sn_ext.convert_spectral_norm swaps the spectral norms of a model that is already built).

    with sn_ext.patch_torch():
        D = build_discriminator()     # code that calls torch.nn.utils.spectral_norm & co., unchanged

    patch = sn_ext.patch_torch()      # or: until .undo()
    ...
    patch.undo()
"""

from __future__ import annotations

import functools
import sys
import types

import torch.nn.utils
import torch.nn.utils.parametrizations

from . import legacy
from .nn.spectral_norm import spectral_norm

# torch's functions, as torch defines them (kept in a dict: a module attribute would be patched by the scan).
_TORCH = {
    "parametrizations.spectral_norm": torch.nn.utils.parametrizations.spectral_norm,
    "spectral_norm": sys.modules["torch.nn.utils.spectral_norm"].spectral_norm,
}
_active: TorchPatch | None = None


def _replacements(backend: str | None) -> dict[str, object]:
    """New function objects for this patch (undo finds them by identity), with torch's names and signatures."""

    @functools.wraps(_TORCH["parametrizations.spectral_norm"])
    def parametrizations_spectral_norm(module, name="weight", n_power_iterations=1, eps=1e-12, dim=None):
        return spectral_norm(module, name, n_power_iterations, eps, dim, backend=backend)

    @functools.wraps(_TORCH["spectral_norm"])
    def legacy_spectral_norm(module, name="weight", n_power_iterations=1, eps=1e-12, dim=None):
        return legacy.spectral_norm(module, name, n_power_iterations, eps, dim, backend=backend)

    return {"parametrizations.spectral_norm": parametrizations_spectral_norm, "spectral_norm": legacy_spectral_norm}


def _rebind(mapping: dict[int, tuple[object, object]]) -> int:
    """Rebinds every module-level name, in every module in sys.modules, whose value is one of `mapping`'s old
    objects (keyed by id) to the corresponding new one. Returns how many names it rebound."""
    count = 0
    for module in list(sys.modules.values()):
        if not isinstance(module, types.ModuleType):
            continue
        try:
            namespace = vars(module)
            items = list(namespace.items())
        except Exception:  # an odd module object without a usable __dict__
            continue
        for attr, value in items:
            pair = mapping.get(id(value))
            if pair is not None and value is pair[0]:
                namespace[attr] = pair[1]
                count += 1
    return count


class TorchPatch:
    """An active sn_ext.patch_torch(): undo() (or leaving its `with` block) puts torch's functions back."""

    def __init__(self, backend: str | None = None) -> None:
        self._replacements = _replacements(backend)
        self.active = False

    def _apply(self) -> TorchPatch:
        global _active
        if _active is not None:
            raise RuntimeError("patch_torch: already active (undo the active patch first)")
        _rebind({id(_TORCH[k]): (_TORCH[k], new) for k, new in self._replacements.items()})
        _active, self.active = self, True
        return self

    def undo(self) -> None:
        """Puts torch's functions back wherever a module-level name holds one of this patch's functions (also in
        modules imported while it was active). Calling it again does nothing."""
        global _active
        if not self.active:
            return
        _rebind({id(new): (new, _TORCH[k]) for k, new in self._replacements.items()})
        _active, self.active = None, False

    def __enter__(self) -> TorchPatch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.undo()


def patch_torch(backend: str | None = None) -> TorchPatch:
    """Makes torch's spectral-norm functions create sn_ext's, from this call until the returned handle's undo() (or
    the end of its `with` block): torch.nn.utils.parametrizations.spectral_norm creates sn_ext.spectral_norm,
    torch.nn.utils.spectral_norm creates sn_ext.legacy.spectral_norm (both with torch's arguments, and `backend`).
    torch.nn.utils.remove_spectral_norm needs no patch: sn_ext's legacy hook is a subclass of torch's, which it
    removes as its own.

    What is patched: every module-level name, in every module in sys.modules when the patch starts, that holds one
    of torch's two functions. That covers calls through the torch namespaces (``torch.nn.utils.spectral_norm``,
    ``torch.nn.utils.parametrizations.spectral_norm``, ``nn.utils.spectral_norm``, the submodule
    ``torch.nn.utils.spectral_norm.spectral_norm``), modules imported while the patch is active, and
    ``from torch.nn.utils import spectral_norm`` (with or without ``as``) already executed at the top level of an
    imported module. undo() puts torch's functions back in every module-level name that holds this patch's
    functions, including names bound while it was active.

    What is not patched, since it is not a module-level name: references to torch's functions taken before the
    patch and kept anywhere else: in a class body (``class D: sn = staticmethod(spectral_norm)``), a default
    argument (``def block(c, sn=spectral_norm)``), a closure or a local variable of a function already running, a
    container (``NORMS = {"sn": spectral_norm}``), a functools.partial, an instance attribute. Such code still builds
    torch's spectral norm; run sn_ext.convert_spectral_norm on the built model instead. Nor are torch's classes
    (``torch.nn.utils.parametrizations._SpectralNorm``, ``torch.nn.utils.spectral_norm.SpectralNorm.apply``) or
    models built before the patch. Conversely, such references taken while the patch is active keep sn_ext's
    functions after undo().

    The patch is process-wide (every thread sees it) and not re-entrant: calling patch_torch() while one is active
    raises RuntimeError. Returns the TorchPatch handle, also a context manager.
    """
    return TorchPatch(backend)._apply()

"""Loads either torch spectral-norm checkpoint layout into either sn_ext spectral norm, by renaming keys (and
upgrading legacy checkpoints from before torch's version 1, as torch's legacy spectral norm does).

torch has no converter between its two layouts; the mapping (same tensors, other names) is:
    <name>_orig  <->  parametrizations.<name>.original
    <name>_u     <->  parametrizations.<name>.0._u
    <name>_v     <->  parametrizations.<name>.0._v
"""

import functools

import torch
from torch import nn

from ._matrix import to_matrix


def legacy_keys(name: str) -> tuple[str, str, str]:
    return f"{name}_orig", f"{name}_u", f"{name}_v"


def parametrization_keys(name: str) -> tuple[str, str, str]:
    return f"parametrizations.{name}.original", f"parametrizations.{name}.0._u", f"parametrizations.{name}.0._v"


def upgrade_legacy_version_0(state_dict, prefix: str, local_metadata, name: str, dim: int) -> None:
    """A legacy checkpoint from before torch's version 1 holds `<name>` (W_sn) and no `<name>_v`: rewrites it into
    version 1 in place, as torch's own SpectralNormLoadStateDictPreHook does (same formula, so the same numbers):
    sigma = mean(W_orig / W_sn), v solves W_orig v ~ u with u^T W_orig v = sigma. Anything else is left alone."""
    version = local_metadata.get("spectral_norm", {}).get(name + ".version", None)
    weight_key = prefix + name
    orig_key, u_key, v_key = (prefix + key for key in legacy_keys(name))
    if (version is not None and version >= 1) or not all(k in state_dict for k in (weight_key, orig_key, u_key)):
        return
    with torch.no_grad():
        weight_orig = state_dict[orig_key]
        sigma = (weight_orig / state_dict.pop(weight_key)).mean()
        mat = to_matrix(weight_orig, dim % weight_orig.dim())
        u = state_dict[u_key]
        v = torch.linalg.multi_dot([mat.t().mm(mat).pinverse(), mat.t(), u.unsqueeze(1)]).squeeze(1)
        state_dict[v_key] = v.mul_(sigma / torch.dot(u, torch.mv(mat, v)))


def _rename_keys(
    state_dict,
    prefix,
    local_metadata,
    strict,
    missing_keys,
    unexpected_keys,
    error_msgs,
    *,
    name: str,
    to_legacy: bool,
    dim: int = 0,
    logged_sigma: bool = False,
):
    """A load_state_dict pre-hook: rewrites the other layout's keys under `prefix` into this module's layout.

    The bounded legacy layout of DUE and i-ResNet (`logged_sigma`) also holds `<name>_sigma`, the last sigma (a log):
    loaded from the parametrization layout, which has none, it becomes u^T W v of the loaded tensors (what an eval
    forward logs); a parametrization drops it."""
    upgrade_legacy_version_0(state_dict, prefix, local_metadata, name, dim)
    source, target = legacy_keys(name), parametrization_keys(name)
    if to_legacy:
        source, target = target, source
    renamed = False
    for old, new in zip(source, target):
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)
            renamed = True
    sigma_key = f"{prefix}{name}_sigma"
    if renamed and not to_legacy:
        state_dict.pop(sigma_key, None)
    elif renamed and logged_sigma and sigma_key not in state_dict:
        orig, u, v = (state_dict.get(prefix + key) for key in legacy_keys(name))
        if orig is not None and u is not None and v is not None:
            with torch.no_grad():
                sigma = torch.dot(u.double(), torch.mv(to_matrix(orig.double(), dim % orig.dim()), v.double()))
            state_dict[sigma_key] = sigma.float().reshape(1)


def accept_both_layouts(
    module: nn.Module, name: str, *, legacy: bool, dim: int = 0, logged_sigma: bool = False
) -> None:
    """Lets `module` (with spectral norm on `name`, over `dim`) load checkpoints saved in either torch layout,
    including legacy ones from before torch's version 1; `logged_sigma`: the legacy module keeps DUE's `<name>_sigma`
    (see _rename_keys).

    The hook holds only the name and dim, no module, so copy.deepcopy and pickling of the module keep working.
    """
    module._register_load_state_dict_pre_hook(
        functools.partial(_rename_keys, name=name, to_legacy=legacy, dim=dim, logged_sigma=logged_sigma)
    )


def remove_layout_hooks(module: nn.Module, name: str) -> None:
    """Removes what accept_both_layouts(module, name, ...) registered (when its spectral norm is removed)."""
    for key, hook in list(module._load_state_dict_pre_hooks.items()):
        function = getattr(hook, "hook", hook)  # torch keeps it wrapped in a _WrappedHook
        if (
            isinstance(function, functools.partial)
            and function.func is _rename_keys
            and function.keywords["name"] == name
        ):
            del module._load_state_dict_pre_hooks[key]

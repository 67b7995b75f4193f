"""Loads either torch spectral-norm checkpoint layout into either sn_ext spectral norm, by renaming keys.

torch has no converter between its two layouts; the mapping (same tensors, other names) is:
    <name>_orig  <->  parametrizations.<name>.original
    <name>_u     <->  parametrizations.<name>.0._u
    <name>_v     <->  parametrizations.<name>.0._v
"""
import functools

from torch import nn


def legacy_keys(name: str) -> tuple[str, str, str]:
    return f"{name}_orig", f"{name}_u", f"{name}_v"


def parametrization_keys(name: str) -> tuple[str, str, str]:
    return f"parametrizations.{name}.original", f"parametrizations.{name}.0._u", f"parametrizations.{name}.0._v"


def _rename_keys(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs, *,
                 name: str, to_legacy: bool):
    """A load_state_dict pre-hook: rewrites the other layout's keys under `prefix` into this module's layout."""
    source, target = legacy_keys(name), parametrization_keys(name)
    if to_legacy:
        source, target = target, source
    for old, new in zip(source, target):
        if prefix + old in state_dict and prefix + new not in state_dict:
            state_dict[prefix + new] = state_dict.pop(prefix + old)


def accept_both_layouts(module: nn.Module, name: str, *, legacy: bool) -> None:
    """Lets `module` (with spectral norm on `name`) load checkpoints saved in either torch layout.

    The hook holds only the name, no module, so copy.deepcopy and pickling of the module keep working.
    """
    module._register_load_state_dict_pre_hook(functools.partial(_rename_keys, name=name, to_legacy=legacy))

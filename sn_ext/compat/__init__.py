"""Drop-ins for the bounded spectral norms that projects copy into their code, by the argument order of their
`spectral_norm_fc` (change the import, nothing else; docs/variants.md):

    from sn_ext.compat.due import spectral_norm_fc      # DUE, DDU, lightning-uq-box: (module, coeff, n, name, ...)
    from sn_ext.compat.iresnet import spectral_norm_fc  # i-ResNet: (module, coeff, name, n, ...)

Both register sn_ext.legacy.spectral_norm(module, coeff=coeff, ...): their state layout (`weight_orig`, `weight_u`,
`weight_v`, `weight_sigma`), so their checkpoints load and give the same outputs, v-first rounds per forward in train
mode, none in eval, the gradient through sigma.
"""

from . import due, iresnet

__all__ = ["due", "iresnet"]

"""varcore: fast, faithful engine for VAR, CoDe and PAR image generation.

The compiled kernels live in ``varcore._C`` (CPU, and CUDA when built); every op also has a pure-PyTorch
reference that is used when the extension is missing. ``varcore.info()`` reports what is available.
"""
from importlib import import_module

from .ops.extension import info

__version__ = "0.1.0"

# Public names, resolved lazily so that ``import varcore`` stays cheap and does not import every model.
_LAZY = {
    "ops": ("varcore.ops", None),
    "VQVAE": ("varcore.models.vqvae", "VQVAE"),
    "VAR": ("varcore.models.var", "VAR"),
    "build_vae_var": ("varcore.models", "build_vae_var"),
    "build_vae_var_ctf": ("varcore.models", "build_vae_var_ctf"),
    "load_vae": ("varcore.checkpoints", "load_vae"),
    "load_var": ("varcore.checkpoints", "load_var"),
    "from_pretrained": ("varcore.checkpoints", "from_pretrained"),
    "VARSampler": ("varcore.sampling.var", "VARSampler"),
    "collaborative_infer_cfg": ("varcore.models.code", "collaborative_infer_cfg"),
    "CoDeSampler": ("varcore.sampling.code", "CoDeSampler"),
    "load_code_pair": ("varcore.checkpoints", "load_code_pair"),
    "PARSampler": ("varcore.sampling.par", "PARSampler"),
    "load_gpt": ("varcore.checkpoints", "load_gpt"),
    "load_vq16": ("varcore.checkpoints", "load_vq16"),
    "keep_freed_memory": ("varcore.memory", "keep_freed_memory"),
}

__all__ = ["info", "__version__", *_LAZY]


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'varcore' has no attribute {name!r}")
    module_name, attr = _LAZY[name]
    module = import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value

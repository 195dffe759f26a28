"""varcore ops: compiled kernels with a pure-PyTorch reference beside each (see ``varcore.info()``)."""
from .par_order import (  # noqa: F401
    par_gather, par_gather_ref, par_group_scatter_, par_group_scatter_ref_, par_permutation, par_scatter,
    par_scatter_ref,
)
from .attention import attend, attention_backends, block_causal_attention  # noqa: F401,E402
from . import quant  # noqa: F401,E402  (registers the quantizer ops for varcore.info())
from . import linear  # noqa: F401,E402  (registers the decode linear ops for varcore.info())

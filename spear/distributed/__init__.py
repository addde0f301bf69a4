"""Scale-out on Ray and torch.distributed: the only package of spear that imports Ray.

Ray is imported lazily inside the functions that need it (``pip install 'spear[ray]'``), so
importing this package works without Ray. See ``docs/distributed.md``.
"""

from spear.distributed.env_pool import EnvPoolError, EnvPoolParams, RayEnvPool, init_ray

__all__ = ["EnvPoolError", "EnvPoolParams", "RayEnvPool", "init_ray"]

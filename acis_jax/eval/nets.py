"""The downstream networks by name (`evaluate.segmentation_nets`, `reconstruction_nets`,
`superres_nets`; their constructor arguments in `evaluate.nets`)."""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from acis_jax.eval import downstream
from acis_jax.eval.recon_nets import ESRT, REDCNN, ResNet
from acis_jax.eval.seg_nets import MedNeXt, SegUNet

SEGMENTATION_NETS = ("unet", "mednext")
RECONSTRUCTION_NETS = ("resnet", "redcnn", "esrt")


def net_factory(name: str, task: downstream.Task, kwargs: dict, spatial_dims: int
                ) -> Callable[[nnx.Rngs], nnx.Module]:
  """`rngs -> module` of downstream network `name` for one-channel inputs."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  constructors = {
      "unet": lambda rngs: SegUNet(1, task.num_classes, spatial_dims=spatial_dims, rngs=rngs,
                                   **kwargs),
      "mednext": lambda rngs: MedNeXt(1, task.num_classes, spatial_dims=spatial_dims,
                                      rngs=rngs, **kwargs),
      "resnet": lambda rngs: ResNet(1, spatial_dims=spatial_dims, rngs=rngs, **kwargs),
      "redcnn": lambda rngs: REDCNN(1, spatial_dims=spatial_dims, rngs=rngs, **kwargs),
      "esrt": lambda rngs: ESRT(1, spatial_dims=spatial_dims, rngs=rngs, **kwargs),
  }
  if name not in constructors:
    raise ValueError(f"unknown downstream network {name!r}; known: {sorted(constructors)}")
  return constructors[name]

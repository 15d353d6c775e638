"""Networks of ACIS in flax.nnx: rank-agnostic (spatial rank is a constructor argument),
channel-last, dropout driven by an explicit key (None = deterministic)."""
from acis_jax.models.discriminators import Critic, PatchDiscriminator
from acis_jax.models.generators import AnnotationGenerator, ImageGenerator, MaskGenerator
from acis_jax.models.layers import ConvBlock, ConvStage, Down, UNet, Up, make_norm
from acis_jax.models.registration import RegistrationNet, register

__all__ = [
    "AnnotationGenerator", "ConvBlock", "ConvStage", "Critic", "Down", "ImageGenerator",
    "MaskGenerator", "PatchDiscriminator", "RegistrationNet", "UNet", "Up", "make_norm",
    "register",
]

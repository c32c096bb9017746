from encdiff.models.encoder import ConceptEncoder  # noqa: F401
from encdiff.models.unet import UNet, record_cross_attention  # noqa: F401
from encdiff.models.vqvae import VQModel  # noqa: F401

"""vlfit: fine-tune CLIP-family vision backbones for image classification and compare them."""

__version__ = "0.1.0"

"""USS feature extraction for ``dhr-label features``: backbones built from their weight files
(EfficientNet-Lite, DINO / DINOv2 ViTs, STEGO heads), multi-scale and flip inference, PCA and L2
normalisation. Torch code on any device; no file access except reading weight files."""

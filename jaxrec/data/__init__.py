"""Input pipeline: image decoding/resizing/normalization, augmentations, datasets, sampling."""

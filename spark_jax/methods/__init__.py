"""The segmentation methods, one module each."""

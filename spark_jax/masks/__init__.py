"""From token-grid labels to masks: torch-exact bilinear resampling, upsampling, concept assignment, PAMR."""

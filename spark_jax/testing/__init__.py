"""Test oracles and planted data: NumPy transcriptions of the papers' equations and synthetic token features (not used by the library itself)."""

"""Graphs over tokens: affinities, row normalisation, Markov flow, propagation, normalized cuts; shared by every method."""

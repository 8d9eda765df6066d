"""Encoders: HuggingFace text encoders with SimCSE poolers (and, with the vision extra, ResNets)."""

from .reference import local_cross_attention, neighbor_masked_attention  # placeholder

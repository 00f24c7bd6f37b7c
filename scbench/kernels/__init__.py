"""Attention kernels shared by the sparse-prefill methods.

``pattern``: the sparse pattern (key columns, diagonals, dense last rows), its plain reference, a chunked
CPU path and the density count. ``flex``: the GPU path through FlexAttention block masks.
"""

"""MInference's vertical-and-slash index selection, copied from microsoft/MInference (commit fb56c91,
minference/modules/minference_forward.py: ``sum_all_diagonal_matrix`` and the index part of the second
``vertical_and_slash_kernel``; MIT License, Copyright (c) Microsoft Corporation). Only the CUDA constant LAST_Q_MASK
is rebuilt on the CPU and the sparse-attention call is dropped: the function returns the indices the kernel gets.

The `minference` package cannot be installed on a machine without CUDA (its setup.py builds a CUDAExtension and
fails without CUDA_HOME while preparing metadata), so tests/methods/test_minference_patterns.py checks our
vertical-slash pattern against these definitions on the CPU instead of against MInference's kernels.
"""
import math

import torch


def sum_all_diagonal_matrix(mat: torch.tensor):
    b, h, n, m = mat.shape
    zero_mat = torch.zeros((b, h, n, n)).to(mat.device) # Zero matrix used for padding
    mat_padded =  torch.cat((zero_mat, mat, zero_mat), -1) # pads the matrix on left and right
    mat_strided = mat_padded.as_strided((1, 1, n, n + m), (1, n * (2 * n + m), 2 * n + m + 1, 1)) # Change the strides
    sum_diags = torch.sum(mat_strided, 2) # Sums the resulting matrix's columns
    return sum_diags[:,:,1:]


def vertical_and_slash_indices(q, k, vertical_size, slash_size, head_dim):
    """q, k: [1, 1, q_len, D] (one head: MInference's as_strided above assumes b = h = 1 per call)
    -> (vertical_topk [1, 1, 1, V] key columns, slash [1, 1, 1, S] diagonal offsets q_len - 1 - index)."""
    q_len = q.shape[2]
    arange = torch.arange(64)
    LAST_Q_MASK = arange[None, None, :, None] >= arange[None, None, None, :]
    vertical_size, slash_size  = min(q_len, max(vertical_size, 30)), min(q_len, max(slash_size, 50))
    last_q = min(64, q_len)
    qk = torch.einsum(f'bhmk, bhnk -> bhmn', q[:,:,-last_q:,:], k) / math.sqrt(head_dim)
    qk[:, :, :, -last_q:] = torch.where(LAST_Q_MASK[...,-last_q:,-last_q:].to(q.device), qk[:, :, :, -last_q:], -torch.inf)
    qk = torch.nn.functional.softmax(qk, dim=-1, dtype=torch.float32)
    vertical = qk.sum(-2, keepdim=True)
    vertical[...,:30] = torch.inf
    vertical_topk = torch.topk(vertical, vertical_size, -1).indices

    slash = sum_all_diagonal_matrix(qk)[...,:-last_q + 1]
    slash[...,-100:] = torch.inf
    slash = (q_len - 1) - torch.topk(slash, slash_size, -1).indices
    return vertical_topk, slash

"""Fewer kernels per decode step: the fast decode path's fused forwards of Llama-shaped decoder layers.

One eager decode step of an 8B Llama launched ~94 kernels per layer, most of them tiny elementwise ops
(RMSNorm alone is ~8, rotary embedding ~14, the KV write 2, the transposes/copies around attention a few). While
``FastDecoder`` steps (and is captured as a CUDA graph) ``active(model)`` replaces the forwards of the modules it
recognises by fused ones (scbench/kernels/fused.py), and restores them afterwards; the batched decode step
(scbench/batch_step.py) uses them too, its cache bringing its own rotary/store (``rope_store``); prefill and the plain
loop never see them:

- RMSNorm: one kernel; the post-attention one also adds the residual (one kernel for ``residual + x`` and its norm);
- attention (batch 1, one token, a ``StaticKV`` cache): q/k/v as one GEMM over a fused weight, rotary embedding of
  q and k plus the key/value write into the cache buffers as one kernel, ``StaticKV.attend`` (method plugins see
  the same call as before), and o_proj on the attention output without the transpose/contiguous copy;
- MLP: gate/up as one GEMM over a fused weight, ``silu(gate) * up`` as one kernel, down;
- across layers (all layers fused): a layer's closing residual add is done by the next layer's input norm (or
  the final norm) in its kernel.

The fused weights cost no memory: ``prepare(model)`` (once per model) copies q/k/v (and gate/up) into one buffer
per layer and makes the modules' own weights views of it, so every other path computes with the same values.
A module is fused only when it has the recognised shape (class, plain ``nn.Linear`` projections, SiLU, no q/k
norms, RMSNorm checked numerically against the reference on a probe); anything else keeps its own forward, and a
call the fused forward cannot take (another cache, batch > 1, several tokens) goes to the original forward.
``SCBENCH_FUSED_DECODE=0`` turns it off. Reference: the unfused step (``tests/engines/test_fused_decode.py``).
"""
from __future__ import annotations

import contextlib
import inspect
import os

import torch
import torch.nn.functional as F
from torch import nn

from scbench.kernels import fused

ENABLED = os.environ.get("SCBENCH_FUSED_DECODE", "1") != "0"
ATTENTION = {"LlamaAttention", "MistralAttention", "Qwen2Attention"}
MLP = {"LlamaMLP", "MistralMLP", "Qwen2MLP"}
LAYERS = {"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"}


def _plain_linear(m) -> bool:
    return type(m) is nn.Linear and "forward" not in vars(m) and not getattr(m, "_forward_hooks", None)


def _own_forward(m) -> bool:
    """No forward already replaced on the instance (accelerate's hooks, another patch) and no forward hooks."""
    return "forward" not in vars(m) and not m._forward_hooks and not m._forward_pre_hooks


def _fuse_weights(linears: list[nn.Linear]):
    """One buffer holding the linears' weights (and biases) stacked by rows; each linear's own weight becomes a
    view of it (no extra memory beyond one layer's copy while it is built). Returns (weight, bias or None)."""
    w0 = linears[0].weight
    if any(lin.weight.dtype != w0.dtype or lin.weight.device != w0.device or lin.weight.shape[1] != w0.shape[1]
           for lin in linears):
        return None
    if len({lin.bias is None for lin in linears}) != 1:
        return None
    with torch.inference_mode(w0.is_inference()), torch.no_grad():  # the new buffer is what the weights were
        rows = [lin.weight.shape[0] for lin in linears]
        w = torch.cat([lin.weight for lin in linears])
        b = None if linears[0].bias is None else torch.cat([lin.bias for lin in linears])
        for lin, part, bpart in zip(linears, w.split(rows), b.split(rows) if b is not None else [None] * len(rows)):
            lin.weight.data = part
            if bpart is not None:
                lin.bias.data = bpart
    return w, b


def _norm_ok(norm) -> bool:
    """An RMSNorm computing exactly Llama's formula (checked on a probe input), with its own forward."""
    w, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or not isinstance(eps, float) or not _own_forward(norm):
        return False
    with torch.no_grad():
        x = torch.randn(1, 1, w.shape[0], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
        return torch.equal(norm(x), fused.rmsnorm_ref(x, w, eps))


class Plan:
    """What ``prepare`` found fusable in one model: per layer the fused weights, or None where it keeps its own."""

    def __init__(self, model):
        inner = getattr(model, "model", None)
        self.layers = list(getattr(inner, "layers", None) or [])
        self.final_norm = getattr(inner, "norm", None)
        self.active = False
        """Inside ``active``: the modules' forwards are the fused ones (one decoding thread per model)."""
        self.norms = {}
        self.attn, self.mlp, self.whole = {}, {}, set()
        for norm in [self.final_norm] + [getattr(layer, n, None) for layer in self.layers
                                         for n in ("input_layernorm", "post_attention_layernorm")]:
            if norm is not None and _norm_ok(norm):
                self.norms[norm] = (norm.weight, norm.variance_epsilon)
        for i, layer in enumerate(self.layers):
            a, m = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if a is not None and self._attn_ok(a):
                fw = _fuse_weights([a.q_proj, a.k_proj, a.v_proj])
                if fw is not None:
                    self.attn[a] = fw
            if m is not None and self._mlp_ok(m):
                fw = _fuse_weights([m.gate_proj, m.up_proj])
                if fw is not None:
                    self.mlp[m] = fw
            if (type(layer).__name__ in LAYERS and _own_forward(layer) and a in self.attn and m in self.mlp
                    and getattr(layer, "input_layernorm", None) in self.norms
                    and getattr(layer, "post_attention_layernorm", None) in self.norms
                    and inspect.signature(type(layer).forward).return_annotation in (torch.Tensor, "torch.Tensor")):
                self.whole.add(layer)

    @staticmethod
    def _attn_ok(a) -> bool:
        cfg = getattr(a, "config", None)
        return (type(a).__name__ in ATTENTION and _own_forward(a) and cfg is not None
                and all(_plain_linear(getattr(a, n, None)) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
                and not hasattr(a, "q_norm") and not hasattr(a, "k_norm") and isinstance(getattr(a, "scaling", None), float)
                and a.head_dim & (a.head_dim - 1) == 0
                and a.q_proj.weight.shape[0] == cfg.num_attention_heads * a.head_dim
                and a.k_proj.weight.shape[0] == cfg.num_key_value_heads * a.head_dim)

    @staticmethod
    def _mlp_ok(m) -> bool:
        act = getattr(m, "act_fn", None)
        silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
        return (type(m).__name__ in MLP and _own_forward(m) and silu
                and all(_plain_linear(getattr(m, n, None)) for n in ("gate_proj", "up_proj", "down_proj")))

    def stale(self) -> bool:
        """The model's weights moved since (``model.to(...)``): the projections no longer view the fused buffers."""
        return any(a.q_proj.weight.data_ptr() != w.data_ptr() for a, (w, _) in self.attn.items()) or \
            any(m.gate_proj.weight.data_ptr() != w.data_ptr() for m, (w, _) in self.mlp.items()) or \
            any(n.weight is not w for n, (w, _) in self.norms.items())

    def fused_count(self) -> dict:
        return {"layers": len(self.layers), "whole_layers": len(self.whole), "attention": len(self.attn),
                "mlp": len(self.mlp), "norms": len(self.norms)}


def prepare(model) -> Plan:
    """The model's fusion plan, built (and its q/k/v, gate/up weights re-laid as views) at the first call."""
    plan = getattr(model, "_scbench_fuse_plan", None)
    if plan is None or plan.stale():
        plan = Plan(model)
        model._scbench_fuse_plan = plan
    return plan


# --- the fused forwards -----------------------------------------------------------------------------------
def _cache(kw):
    c = kw.get("cache")
    return kw.get("past_key_values") if c is None else c


def _attn_takes(a, h, cache, pe) -> bool:
    rows = hasattr(cache, "rope_store")  # a batch cache whose rows write at their own positions (scbench/batch_step.py)
    if not getattr(cache, "fused_step", False) or (h.shape[0] != 1 and not rows) or h.shape[1] != 1 or pe is None:
        return False
    kb, vb = cache.k[a.layer_idx], cache.v[a.layer_idx]
    return (pe[0].shape[-1] == a.head_dim and kb.is_contiguous() and vb.is_contiguous() and kb.shape[0] == h.shape[0]
            and h.is_contiguous())


def _attention(a, w, b, h, pe, cache):
    """LlamaAttention + StaticKV for one token: [1, 1, hidden] -> o_proj output [1, 1, hidden] (a batch cache with
    ``rope_store``: [B, 1, hidden] -> [B, 1, hidden])."""
    cfg, li = a.config, a.layer_idx
    qkv = F.linear(h, w, b)
    kb, vb = cache.k[li], cache.v[li]
    if hasattr(cache, "rope_store"):
        q = cache.rope_store(li, qkv, pe[0], pe[1], cfg.num_attention_heads, cfg.num_key_value_heads)
    else:
        q = fused.rope_store(qkv, pe[0], pe[1], kb, vb, cache.at[li : li + 1], cfg.num_attention_heads,
                             cfg.num_key_value_heads)
    out = cache.attend(li, q, kb, vb, a.scaling)  # [B, Hq, 1, D]: with one token, already o_proj's layout
    return a.o_proj(out.reshape(h.shape[0], 1, -1))


def _mlp(m, w, b, h):
    return m.down_proj(fused.silu_mul(F.linear(h, w, b)))


@contextlib.contextmanager
def active(model, plan: Plan | None = None):
    """While inside, the recognised modules of ``model`` run their fused forwards (restored on exit)."""
    plan = prepare(model) if plan is None or plan.stale() else plan
    if plan.active:  # already inside (re-entered): the outer context restores
        yield plan
        return
    plan.active = True
    patched = []

    def patch(mod, fn):
        mod.forward = fn
        patched.append(mod)

    # With every layer whole and the final norm fused, a layer hands the next one its MLP output and keeps the
    # residual sum pending: the next layer's (or the final) norm adds it in its own kernel (one launch per layer less).
    chain = plan.layers and len(plan.whole) == len(plan.layers) and plan.final_norm in plan.norms
    pending: list = [None]

    def settle(x):
        """``x`` with the pending residual added (the full hidden state an unfused consumer expects)."""
        if pending[0] is not None:
            x, pending[0] = pending[0] + x, None
        return x

    for norm, (weight, eps) in plan.norms.items():
        if chain and norm is plan.final_norm:
            def final(x, _w=weight, _e=eps):
                if pending[0] is None:
                    return fused.rmsnorm(x, _w, _e)
                out, _ = fused.rmsnorm(x, _w, _e, residual=pending[0])
                pending[0] = None
                return out

            patch(norm, final)
        else:
            patch(norm, lambda x, _w=weight, _e=eps: fused.rmsnorm(x, _w, _e))
    for a, (w, b) in plan.attn.items():
        orig = type(a).forward.__get__(a)

        def attn_fwd(*args, _a=a, _w=w, _b=b, _orig=orig, **kw):
            h = args[0] if args else kw.get("hidden_states")
            pe = kw.get("position_embeddings", args[1] if len(args) > 1 else None)
            cache = _cache(kw)
            if not _attn_takes(_a, h, cache, pe):
                return _orig(*args, **kw)
            return _attention(_a, _w, _b, h, pe, cache), None

        patch(a, attn_fwd)
    for m, (w, b) in plan.mlp.items():
        orig = type(m).forward.__get__(m)
        patch(m, lambda x, _m=m, _w=w, _b=b, _orig=orig: _mlp(_m, _w, _b, x) if x.is_contiguous() else _orig(x))
    first = plan.layers[0] if plan.layers else None
    for layer in plan.whole:
        orig = type(layer).forward.__get__(layer)
        a, m = layer.self_attn, layer.mlp
        (aw, ab), (mw, mb) = plan.attn[a], plan.mlp[m]
        n1, n2 = plan.norms[layer.input_layernorm], plan.norms[layer.post_attention_layernorm]

        def layer_fwd(*args, _a=a, _m=m, _aw=aw, _ab=ab, _mw=mw, _mb=mb, _n1=n1, _n2=n2, _orig=orig,
                      _first=layer is first, **kw):
            x = args[0] if args else kw.get("hidden_states")
            if _first:
                pending[0] = None
            pe, cache = kw.get("position_embeddings"), _cache(kw)
            if len(args) > 1 or not _attn_takes(_a, x, cache, pe):
                x = settle(x)
                return _orig(x, *args[1:], **kw) if args else _orig(**{**kw, "hidden_states": x})
            if pending[0] is None:
                x_in, h = x, fused.rmsnorm(x, *_n1)
            else:
                h, x_in = fused.rmsnorm(x, *_n1, residual=pending[0])
            h, res = fused.rmsnorm(_attention(_a, _aw, _ab, h, pe, cache), *_n2, residual=x_in)
            out = _mlp(_m, _mw, _mb, h)
            if chain:
                pending[0] = res
                return out
            return res + out

        patch(layer, layer_fwd)
    try:
        yield plan
    finally:
        for mod in patched:
            del mod.forward
        plan.active = False

"""Models larger than one device: a layer-wise device map (accelerate's), the devices a model's layers live on,
and memory per device.

A sharded model keeps whole decoder layers on one device each (``_no_split_modules``); accelerate's hooks move
the hidden states between devices, so a layer's KV cache is created on its layer's device and every cache
operation (compression, crop, snapshot) runs where the layer lives. Byte counts sum over devices; peak memory is
reported per device and summed.
"""
from __future__ import annotations

import torch

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""Values of ``model.device_map`` that ask accelerate to plan the split (besides an explicit mapping)."""


def check_device_map(value) -> str | dict | None:
    """``None``, one of ``DEVICE_MAP_STRATEGIES`` or a ``{module name: device}`` mapping; anything else is a
    ValueError that names the accepted forms."""
    if value in (None, "", "null", "none"):
        return None
    if isinstance(value, str):
        if value not in DEVICE_MAP_STRATEGIES:
            raise ValueError(f"model.device_map must be null, one of {', '.join(DEVICE_MAP_STRATEGIES)} or a mapping "
                             f"{{module: device}}, got {value!r}")
        return value
    if hasattr(value, "items"):
        out = {}
        for name, dev in value.items():
            if not isinstance(name, str):
                raise ValueError(f"model.device_map: module names must be strings, got {name!r}")
            out[name] = dev if isinstance(dev, (int, str)) else str(dev)
            try:
                torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
            except (RuntimeError, TypeError):
                raise ValueError(f"model.device_map[{name!r}]: {dev!r} is not a device") from None
        if not out:
            raise ValueError("model.device_map: an empty mapping places no module")
        return out
    raise ValueError(f"model.device_map must be null, a strategy name or a mapping, got {type(value).__name__}")


def meta_model(config):
    """The model of ``config`` with every parameter on the meta device (no memory): for planning a split."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def plan(config, max_memory: dict, *, dtype: torch.dtype = torch.bfloat16, strategy: str = "balanced") -> dict:
    """A ``{module name: device}`` map of ``config``'s model over the devices in ``max_memory`` (``{device: bytes}``),
    whole decoder layers per device. ``balanced`` spreads the layers evenly, ``sequential`` fills each device
    in turn. Raises ValueError when the weights do not fit the devices (a map that spills to ``cpu`` or ``disk``
    is refused: say so rather than run at host speed)."""
    from accelerate.utils import get_balanced_memory, infer_auto_device_map

    model = meta_model(config)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    budget = dict(max_memory)
    if strategy in ("auto", "balanced", "balanced_low_0"):
        budget = get_balanced_memory(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype,
                                     low_zero=strategy == "balanced_low_0")
    device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split, dtype=dtype)
    spilled = sorted({str(d) for d in device_map.values() if d in ("cpu", "disk")} - {str(d) for d in max_memory})
    if spilled:
        need = sum(p.numel() for p in model.parameters()) * torch.finfo(dtype).bits // 8
        raise ValueError(f"the model's weights ({need / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')}) do not "
                         f"fit the devices {', '.join(map(str, max_memory))}: the plan spills to {', '.join(spilled)}")
    return device_map


def gpu_budget(reserve: float = 0.25) -> dict:
    """``{gpu index: bytes}`` over the visible GPUs, keeping ``reserve`` of each device free for the KV cache and
    activations; empty without CUDA."""
    if not torch.cuda.is_available():
        return {}
    return {i: int(torch.cuda.get_device_properties(i).total_memory * (1 - reserve))
            for i in range(torch.cuda.device_count())}


def layer_devices(model) -> list[torch.device]:
    """The device of each decoder layer (where its KV cache lives), in layer order."""
    layers = None
    for name in ("model.layers", "model.decoder.layers", "transformer.h", "backbone.layers"):
        obj = model
        try:
            for part in name.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        layers = obj
        break
    if layers is None:
        return [next(model.parameters()).device]
    return [next(layer.parameters()).device for layer in layers]


def input_device(model) -> torch.device:
    """Where input ids go: the input embedding's device."""
    return model.get_input_embeddings().weight.device


def devices_of(model) -> list[torch.device]:
    """Every device holding a parameter of ``model``, sorted (``cuda:0`` before ``cuda:1``)."""
    found = {p.device for p in model.parameters()}
    return sorted(found, key=lambda d: (d.type, d.index if d.index is not None else -1))


def count(devices) -> dict:
    """``{device: how many times it occurs}`` in first-seen order (layers per device)."""
    out: dict = {}
    for d in devices:
        out[d] = out.get(d, 0) + 1
    return out


def peak_memory_per_device(devices) -> dict[str, int]:
    """Peak allocated bytes on each CUDA device of ``devices`` since the run started, else since the process started
    (``scbench.devices.peak_allocated``)."""
    from scbench.devices import peak_allocated

    return {str(d): peak_allocated(d) for d in devices if d.type == "cuda"}


def dispatch(model, device_map: dict):
    """Move an already-built ``model`` onto ``device_map`` (accelerate's hooks carry activations between devices)."""
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=device_map)


def random_sharded(config, device_map: dict, *, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    """A random-weight model of ``config`` built directly on the devices of ``device_map`` (never whole on one
    device, never on disk): modules are created on the meta device, given storage on their mapped device, and
    initialised with the model's own ``_init_weights`` after ``torch.manual_seed(seed)``; rotary tables are rebuilt
    on their device. Deterministic for a given map and seed (not the same numbers as an unsplit build)."""
    model = meta_model(config)
    model = model.to(dtype) if dtype is not None else model
    for name, dev in sorted(device_map.items(), key=lambda kv: len(kv[0])):
        target = torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
        module = model.get_submodule(name) if name else model
        module.to_empty(device=target, recurse=True)
    torch.manual_seed(seed)
    for module in model.modules():
        if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
            raise ValueError(f"device_map leaves {type(module).__name__} on the meta device: map every module")
        model._init_weights(module)
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if hasattr(child, "inv_freq") and hasattr(child, "config"):  # rotary tables are buffers, not weights
                fresh = type(child)(config=child.config)  # computed on the CPU (tiny), then moved
                setattr(parent, child_name, fresh.to(child.inv_freq.device))
    model.tie_weights()
    return dispatch(model, device_map).eval()

"""Model adapters shipped with scbench (installed as scbench.models): ``smollm2-135m-probe/`` is the probe LoRA delta
for the embedded SmolLM2-135M-Instruct (``configs/model/smollm2-135m-probe.yaml``)."""

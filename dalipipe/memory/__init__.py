"""The memory plan: estimated peak GPU memory of every GPU stage of a config.

    dalipipe plan-memory --configfile configs/paper.yaml [--config key=value ...] [--json]

- ``architectures``: the models' sizes, from a local config or a table of the paper's models;
- ``measure``: bytes that PyTorch keeps, measured on the CPU (saved tensors, peak allocation);
- ``sequences``: positions per sample, from the config and the captioner's prompt layout;
- ``components``: the parts of a peak (weights, optimizer state, activations, logits, KV cache...);
- ``stages``: what each stage holds, its peak and the largest micro-batch that fits;
- ``plan``: config loading, the command and its table.
"""

"""The runtime model and its kernels, shared by calibration (``calibrate/``) and the live replay
(``simcolo/replay/``): the Llama-family model (``model``), LoRA adapters (``lora``), the KV cache of a
serving instance (``kv_cache``) and the serving / training runners (``runner``).

Import from the submodules; this package imports nothing itself, so that the simulator, which never
needs torch, does not load it by importing ``simcolo``.
"""

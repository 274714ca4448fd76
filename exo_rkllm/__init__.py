"""exo-rkllm: an exo inference engine that runs .rkllm models on Rockchip NPUs.

This module is imported at every interpreter start-up of an environment where
the package is installed (through exo_rkllm.pth), so it must stay import-free.
"""
__version__ = "0.1.0"
ENGINE_NAME = "rkllm"
ENGINE_CLASSNAME = "RKLLMInferenceEngine"

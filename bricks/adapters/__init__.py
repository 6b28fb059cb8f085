"""Customized bricks: LoRA adapters (PEFT in and out), their training, many on one base, routers between them, and
CPET's recovery bricks."""

from .lora import AdapterBrick, LoRAModule
from .recovery import RecoveryBrick, RecoveryModule, load_customized
from .multi import MultiAdapter, attach_adapters
from .routers import ADAPTER_ROUTERS, AdapterRouter, compare_routing, fit_router
from .training import train_lora

__all__ = ["AdapterBrick", "LoRAModule", "RecoveryBrick", "RecoveryModule", "load_customized", "MultiAdapter",
           "attach_adapters", "ADAPTER_ROUTERS", "AdapterRouter", "compare_routing", "fit_router", "train_lora"]

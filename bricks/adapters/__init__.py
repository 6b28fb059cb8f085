"""Customized bricks: LoRA adapters (PEFT in and out), their training, many on one base, and routers between them."""

from .lora import AdapterBrick, LoRAModule
from .multi import MultiAdapter, attach_adapters
from .routers import ADAPTER_ROUTERS, AdapterRouter, compare_routing, fit_router
from .training import train_lora

__all__ = ["AdapterBrick", "LoRAModule", "MultiAdapter", "attach_adapters", "ADAPTER_ROUTERS", "AdapterRouter",
           "compare_routing", "fit_router", "train_lora"]

"""Meta's Llama 3 in plain PyTorch: model, tokenizer, chat format and checkpoint loading."""

from .args import ModelArgs
from .chat_format import ChatFormat
from .checkpoint import CheckpointError, load
from .device import default_dtype, resolve_device
from .distributed import init_distributed, print_on_first_process_only
from .model import Transformer
from .tokenizer import Tokenizer

__all__ = ["ChatFormat", "CheckpointError", "ModelArgs", "Tokenizer", "Transformer", "default_dtype",
           "init_distributed", "load", "print_on_first_process_only",
           "resolve_device"]

"""Inference for Meta's Llama 2 models: `Llama.build(...)`, then `text_completion` or `chat_completion`."""

from llama.chat_format import Dialog, Message
from llama.demo import demo_model_dir
from llama.generation import Llama
from llama.model import ModelArgs, Transformer
from llama.tokenizer import Tokenizer

__all__ = ["Llama", "Dialog", "Message", "Tokenizer", "ModelArgs", "Transformer", "demo_model_dir"]

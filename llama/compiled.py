"""The torch.compile'd one-token decode step, set up for the device it runs on.

CUDA: mode="reduce-overhead", so a step replays as one CUDA graph with no per-kernel launch cost.
CPU: inductor with freezing and max-autotune: the weights become constants of the graph, prepacked
for inductor's C++ GEMM template, which streams a weight at close to the memory bandwidth at the
small row counts of decoding (oneDNN/MKL reach about half of it there). The template is asked for
alone, since autotuning times both choices with every weight hot in cache, where MKL looks faster;
for matmuls it cannot do (float32 activations with int8 weights, on CPUs without AVX-512 for int4)
the step is compiled again with torch's own kernels as well.

Freezing keeps its own prepacked copy of the weights: on CPU the compiled step costs one more copy
of the model's matmul weights in memory (the eager weights still serve prefill), and it does not
see later in-place changes to the weights. Every graph compiled holds such a copy, so on CPU one
graph serves every batch size: the batch dimension is compiled as dynamic, and a batch of one is
padded to two rows (dynamo always specialises a size of 1), which costs no measurable time.
"""

import logging
from typing import Callable

import torch

from llama.model import Transformer

logger = logging.getLogger(__name__)


class CompiledDecodeStep:
    """Call as model.decode_step(tokens, positions); the first call compiles (seconds to a minute)."""

    def __init__(self, model: Transformer):
        self.model = model
        self.device = model.tok_embeddings.weight.device
        self._step: Callable = torch.compile(model.decode_step, mode="reduce-overhead" if self.device.type == "cuda" else None)
        self._gemm_backends = "CPP"  # on CPU; widened to "CPP,ATEN" when the template cannot do every matmul

    def _inductor_options(self):
        # Freezing happens when the step is traced, which happens inside a call: the options are set around
        # every call, not process-wide, so other torch.compile users in the process are not affected.
        import torch._inductor.config as inductor_config

        if self.device.type != "cpu":
            return inductor_config.patch({})
        return inductor_config.patch(freezing=True, max_autotune=True, max_autotune_gemm_backends=self._gemm_backends)

    @torch.no_grad()  # freezing applies only to graphs traced without autograd
    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        bsz = tokens.shape[0]
        slots = self.model.params.max_batch_size
        if self.device.type == "cpu" and slots >= 2:
            if bsz == 1:  # row 1 runs in batch slot 1, unused by a batch of one; its logits are dropped
                tokens, positions = tokens.expand(2, 1).contiguous(), positions.expand(2).contiguous()
            if slots > 2:
                torch._dynamo.mark_dynamic(tokens, 0, min=2, max=slots)
                torch._dynamo.mark_dynamic(positions, 0, min=2, max=slots)
        try:
            with self._inductor_options():
                return self._step(tokens, positions)[:bsz]
        except Exception as error:
            if self.device.type != "cpu" or self._gemm_backends != "CPP" or "NoValidChoicesError" not in repr(error):
                raise
            logger.info("inductor's C++ GEMM template cannot do every matmul of this model; compiling with torch's kernels as well")
            self._gemm_backends = "CPP,ATEN"
            with self._inductor_options():
                return self._step(tokens, positions)[:bsz]

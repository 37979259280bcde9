"""Run by test_memory.py: load a checkpoint and print the peak anonymous memory it took, in bytes."""

import sys
import threading
import time

import torch

from llama import Llama


def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def main(ckpt_dir: str, tokenizer_path: str) -> None:
    torch.set_num_threads(1)
    Llama  # import torch and the package before the baseline
    baseline, peak, done = rss_anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    generator = Llama.build(ckpt_dir, tokenizer_path, max_seq_len=8, max_batch_size=1, device="cpu")
    done.set()
    sampler.join()
    model_bytes = sum(p.numel() * p.element_size() for p in generator.model.parameters())
    print(peak[0] - baseline, model_bytes)


if __name__ == "__main__":
    main(*sys.argv[1:])

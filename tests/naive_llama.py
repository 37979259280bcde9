"""An independent, deliberately naive Llama 2 forward pass written from the formulas.

No cache, no SDPA, complex-number rotary embeddings, explicit masks and repeated kv heads,
all in float64: the yardstick for llama.model.
"""

import torch


def rms_norm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight


def rotary(x, theta):
    """x: (seq, heads, head_dim); rotate pair (x[2i], x[2i+1]) at position p by p * theta^(-2i/d)."""
    seq, _, d = x.shape
    i = torch.arange(d // 2, dtype=torch.float64)
    angle = torch.arange(seq, dtype=torch.float64)[:, None] * theta ** (-2 * i / d)
    z = torch.view_as_complex(x.reshape(seq, -1, d // 2, 2).contiguous())
    z = z * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    return torch.view_as_real(z).reshape(seq, -1, d)


def naive_logits(sd, params, tokens):
    """Logits (seq, vocab) of one sequence of token ids, from a full state dict."""
    sd = {k: v.double() for k, v in sd.items()}
    dim, n_heads = params["dim"], params["n_heads"]
    n_kv = params.get("n_kv_heads") or n_heads
    hd, eps, theta = dim // n_heads, params["norm_eps"], params.get("rope_theta", 10000.0)
    x = sd["tok_embeddings.weight"][torch.tensor(tokens)]
    seq = len(tokens)
    causal = torch.full((seq, seq), float("-inf"), dtype=torch.float64).triu(1)
    for i in range(params["n_layers"]):
        p = f"layers.{i}."
        h = rms_norm(x, sd[p + "attention_norm.weight"], eps)
        q = rotary((h @ sd[p + "attention.wq.weight"].T).view(seq, n_heads, hd), theta)
        k = rotary((h @ sd[p + "attention.wk.weight"].T).view(seq, n_kv, hd), theta)
        v = (h @ sd[p + "attention.wv.weight"].T).view(seq, n_kv, hd)
        k = k.repeat_interleave(n_heads // n_kv, dim=1)
        v = v.repeat_interleave(n_heads // n_kv, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q, k) / hd ** 0.5 + causal
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(seq, dim)
        x = x + attn @ sd[p + "attention.wo.weight"].T
        h = rms_norm(x, sd[p + "ffn_norm.weight"], eps)
        gate = torch.nn.functional.silu(h @ sd[p + "feed_forward.w1.weight"].T)
        x = x + (gate * (h @ sd[p + "feed_forward.w3.weight"].T)) @ sd[p + "feed_forward.w2.weight"].T
    return rms_norm(x, sd["norm.weight"], eps) @ sd["output.weight"].T


def naive_greedy(sd, params, prompt, max_gen_len, eos_id, max_seq_len):
    """Greedy continuation by full recomputation, cut before EOS."""
    tokens = list(prompt)
    out = []
    while len(out) < max_gen_len and len(tokens) < max_seq_len:
        nxt = int(naive_logits(sd, params, tokens)[-1].argmax())
        if nxt == eos_id:
            break
        tokens.append(nxt)
        out.append(nxt)
    return out

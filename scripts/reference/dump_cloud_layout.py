#!/usr/bin/env python3
"""Golden CLoud sequence layouts, made independently of cloudrm: the chat template is
rendered by transformers (jinja2) and the text tokenized by llama.cpp's llama-tokenize.

- ChatML (the default model): for each (prompt, response), the classic sequence (the
  first two turns, ending with the <|im_end|> that closes the assistant turn) and the
  CLoud generation prefix (three turns, the last user turn = COT_PROMPT without its
  trailing space, cut right after "question:"), as text and llama.cpp token ids.
- Llama 3 (tokenizer not available offline): the same two texts rendered with the
  official Llama-3-Instruct template, which trims message content.

Usage:
    python3 scripts/reference/dump_cloud_layout.py --model <default model import dir> \
        --llama-tokenize <build>/bin/llama-tokenize --gguf <SmolLM2-135M-Instruct.Q4_1.gguf> \
        --out tests/golden/cloud_layout.json
"""

import argparse
import ast
import json
import os
import subprocess
import tempfile

import jinja2
from transformers import AutoTokenizer

COT_PROMPT = "The following is a break down on the correctness and usefulness of the assistant's response to my question: "
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
          "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
          "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
          "{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
CASES = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Add 17 and 25.", "  42  "),
    ("Write a haiku about rain.", "Soft rain on the roof\nwhispers to the sleeping town\n— morning comes slowly."),
    ("Résumé tips?", "Keep it to one page; lead with results 😀."),
]


def llama_ids(tool, gguf, text):
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", delete=False) as f:
        f.write(text)
        path = f.name
    try:
        out = subprocess.run([tool, "-m", gguf, "-f", path, "--no-escape", "--ids", "--no-bos",
                              "--log-disable"], check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    return ast.literal_eval([l for l in out.splitlines() if l.startswith("[")][-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--llama-tokenize", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(a.model)
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    llama3 = env.from_string(LLAMA3)
    cut = "question:"
    cases = []
    for prompt, response in CASES:
        two = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        three = two + [{"role": "user", "content": COT_PROMPT.rstrip()}]
        classic = tok.apply_chat_template(two, tokenize=False)
        classic = classic[:classic.rindex("<|im_end|>") + len("<|im_end|>")]
        cloud = tok.apply_chat_template(three, tokenize=False)
        cloud = cloud[:cloud.rindex(cut) + len(cut)]
        l3_classic = llama3.render(messages=two, bos_token="<|begin_of_text|>", add_generation_prompt=False)
        l3_cloud = llama3.render(messages=three, bos_token="<|begin_of_text|>", add_generation_prompt=False)
        l3_cloud = l3_cloud[:l3_cloud.rindex(cut) + len(cut)]
        cases.append({
            "prompt": prompt, "response": response,
            "chatml_classic_text": classic,
            "chatml_classic_ids": llama_ids(a.llama_tokenize, a.gguf, classic),
            "chatml_cloud_prefix_text": cloud,
            "chatml_cloud_prefix_ids": llama_ids(a.llama_tokenize, a.gguf, cloud),
            "llama3_classic_text": l3_classic,
            "llama3_cloud_prefix_text": l3_cloud,
        })
    doc = {"magic": "cloudrm-cloud-layout-golden", "version": 1,
           "generator": "transformers apply_chat_template / jinja2 (Llama-3-Instruct template) + llama.cpp llama-tokenize",
           "regenerate": "python3 scripts/reference/dump_cloud_layout.py --model <default model import dir> "
                         "--llama-tokenize <build>/bin/llama-tokenize --gguf <SmolLM2-135M-Instruct.Q4_1.gguf> "
                         "--out tests/golden/cloud_layout.json",
           "cases": cases}
    with open(a.out + ".tmp", "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(a.out + ".tmp", a.out)
    print(f"wrote {len(cases)} cases")


if __name__ == "__main__":
    main()

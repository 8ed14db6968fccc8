"""Exports one adapter of a MeteoRA checkpoint as a Hugging Face PEFT LoRA directory that peft loads.

Usage: python convert/orbax_to_hf_lora.py --meteora CKPT --adapter NAME_OR_INDEX --out DIR [--overwrite]
"""

import argparse
import sys

from meteora_jax.checkpoint import atomic_directory
from meteora_jax.meteora_checkpoint import read_meteora
from meteora_jax.peft_io import export_peft_adapter


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meteora", required=True)
    parser.add_argument("--adapter", required=True, help="adapter name, or its index in the checkpoint")
    parser.add_argument("--out", required=True)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        tree, manifest = read_meteora(args.meteora)
        names = [a["name"] for a in manifest["adapters"]]
        if args.adapter in names:
            index = names.index(args.adapter)
        elif args.adapter.isdigit() and int(args.adapter) < len(names):
            index = int(args.adapter)
        else:
            raise ValueError(f"no adapter {args.adapter!r} in {args.meteora}; it holds {names}")
        with atomic_directory(args.out, args.overwrite) as staging:
            export_peft_adapter(tree, index, manifest["adapters"][index], staging)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: adapter {names[index]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stacks Hugging Face PEFT LoRA adapters into one MeteoRA checkpoint for a converted base model.

Usage: python convert/hf_lora_to_orbax.py --base BASE_CKPT --adapter NAME=PATH [--adapter ...] --out OUT
       [--gates METEORA_CKPT] [--gate-init-std 0.02] [--seed 0] [--top-k 2] [--temperature 1.0] [--overwrite]
Adapter order on the command line is the gate index.
"""

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from meteora_jax.config import LlamaConfig
from meteora_jax.meteora_checkpoint import build_banks, read_meteora, save_meteora
from meteora_jax.peft_io import read_peft_adapter


def parse_adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter takes NAME=PATH, got {text!r}")
    return name, path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base checkpoint from convert/hf_llama_to_orbax.py")
    parser.add_argument("--adapter", type=parse_adapter, action="append", required=True, metavar="NAME=PATH")
    parser.add_argument("--out", required=True)
    parser.add_argument("--gates", help="take the gates from this MeteoRA checkpoint instead of a fresh init")
    parser.add_argument("--gate-init-std", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, help="adapters mixed per token (default: 2, or 1 for one adapter)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    try:
        base = LlamaConfig.from_json_file(Path(args.base) / "config.json")
        adapters = [read_peft_adapter(name, path, base) for name, path in tqdm(args.adapter, desc="reading adapters")]
        gates = None
        if args.gates:
            gates, gates_manifest = read_meteora(args.gates)
            theirs = [a["name"] for a in gates_manifest["adapters"]]
            ours = [name for name, _ in args.adapter]
            if theirs != ours:
                raise ValueError(f"--gates {args.gates} routes over adapters {theirs}; these are {ours} "
                                 "(same names in the same order needed, since the gate index is the adapter)")
        tree, manifest = build_banks(adapters, base, gate_init_std=args.gate_init_std, seed=args.seed,
                                     gates_from=gates)
        top_k = args.top_k if args.top_k is not None else min(2, len(adapters))
        if not 1 <= top_k <= len(adapters):
            raise ValueError(f"--top-k {top_k} must be between 1 and the number of adapters ({len(adapters)})")
        manifest.update(top_k=top_k, temperature=args.temperature,
                        base_checkpoint=str(Path(args.base).absolute()))
        save_meteora(args.out, tree, manifest, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    targets = ", ".join(manifest["targets"])
    print(f"wrote {args.out}: {len(adapters)} adapters, rank {manifest['rank']}, targets {targets}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

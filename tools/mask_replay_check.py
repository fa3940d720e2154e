"""One-off diagnostic: did a training phase learn its *own blanks* rather than the language?

``tools pretrain``'s batches are fixed by ``--seed`` (chunk order and masks, per step), so
a phase run with an earlier phase's seed replays that phase's batches with the same
blanks. This scores checkpoints on steps of that seed's batches twice: with the seed's
own masks and with the same sequences masked by another seed. A checkpoint that is better
only on the first has memorised the blanks. Used for phase 9 (README, "Phase 9 was tried"):

    python tools/mask_replay_check.py --data runs/p9/data --seed 7 \\
        runs/p8/checkpoint runs/p9/checkpoint
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    """Print, per checkpoint, its loss on the seed's own masks and on other masks."""
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    from tools import wwm
    from tools.pretrain import Batches

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="the run's prepared corpus (data/)")
    parser.add_argument("--seed", type=int, required=True, help="the seed the phases were trained with")
    parser.add_argument("--other-seed", type=int, default=None, help="masks to compare with (default seed+1)")
    parser.add_argument("--steps", default="0:16000:400", help="start:stop:every of the steps scored")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--mask-unit", default="mixed")
    args = parser.parse_args()
    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoints[0])
    prepared = wwm.load_prepared(args.data)
    own = Batches(prepared, tokenizer, args.seq_len, args.batch_size, args.seed, 0.15, mask_unit=args.mask_unit)
    other_seed = args.seed + 1 if args.other_seed is None else args.other_seed
    other = Batches(prepared, tokenizer, args.seq_len, args.batch_size, other_seed, 0.15, mask_unit=args.mask_unit)
    start, stop, every = map(int, args.steps.split(":"))
    for ckpt in args.checkpoints:
        model = BertForMaskedLM.from_pretrained(ckpt).eval()
        row = []
        for name, masker in ((f"seed {args.seed} masks", own), (f"seed {other_seed} masks", other)):
            total = count = 0
            with torch.no_grad():
                for step in range(start, stop, every):
                    ids, flags, attn = own.unmasked(step)  # the same sequences for both
                    inputs, labels = masker.mask(ids, flags, step)
                    labels = torch.as_tensor(labels, dtype=torch.long)
                    loss = model(input_ids=torch.as_tensor(inputs, dtype=torch.long),
                                 attention_mask=torch.as_tensor(attn, dtype=torch.long), labels=labels).loss
                    n = int((labels != -100).sum())
                    total, count = total + loss.item() * n, count + n
            row.append(f"{name} {total / count:.4f} ({count} blanks)")
        print(ckpt, "|", "; ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

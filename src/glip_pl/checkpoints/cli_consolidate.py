"""``glip-pl consolidate ZERO_OR_DCP_DIR OUT.ckpt``: a sharded DeepSpeed ZeRO or FSDP2 checkpoint directory → one
fp32 glip_pl checkpoint file (``glip_pl.checkpoints.consolidate``)."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "consolidate",
        help="DeepSpeed ZeRO or FSDP2 (torch.distributed.checkpoint) directory -> one fp32 glip_pl checkpoint file",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("zero_dir", help="the ZeRO or FSDP2 checkpoint directory (e.g. runs/x/checkpoints/last.ckpt/)")
    p.add_argument("out", help="output file (e.g. runs/x/consolidated.ckpt)")
    p.add_argument("--tag", help="tag sub-directory (default: from the 'latest' file)")
    p.add_argument("--preset", help="model preset, when the checkpoint does not record it")
    p.add_argument("--model-options", type=json.loads, help="JSON build_glip overrides, when not recorded")
    p.add_argument("--no-verify", action="store_true", help="skip rebuilding the model to check the weights")
    p.set_defaults(func=_main)


def _main(args) -> int:
    import pickle

    from .consolidate import consolidate_dcp_checkpoint, consolidate_zero_checkpoint
    from .dcp import is_dcp_checkpoint

    try:
        if is_dcp_checkpoint(args.zero_dir):
            res = consolidate_dcp_checkpoint(args.zero_dir, args.out, verify=not args.no_verify)
        else:
            res = consolidate_zero_checkpoint(args.zero_dir, args.out, tag=args.tag, preset=args.preset,
                                              model_options=args.model_options, verify=not args.no_verify)
    except (ValueError, OSError, pickle.UnpicklingError) as e:  # GLIPInputError is a ValueError
        print(f"glip-pl consolidate: error: {e}", file=sys.stderr)
        return 2
    n = sum(v.numel() for v in res["state_dict"].values())
    print(f"[glip_pl] wrote {args.out}: {len(res['state_dict'])} tensors, {n:,} values (fp32), preset "
          f"{res['hyper_parameters']['preset']!r}, step {res.get('global_step')}")
    return 0

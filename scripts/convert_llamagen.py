"""Convert official LlamaGen checkpoints into an argen pipeline folder.

    python scripts/convert_llamagen.py --gpt c2i_B_256.pt --gpt-size GPT-B --vq vq_ds16_c2i.pt \
        --image-size 256 --out llamagen-b-256
    argen generate --model llamagen-b-256 --class 207
"""

import argparse
import json
import sys

from argen.cli.main import OneLineParser
from argen.convert import convert_llamagen
from argen.errors import ArgenError


def main(argv=None) -> int:
    p = OneLineParser(prog="convert_llamagen", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpt", required=True, help="official GPT checkpoint (.pt/.pth/.safetensors)")
    p.add_argument("--vq", required=True, help="official VQ checkpoint")
    p.add_argument("--out", required=True, help="output pipeline folder")
    p.add_argument("--gpt-size", help="GPT-B, GPT-L, GPT-XL, ...")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--vq-preset", default="VQ-16")
    p.add_argument("--gpt-args", default="{}", help='extra official ModelArgs as JSON, e.g. \'{"num_classes": 1000}\'')
    p.add_argument("--vq-args", default="{}", help="extra official VQ ModelArgs as JSON")
    p.add_argument("--class-names", help="text file with one class name per line")
    p.add_argument("--t5-path", help="local FLAN-T5 folder (text-to-image weights)")
    p.add_argument("--cfg-scale", type=float, default=2.0, help="default guidance stored with the pipeline")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's 'ema' weights")
    try:
        args = p.parse_args(argv)
        try:
            gpt_args, vq_args = json.loads(args.gpt_args), json.loads(args.vq_args)
        except json.JSONDecodeError as err:
            raise ArgenError(f"--gpt-args/--vq-args must be JSON objects ({err})") from None
        names = None
        if args.class_names:
            with open(args.class_names) as handle:
                names = [line.strip() for line in handle if line.strip()]
        encoder = None
        if args.t5_path:
            from argen.text import load_text_encoder

            encoder = load_text_encoder("flan-t5", path=args.t5_path)
            gpt_args.setdefault("model_type", "t2i")
        convert_llamagen(args.gpt, args.vq, args.out, gpt_size=args.gpt_size, image_size=args.image_size,
                         vq_preset=args.vq_preset, gpt_args=gpt_args, vq_args=vq_args, class_names=names,
                         text_encoder=encoder, cfg_scale=args.cfg_scale, prefer_ema=args.ema)
    except ArgenError as err:
        print(f"convert_llamagen: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`ddpm-metrics`: see `main`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from ddpm_hf.commands.parsing import Parser
from ddpm_hf.commands.running import command
from ddpm_hf.sizes import resolution as image_resolution


@command
def main(argv: Optional[Sequence[str]] = None) -> int:
    """`ddpm-metrics`: FID (clean-fid), KID and Inception Score of a folder of samples against a reference
    folder or dataset split, or the Fréchet distance in DINOv2's feature space (--feature_network dinov2:
    FD_DINOv2); precision and recall as an option; writes metrics.json (metrics-dinov2.json) with the protocol."""
    from ddpm_hf.choices import FEATURE_NETWORKS, FID_MODES
    from ddpm_hf.paths import CACHE_ENV, DINOV2_DEFAULT, INCEPTION_FILE

    parser = Parser(description=main.__doc__, prog="ddpm-metrics")
    parser.add_argument("samples", nargs="?", help="folder of generated images (e.g. from ddpm-sample)")
    parser.add_argument("--reference", help="a folder of images; a dataset as for train_ddpm.py --dataset (cifar10, a Hub id, parquet "
                        "files); or clean-fid's precomputed statistics, cleanfid:NAME:SPLIT:RES (e.g. cleanfid:cifar10:train:32)")
    parser.add_argument("--split", default="train", help="the reference dataset's split")
    parser.add_argument("--resolution", type=image_resolution, default=None, help="reference images are resized/cropped "
                        "to this (the samples' size): N, or HxW")
    parser.add_argument("--channels", type=int, default=3, choices=(1, 3), help="the reference images' channels "
                        "(1: grayscale, as a 1-channel model draws)")
    parser.add_argument("--mode", choices=FID_MODES, default="clean", help="clean-fid's resizing protocol")
    parser.add_argument("--feature_network", choices=FEATURE_NETWORKS, default="inception",
                        help="the feature space: Inception-v3 (FID, KID, IS) or DINOv2 (FD_DINOv2, Stein et al. 2023)")
    parser.add_argument("--inception_weights", default=None, help=f"path to {INCEPTION_FILE}")
    parser.add_argument("--dinov2_model", default=DINOV2_DEFAULT, help="the DINOv2 model: a Hub id (cached ones work "
                        "offline) or a save_pretrained folder with its preprocessor_config.json")
    parser.add_argument("--precision_recall", action="store_true", help="improved precision and recall (k = 3) in "
                        "the same feature space")
    parser.add_argument("--cache_dir", default=None, help=f"reference statistics and weights cache (default: ${CACHE_ENV}, "
                        "else ~/.cache/ddpm_hf)")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--kid", action=argparse.BooleanOptionalAction, default=True, help="Kernel Inception Distance")
    parser.add_argument("--is", dest="isc", action=argparse.BooleanOptionalAction, default=True, help="Inception Score "
                        "(Inception only)")
    parser.add_argument("--output", default=None, help="where to write the metrics (default: metrics.json, or "
                        "metrics-dinov2.json, in the samples folder)")
    parser.add_argument("--download_inception", action="store_true", help="fetch the Inception weights into the cache and exit")
    args = parser.parse_args(argv)
    if not args.download_inception:
        if not args.samples or not args.reference:
            parser.error("give the samples folder and --reference")
        parser.check_sources(args)

    from ddpm_hf.devices import distributed_state
    from ddpm_hf.measuring.folder_metrics import download_inception, measure_folder, feature_network

    if args.download_inception:
        try:
            print(f"saved {download_inception(args.cache_dir)}")
        except OSError as e:
            raise OSError(f"could not download the Inception weights ({e}); copy {INCEPTION_FILE} from a machine with "
                          "internet and pass --inception_weights.") from None
        return 0
    from pathlib import Path

    from ddpm_hf.measuring.folder_metrics import is_metrics_record
    from ddpm_hf.outputs.folder_jobs import OutputFile
    from ddpm_hf.outputs.run_folder import metrics_file

    output = Path(args.output) if args.output else Path(args.samples) / metrics_file(args.feature_network)
    with OutputFile(output, is_metrics_record, "ddpm-metrics", "--output"):  # held while measuring: one writer
        device = distributed_state().device
        network = feature_network(args.feature_network, device, args.inception_weights, args.dinov2_model,
                                  args.cache_dir)  # first: fail before any work
        result = measure_folder(args.samples, args.reference, network, mode=args.mode, cache_dir=args.cache_dir,
                                split=args.split, resolution=args.resolution, channels=args.channels, kid=args.kid,
                                isc=args.isc, output=output, precision_recall=args.precision_recall,
                                batch_size=args.batch_size, device=device)
    if "caution" in result["protocol"]:
        print(f"note: {result['protocol']['caution']}", file=sys.stderr)
    print(json.dumps({k: v for k, v in result.items() if k != "protocol"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

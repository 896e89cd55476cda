"""`vitlab export MODEL_DIR OUT --to hf|timm|onnx`: a vitlab model where other libraries can use it.

  hf    transformers ViTForImageClassification (CLIP / SigLIP dirs: CLIPModel / SiglipModel): config.json with
        id2label, model.safetensors, preprocessor_config.json. `pipeline("image-classification", model=OUT)`.
  timm  model.safetensors + timm's hub config.json. `timm.create_model("local-dir:OUT", pretrained=True)`.
  onnx  model.onnx (CLIP / SigLIP: image_encoder.onnx, text_encoder.onnx) with a dynamic batch dimension,
        beside config.json and preprocessor_config.json. Needs `pip install 'vitlab[export]'`.

After writing, the export is loaded back with its library (when installed) and compared with the vitlab model.
Features a format cannot express (registers or a MAP head in a Hugging Face ViT, ...) are an error naming them.
"""

from __future__ import annotations

import argparse
import importlib.util

from vitlab.errors import VitlabError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("export", help="export a model to Hugging Face transformers, timm or ONNX",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a vitlab model directory (run dir, `vitlab convert` "
                                                          "output, CLIP / SigLIP dir)")
    p.add_argument("out", metavar="OUT", help="directory to write the export into")
    p.add_argument("--to", required=True, choices=("hf", "timm", "onnx"), help="target format")
    p.add_argument("--no-check", action="store_true", help="do not load the export back to compare outputs")
    p.add_argument("--force", action="store_true", help="replace an earlier export of the same format in OUT "
                                                        "(anything else there is refused)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vitlab.export import export_model
    from vitlab.rundir import EXPORT_RECORD
    from vitlab.weights import read_json

    if args.to == "onnx" and importlib.util.find_spec("onnxscript") is None:
        raise VitlabError("ONNX export needs onnx and onnxscript: pip install 'vitlab[export]'")
    result = export_model(args.model_dir, args.out, to=args.to, check=not args.no_check,
                          force=args.force)
    for note in result.notes:
        print(f"note: {note}")
    files = ", ".join(read_json(result.out / EXPORT_RECORD)["files"])
    print(f"exported {args.model_dir} ({result.source.kind}) -> {result.out} [{args.to}]: {files}")
    if result.max_diff is not None:
        print(f"checked: the export's outputs differ from vitlab's by at most {result.max_diff:.2g} on a random batch")
    return 0

"""`vitlab demo MODEL_DIR [--port 7860] [--host 127.0.0.1]`: explore a ViT in the browser.

Upload, paste or drop an image (or pick one of the run's test images): top-5 classes, attention rollout,
the attention map of any layer and head for the class token or a clicked patch, the patch grid at the
model's input size, and the position-embedding similarity. CLIP / SigLIP dirs: zero-shot with editable
classes and prompt templates. Needs `pip install 'vitlab[demo]'` (Gradio) and matplotlib.
"""

from __future__ import annotations

import argparse
import importlib.util

from vitlab.errors import VitlabError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="explore a model in the browser (Gradio)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a run dir, a `vitlab convert` output or a CLIP / SigLIP dir")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--data", metavar="DIR", help="dataset directory for the test-image picker (default: the run's "
                                                 "recorded data dir, then $VITLAB_DATA)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    missing = [m for m in ("gradio", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise VitlabError(f"vitlab demo needs {' and '.join(missing)}: pip install 'vitlab[demo,plot]'")
    if not 0 < args.port < 65536:
        raise VitlabError(f"--port must be in 1..65535, got {args.port}")
    from vitlab.demo.app import serve
    from vitlab.demo.explorer import Explorer

    ex = Explorer.open(args.model_dir, data=args.data)
    where = f"{ex.test_images.source}: {len(ex.test_images)} images" if ex.test_images else \
        "no test images found (uploads only; --data DIR to add them)"
    print(f"vitlab demo: {ex.summary()}; {where}")
    print(f"serving on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    try:
        serve(ex, host=args.host, port=args.port)
    except OSError as e:  # the port is taken or the address is not this machine's
        raise VitlabError(f"cannot serve on {args.host}:{args.port}: {e}") from None
    return 0

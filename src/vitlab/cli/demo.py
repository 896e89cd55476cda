"""`vitlab demo MODEL_DIR [--port 7860] [--host 127.0.0.1]`: explore a ViT in the browser.

Upload, paste or drop an image (or pick one of the run's test images): top-5 classes, attention rollout,
the attention map of any layer and head for the class token or a clicked patch, the patch grid at the
model's input size, and the position-embedding similarity. CLIP / SigLIP dirs: zero-shot with editable
classes and prompt templates. Needs `pip install 'vitlab[demo]'` (Gradio) and matplotlib.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import shutil
import sys
import tempfile
import time

from vitlab.errors import VitlabError
from vitlab.train.guard import stops_on_sigterm


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="explore a model in the browser (Gradio)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", metavar="MODEL_DIR", help="a run dir, a `vitlab convert` output or a CLIP / SigLIP dir")
    p.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--data", metavar="DIR", help="dataset directory for the test-image picker (default: the run's "
                                                 "recorded data dir, then $VITLAB_DATA)")
    p.add_argument("--auth", metavar="USER:PASS", help="ask for this user name and password before the page "
                                                       "(Gradio's login); advised with a --host other than loopback")
    p.add_argument("--max-upload-mb", type=float, default=5.0, help="refuse uploads larger than this (default 5)")
    p.set_defaults(func=run)


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not (sep and user and password):
        raise VitlabError("--auth must be USER:PASS, both non-empty")
    return user, password


@stops_on_sigterm  # SIGTERM stops the server as Ctrl-C does, so the uploads folder is removed either way
def run(args: argparse.Namespace) -> int:
    missing = [m for m in ("gradio", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise VitlabError(f"vitlab demo needs {' and '.join(missing)}: pip install 'vitlab[demo,plot]'")
    if not 0 < args.port < 65536:
        raise VitlabError(f"--port must be in 1..65535, got {args.port}")
    if not args.max_upload_mb > 0:
        raise VitlabError(f"--max-upload-mb must be > 0, got {args.max_upload_mb:g}")
    auth = parse_auth(args.auth)
    if not is_loopback(args.host):
        print(f"vitlab demo: warning: --host {args.host} serves the page to the network: anyone who can reach "
              f"this machine can use it{'' if auth else ' (--auth USER:PASS asks for a password)'}", file=sys.stderr)
    # uploads land in a private folder, removed when the server exits (Gradio reads this when it is imported)
    uploads = tempfile.mkdtemp(prefix="vitlab-demo-uploads-")
    os.environ["GRADIO_TEMP_DIR"] = uploads
    try:
        return _serve(args, auth)
    finally:
        shutil.rmtree(uploads, ignore_errors=True)


def _serve(args: argparse.Namespace, auth: tuple[str, str] | None) -> int:
    from vitlab.demo.app import serve
    from vitlab.demo.explorer import Explorer

    ex = Explorer.open(args.model_dir, data=args.data)
    where = f"{ex.test_images.source}: {len(ex.test_images)} images" if ex.test_images else \
        "no test images found (uploads only; --data DIR to add them)"
    print(f"vitlab demo: {ex.summary()}; {where}")
    print(f"serving on http://{args.host}:{args.port} (Ctrl-C stops)", flush=True)
    try:
        app = serve(ex, host=args.host, port=args.port, auth=auth, max_upload_mb=args.max_upload_mb, block=False)
    except OSError as e:  # the port is taken or the address is not this machine's
        raise VitlabError(f"cannot serve on {args.host}:{args.port}: {e}") from None
    try:
        while True:  # until Ctrl-C or SIGTERM (KeyboardInterrupt: exit 130 / 143)
            time.sleep(0.5)
    finally:
        app.close(verbose=False)

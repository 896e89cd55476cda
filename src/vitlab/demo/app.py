"""The Gradio page of `vitlab demo`: one image in, everything `vitlab.demo.explorer` computes about it out.

Every handler turns bad input (not an image, truncated, over the pixel limit) into a message in the page's
status line; the server keeps running. An unexpected error is printed with its traceback on the server
and shown as one line in the page.
"""

from __future__ import annotations

import os
import traceback

import gradio as gr
from PIL import Image

from vitlab.data import CIFAR10_CLASSES
from vitlab.demo.explorer import CLASS_TOKEN, DEFAULT_TEMPLATES, MEAN_OF_HEADS, PATCH, WINDOW_MEAN, Explorer
from vitlab.errors import VitlabError
from vitlab.inspect.attention import ROLLOUT_CAPTIONS
from vitlab.inspect.windows import default_block

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine
BAD_IMAGE = (VitlabError, OSError, ValueError, Image.DecompressionBombError)
PATCHES_MEAN = "mean of the patch queries"  # the query of models without a class token
# System fonts: the default theme fetches web fonts, which an offline machine cannot
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def image_input(**kwargs) -> gr.Image:
    """gr.Image that hands any uploaded file to vitlab, whose image opener says what is wrong with a bad one
    (gr.Image's own check fails with a bare 'Error'). Patched on the instance: Gradio writes a .pyi stub
    beside the source of every Component subclass."""
    image = gr.Image(**kwargs)
    checked = image.preprocess

    def preprocess(payload):
        try:
            return checked(payload)
        except BAD_IMAGE:
            return str(payload.path) if payload is not None and payload.path else None

    image.preprocess = preprocess
    return image


def build_app(ex: Explorer) -> gr.Blocks:
    cfg = ex.cfg
    clip = ex.src.kind in ("clip", "siglip")
    swin = ex.swin
    if swin:  # blocks of every stage; heads per stage (a head a block lacks shows the mean)
        depth, heads, first = len(ex.layout), max(b["heads"] for b in ex.layout), default_block(ex.layout) + 1
        query_choices = [WINDOW_MEAN, PATCH]
    else:
        depth, heads, first = cfg.depth, cfg.heads, cfg.depth
        query_choices = [CLASS_TOKEN if cfg.class_token else PATCHES_MEAN, PATCH]
    with gr.Blocks(title="vitlab explorer", analytics_enabled=False) as app:
        gr.Markdown(f"## vitlab explorer\n{ex.summary()}  \n`{ex.src.path}`")
        view, patch, truth = gr.State(None), gr.State(None), gr.State(None)
        with gr.Row():
            with gr.Column():
                image = image_input(type="filepath", image_mode=None, sources=["upload", "clipboard"], format="png",
                                    label="Image: upload, paste or drop", elem_id="input-image", height=320)
                if ex.test_images is not None:
                    n = len(ex.test_images)
                    with gr.Row():
                        index = gr.Number(0, precision=0, minimum=0, maximum=n - 1, label=f"{ex.test_images.source} "
                                          f"image (0..{n - 1})", elem_id="test-index")
                        pick = gr.Button("Use test image", elem_id="use-test-image")
                status = gr.Markdown("Upload an image to start.", elem_id="status")
            with gr.Column():
                classes = templates = None
                if clip:
                    default = ex.test_images.classes if ex.test_images is not None else CIFAR10_CLASSES
                    classes = gr.Textbox(", ".join(default), label="Classes (comma-separated)", elem_id="classes")
                    templates = gr.Textbox("\n".join(DEFAULT_TEMPLATES), lines=3, elem_id="templates",
                                           label="Prompt templates, one per line ({} is the class name)")
                    classify = gr.Button("Classify")
                label = gr.Label(num_top_classes=5, label="Zero-shot" if clip else "Top-5", elem_id="top5",
                                 visible=clip or ex.is_classifier)
        with gr.Row():
            if swin:  # no rollout: attention stays in windows; the windows themselves instead
                rollout = gr.Image(label="Windows of the chosen block's stage: regular (left), shifted (right; each "
                                         "window that wraps around the edges in one colour)", format="png",
                                   interactive=False, elem_id="windows")
            else:
                caption = ROLLOUT_CAPTIONS.get(cfg.pooling, f"not defined for {cfg.pooling!r} pooling")
                rollout = gr.Image(label=f"Attention rollout: {caption}", format="png", interactive=False,
                                   elem_id="rollout")
            grid = gr.Image(label=f"Patch grid at the input size ({cfg.image_size} px, {cfg.patch_size} px "
                                  "patches): click a patch to see where it looks", format="png", interactive=False,
                            elem_id="patch-grid")
        with gr.Row():
            with gr.Column(scale=1):
                layer = gr.Slider(1, depth, value=first, step=1, label="Block (all stages, in order)" if swin else
                                  "Layer (block)", elem_id="layer")
                head = gr.Dropdown([MEAN_OF_HEADS, *map(str, range(1, heads + 1))], value=MEAN_OF_HEADS,
                                   label="Head", elem_id="head")
                query = gr.Radio(query_choices, value=query_choices[0], label="Query", elem_id="query")
            what = "Attention inside one window (the image centre's; click a patch to pick its window and query " \
                "it), the rest dimmed" if swin else "Attention map (click a patch to query it)"
            attention = gr.Image(label=what, format="png", interactive=False, elem_id="attention", scale=2)
        figure = ex.position_figure()
        if figure is not None:
            gr.Plot(figure, label="Position-embedding similarity (ViT paper, Fig. 7)", elem_id="position-similarity")
        elif swin:
            gr.Markdown("Swin has no absolute position embeddings (a learned relative position bias inside each window "
                        "instead): no position-similarity figure.")
        else:
            gr.Markdown("This model has no position embeddings: no position-similarity figure.")

        results = [view, patch, truth, label, rollout, grid, attention, status]

        def attention_map(v, p, layer_, head_, query_):
            h = None if head_ == MEAN_OF_HEADS else int(head_) - 1
            if swin:
                return ex.window_attention_image(v, int(layer_) - 1, h, query_, p)
            q = PATCH if query_ == PATCH and p is not None else CLASS_TOKEN
            return ex.overlay_image(v, ex.attention_row(v, int(layer_) - 1, h, q, p), patch=p if q == PATCH else None)

        def on_image(path, true_label, layer_, head_, query_, *texts):
            empty = dict.fromkeys(results[3:7])
            if path is None:
                return {**empty, view: None, patch: None, truth: None, status: "Upload an image to start."}
            try:
                v = ex.analyse(path)
                scores = ex.zero_shot(v, *texts) if clip else ex.top_classes(v) if ex.is_classifier else None
            except BAD_IMAGE as e:
                return {**empty, view: None, patch: None, truth: None, status: f"**Cannot use this image:** {e}"}
            except Exception as e:  # a bug: the traceback goes to the server's log, the page stays up
                traceback.print_exc()
                return {**empty, view: None, patch: None, truth: None, status: f"**Internal error:** {e!r}"}
            best = max(scores, key=scores.get) if scores else None
            msg = f"Predicted **{best}** ({scores[best]:.1%})" if best else "Analysed (the model has no classifier)"
            if true_label:
                msg += f"; true class **{true_label}**"
            return {view: v, patch: None, truth: None, label: scores,
                    rollout: ex.windows_image(v, int(layer_) - 1) if swin else
                    ex.overlay_image(v, v.rollout) if v.rollout is not None else None,
                    grid: ex.patch_grid_image(v), attention: attention_map(v, None, layer_, head_, query_),
                    status: msg}

        text_inputs = [classes, templates] if clip else []
        image.change(on_image, [image, truth, layer, head, query, *text_inputs], results)

        def on_controls(v, p, layer_, head_, query_):
            return attention_map(v, p, layer_, head_, query_) if v is not None else None

        for control in (layer, head, query):
            control.change(on_controls, [view, patch, layer, head, query], attention)
        if swin:  # another block may be in another stage: its windows
            layer.change(lambda v, layer_: ex.windows_image(v, int(layer_) - 1) if v is not None else None,
                         [view, layer], rollout)

        def on_click(v, layer_, head_, evt: gr.SelectData):
            if v is None:
                return {patch: None}
            p = ex.patch_at(*evt.index)
            return {patch: p, query: PATCH, grid: ex.patch_grid_image(v, p),
                    attention: attention_map(v, p, layer_, head_, PATCH)}

        for clickable in (grid, attention):
            clickable.select(on_click, [view, layer, head], [patch, query, grid, attention])

        if ex.test_images is not None:
            def on_pick(i):
                try:
                    pixels, name = ex.test_images.get(int(i or 0))
                except VitlabError as e:
                    return {status: f"**{e}**"}
                return {image: pixels, truth: name}

            pick.click(on_pick, [index], [image, truth, status])

        if clip:
            def on_texts(v, *texts):
                if v is None:
                    return {status: "Upload an image first."}
                try:
                    return {label: ex.zero_shot(v, *texts)}
                except VitlabError as e:
                    return {status: f"**{e}**"}

            classify.click(on_texts, [view, classes, templates], [label, status])
            classes.submit(on_texts, [view, classes, templates], [label, status])
    return app


def serve(ex: Explorer, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True,
          auth: tuple[str, str] | None = None, max_upload_mb: float = 5.0):
    """Start the page; `block` waits until Ctrl-C (the CLI), else returns the running app (tests).

    `auth` (user, password) puts Gradio's login in front of the page; uploads over `max_upload_mb` are refused
    (HTTP 413). Uploads and the images the page shows are kept in $GRADIO_TEMP_DIR (`vitlab demo` gives it a
    private folder and removes it at exit).
    """
    app = build_app(ex)
    app.queue(default_concurrency_limit=1)  # one forward pass at a time on a CPU
    app.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True, quiet=True,
               prevent_thread_lock=not block, ssr_mode=False, theme=THEME, footer_links=[],
               auth=auth, max_file_size=int(max_upload_mb * 2**20))  # bytes: Gradio's "5mb" form takes integers only
    return app

"""`vitlab demo`: a ViT explorer in the browser (Gradio, the optional `[demo]` extra).

`explorer.py` computes what the page shows with `vitlab.inspect`'s functions and no Gradio; `app.py` is the page.
"""

from vitlab.demo.explorer import Explorer, TestImages, View, find_test_images

__all__ = ["Explorer", "TestImages", "View", "find_test_images"]
